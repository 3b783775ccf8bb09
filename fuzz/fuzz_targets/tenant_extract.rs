//! Tenant extraction from the raw header values (split at `\n` here): a
//! returned id is always a valid tenant id taken verbatim from the one value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_filter::tenant;

fuzz_target!(|data: &[u8]| {
    let values: Vec<&[u8]> = if data.is_empty() { Vec::new() } else { data.split(|b| *b == b'\n').collect() };
    if let Ok(id) = tenant::extract(&values) {
        assert!(sluice_wire::is_valid_tenant(id.as_bytes()), "invalid tenant accepted: {id:?}");
        assert_eq!(values.len(), 1, "a tenant was picked out of several values");
        let raw = values.first().copied().unwrap_or_default();
        assert!(raw.windows(id.len()).any(|w| w == id.as_bytes()), "the id was rewritten");
    }
});
