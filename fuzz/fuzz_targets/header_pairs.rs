//! The proxy-wasm header-map decoder: arbitrary host buffers never panic,
//! and what decodes re-encodes to the same pairs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_filter::pairs;

fuzz_target!(|data: &[u8]| {
    if let Some(p) = pairs::decode(data) {
        let again = pairs::encode(&p);
        assert_eq!(pairs::decode(&again).as_deref(), Some(p.as_slice()));
    }
});
