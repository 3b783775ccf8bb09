//! The quota service's answer as the filter reads it (status + body): a
//! failure, or a decision whose response headers are always valid header
//! values (visible ASCII, no CR/LF) and whose reply bodies are JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_filter::decision::{self, Outcome};

const STATUSES: [Option<&[u8]>; 5] = [Some(b"200"), Some(b"503"), Some(b"429"), Some(b"20x"), None];

fuzz_target!(|data: &[u8]| {
    let (sel, body) = match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => (0, data),
    };
    let status = STATUSES.get(usize::from(sel % 5)).copied().flatten();
    let Ok(resp) = decision::parse_answer(status, Some(body)) else { return };
    for (route_shadow, shadow_headers) in [(false, false), (true, true), (true, false)] {
        match decision::decide(&resp, route_shadow, shadow_headers) {
            Outcome::Admit { headers, pool, .. } => {
                check_headers(&headers);
                if let Some(p) = pool {
                    assert!(sluice_wire::is_valid_policy_name(&p), "pool {p:?}");
                }
            }
            Outcome::Reply { status, headers, body } => {
                assert!((400..600).contains(&status));
                check_headers(&headers);
                assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok(), "reply body is not JSON: {body}");
            }
        }
    }
});

fn check_headers(headers: &decision::Headers) {
    for (name, value) in headers {
        assert!(value.bytes().all(|b| (0x20..0x7f).contains(&b)), "header {name} has a bad byte: {value:?}");
    }
}
