//! Admin bodies: a tiers document (tiers file, PUT /v1/admin/tiers/{t}) and
//! a limits body (PUT .../limits). Accepted values are within the limits'
//! bounds; everything else is an error naming the field.
#![no_main]
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_service::admin::limit_changes;
use sluice_service::config::{limit_def, Tier, Tiers};
use sluice_service::http::parse_json;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = Tiers::from_json(text, None) {
            assert!(t.get(t.default_tier()).is_some(), "the default tier is not a tier");
            let _ = t.script_arg();
        }
    }
    let Ok(Value::Object(body)) = parse_json::<Value>(data) else { return };
    if let Ok(tier) = Tier::from_value("tier", &Value::Object(body.clone())) {
        let _ = tier.to_value();
    }
    match limit_changes(&body) {
        Ok(changes) => {
            for (name, value) in changes {
                assert!(limit_def(&name).is_some(), "unknown limit {name} accepted");
                if let Some(v) = value {
                    assert!(v <= 1_000_000_000_000_000, "{name} = {v} accepted");
                }
            }
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
