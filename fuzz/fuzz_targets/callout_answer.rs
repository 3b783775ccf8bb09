//! The quota service's answer as the filter reads it (status + body): a
//! failure, or a decision whose response headers are always valid header
//! values (visible ASCII, no CR/LF), whose reply bodies are JSON and whose
//! queue tickets are header-safe (they become request headers).
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
    let modes = [(false, false), (true, true), (true, false)];
    for ((route_shadow, shadow_headers), can_queue) in modes.into_iter().flat_map(|m| [(m, false), (m, true)]) {
        match decision::decide(&resp, route_shadow, shadow_headers, can_queue) {
            Outcome::Admit { headers, pool, .. } => {
                check_headers(&headers);
                if let Some(p) = pool {
                    assert!(sluice_wire::is_valid_policy_name(&p), "pool {p:?}");
                }
            }
            Outcome::Queue { ticket } => {
                assert!(can_queue && !route_shadow, "queued without a queue cluster or in shadow mode");
                assert!(sluice_wire::is_valid_policy_name(&ticket.upstream), "upstream {:?}", ticket.upstream);
                assert!(ticket.ticket.len() == 32 && ticket.ticket.bytes().all(|b| b.is_ascii_hexdigit()), "ticket {:?}", ticket.ticket);
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
