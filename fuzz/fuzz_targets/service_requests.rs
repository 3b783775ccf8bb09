//! The service's request parsing: POST /v1/check, /v1/usage and /v1/report
//! bodies through the same `parse_json` + validation as the handlers. A body
//! is rejected with a message, or yields values within the documented bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_service::decision;
use sluice_service::http::parse_json;
use sluice_wire::{CheckRequest, ReportRequest, UsageReport};

fuzz_target!(|data: &[u8]| {
    match parse_json::<CheckRequest>(data) {
        Ok(req) => {
            if let Ok(v) = decision::validate(req) {
                assert!(sluice_wire::is_valid_tenant(v.tenant.as_bytes()));
                assert!(v.cost >= 1, "a check that costs nothing");
            }
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
    match parse_json::<UsageReport>(data) {
        Ok(r) => {
            if let Ok(v) = decision::validate_usage(r) {
                assert!(sluice_wire::is_valid_tenant(v.tenant.as_bytes()));
            }
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
    let _ = parse_json::<ReportRequest>(data);
});
