//! Panic-free host calls (wasm32 only). The proxy-wasm SDK's `hostcalls`
//! panic on any status they do not expect, and a panic kills the VM for
//! every request of the worker: Envoy answers a header read of a failed
//! callout (a reset stream) with `BadArgument`, which the SDK's
//! `get_map_value_bytes` turns into a panic. These wrappers call the same
//! ABI functions and return `None`/`false` instead.
//!
//! `dispatch_http_call` stays with the SDK: it registers the callout token
//! with the SDK's dispatcher, which routes `on_http_call_response`, and it
//! only panics on statuses Envoy never returns for it.

use proxy_wasm::types::{BufferType, MapType, MetricType, StreamType};
use std::ptr::null_mut;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: MapType, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: MapType, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: StreamType) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_property(path_data: *const u8, path_size: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_call_foreign_function(
        name_data: *const u8,
        name_size: usize,
        args_data: *const u8,
        args_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(metric_type: MetricType, name_data: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *mut *mut u8,
        value_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(key_data: *const u8, key_size: usize, value_data: *const u8, value_size: usize, cas: u32) -> u32;
}

const OK: u32 = 0;

/// Takes ownership of bytes the host allocated through the SDK's
/// `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes).
///
/// # Safety
/// `data` must be null or such an allocation of `size` bytes.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: per the contract above.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Every (name, value) pair of a header map, in the ABI's encoding
/// (decoded by `pairs::decode`); empty when unavailable.
pub fn header_pairs(map: MapType) -> Vec<u8> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: out-pointers to locals; the host allocates the result.
    unsafe {
        if proxy_get_header_map_pairs(map, &mut data, &mut size) != OK {
            return Vec::new();
        }
        owned(data, size)
    }
}

/// One header's value; `None` if absent or the map is unavailable.
pub fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as above.
    unsafe {
        if proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) != OK {
            return None;
        }
        Some(owned(data, size))
    }
}

/// Sets (replacing every value) or, with `None`, removes a header.
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> bool {
    // SAFETY: pointers to live slices with their lengths.
    unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len()) == OK,
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()) == OK,
        }
    }
}

/// Answers locally with `status`, `headers` and `body`.
pub fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> bool {
    let pairs: Vec<(&[u8], &[u8])> = headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
    let encoded = crate::pairs::encode(&pairs);
    // SAFETY: as above.
    unsafe {
        proxy_send_local_response(
            status,
            null_mut(),
            0,
            body.as_ptr(),
            body.len(),
            encoded.as_ptr(),
            encoded.len(),
            -1,
        ) == OK
    }
}

/// Resumes a request paused in `on_http_request_headers`.
pub fn resume_request() -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_continue_stream(StreamType::HttpRequest) == OK }
}

/// Makes `context_id` the context later host calls act on (the root
/// context acting on the requests of a batch); false if it is gone.
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_set_effective_context(context_id) == OK }
}

/// Up to `max` bytes of a buffer from `start`.
pub fn buffer(kind: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as above.
    unsafe {
        if proxy_get_buffer_bytes(kind, start, max, &mut data, &mut size) != OK {
            return None;
        }
        Some(owned(data, size))
    }
}

/// A property (path parts joined by NUL, as the ABI wants).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as above.
    unsafe {
        if proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) != OK {
            return None;
        }
        Some(owned(data, size))
    }
}

/// Calls a host foreign function without arguments; whether it succeeded.
pub fn foreign(name: &str) -> bool {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as above; the (unused) result is freed by `owned`.
    unsafe {
        let ok = proxy_call_foreign_function(name.as_ptr(), name.len(), null_mut(), 0, &mut data, &mut size) == OK;
        drop(owned(data, size));
        ok
    }
}

pub fn define_counter(name: &str) -> Option<u32> {
    let mut id = 0;
    // SAFETY: as above.
    unsafe { (proxy_define_metric(MetricType::Counter, name.as_ptr(), name.len(), &mut id) == OK).then_some(id) }
}

pub fn increment(id: u32, n: u64) {
    // SAFETY: no pointers.
    unsafe {
        let _ = proxy_increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The host's clock (the only clock a wasm filter has).
pub fn now() -> Option<SystemTime> {
    let mut ns = 0u64;
    // SAFETY: an out-pointer to a local.
    unsafe { (proxy_get_current_time_nanoseconds(&mut ns) == OK).then(|| UNIX_EPOCH + Duration::from_nanos(ns)) }
}

/// Sets the root context's tick period (0 stops it).
pub fn set_tick_period(period: Duration) -> bool {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: no pointers.
    unsafe { proxy_set_tick_period_milliseconds(ms) == OK }
}

/// Host time in ns since the epoch (0 if the host does not tell: leases
/// then never live).
pub fn now_ns() -> u64 {
    let mut ns = 0u64;
    // SAFETY: an out-pointer to a local.
    if unsafe { proxy_get_current_time_nanoseconds(&mut ns) } == OK {
        ns
    } else {
        0
    }
}

pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// A shared-data value and its CAS token; anything but Ok is "no value".
pub fn get_shared(key: &str) -> (Option<Vec<u8>>, u32) {
    let mut data = null_mut();
    let mut size = 0;
    let mut cas = 0;
    // SAFETY: out-pointers to locals; the host allocates the value.
    unsafe {
        if proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) != OK {
            return (None, 0);
        }
        if data.is_null() {
            return (None, cas);
        }
        (Some(owned(data, size)), cas)
    }
}

/// Sets a value if its CAS token is still `cas`; false on a race or error.
/// A token of 0 would mean "unconditionally", so it is refused: every slot
/// is created at configure time and always has a real token.
pub fn set_shared(key: &str, value: &[u8], cas: u32) -> bool {
    if cas == 0 {
        return false;
    }
    // SAFETY: pointers and lengths of live slices.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) == OK }
}

/// Creates `slots` shared-data keys (a one-byte "free" value) so each has a
/// CAS token from the start; keys another worker created are left alone.
pub fn create_slots(slots: u32, key_of: impl Fn(u32) -> String) {
    for i in 0..slots {
        let key = key_of(i);
        if get_shared(&key).1 == 0 {
            // SAFETY: pointers and lengths of live slices; cas 0 = create.
            unsafe {
                proxy_set_shared_data(key.as_ptr(), key.len(), [0u8].as_ptr(), 1, 0);
            }
        }
    }
}
