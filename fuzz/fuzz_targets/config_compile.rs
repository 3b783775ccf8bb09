//! The filter's plugin config compile: any bytes either compile or give an
//! error naming a field; a compiled config always selects a policy.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_filter::config;

fuzz_target!(|data: &[u8]| {
    match config::compile(data) {
        Ok(c) => {
            assert!(c.timeout_ms >= 1 && c.timeout_ms <= 60_000, "timeout_ms out of range: {}", c.timeout_ms);
            for path in ["/", "/v1/llm/x", "/healthz", "/static/a", "", "/v1/chat/completions"] {
                let _ = c.is_exempt_path(path);
                let p = c.select(path, Some("chat_route"), Some("llm"));
                assert!(p.exempt || p.cost >= 1, "a counted policy with cost 0: {p:?}");
                assert!(sluice_wire::is_valid_policy_name(&p.name), "bad policy name {:?}", p.name);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
