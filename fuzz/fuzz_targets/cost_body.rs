//! Cost and token estimates from a request body (chat and embeddings
//! rules): never a panic, always within the documented bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_filter::cost::{compile_rules, Body, CostRules, MAX_UNITS};
use std::sync::OnceLock;

fn rules() -> &'static [CostRules; 2] {
    static R: OnceLock<[CostRules; 2]> = OnceLock::new();
    R.get_or_init(|| {
        let chat = serde_json::json!({"charge_units": true, "reserve_tokens": true,
            "model_multipliers": {"gpt-4o": 5, "gpt-4o-mini": 0.3}, "default_max_tokens": 256});
        let embed = serde_json::json!({"kind": "embeddings", "charge_units": true, "reserve_tokens": true});
        match (compile_rules(&chat, "chat"), compile_rules(&embed, "embed")) {
            (Ok(a), Ok(b)) => [a, b],
            _ => std::process::abort(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let (cost, body) = match data.split_first() {
        Some((c, rest)) => (u64::from(*c % 8) + 1, rest),
        None => (1, data),
    };
    for r in rules() {
        if let Ok(e) = r.estimate(cost, Body::Bytes(body)) {
            assert!(e.units >= 1 && e.units <= MAX_UNITS, "units out of range: {}", e.units);
            assert!(e.tokens >= 1 && e.tokens <= sluice_wire::MAX_TOKENS, "tokens out of range: {}", e.tokens);
        }
    }
});
