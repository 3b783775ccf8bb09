//! The SSE usage scanner: the usage found never depends on where the stream
//! was split into chunks, and JSON/header usage parsing never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_filter::usage::{self, SseScanner};

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = match data.split_first() {
        Some((c, rest)) => (*c, rest),
        None => (0, data),
    };
    let mut whole = SseScanner::new();
    whole.feed(stream);
    whole.finish();

    // Split at positions derived from the first byte (1..=255 bytes apart).
    let step = usize::from(cuts).max(1);
    let mut split = SseScanner::new();
    for chunk in stream.chunks(step) {
        split.feed(chunk);
    }
    split.finish();
    assert_eq!(whole.usage(), split.usage(), "usage depends on chunking (step {step})");

    let mut bytewise = SseScanner::new();
    for b in stream.chunks(1) {
        bytewise.feed(b);
    }
    bytewise.finish();
    assert_eq!(whole.usage(), bytewise.usage(), "usage depends on byte-wise chunking");

    if let Some(u) = usage::from_json_body(stream) {
        assert!(u.total <= sluice_wire::MAX_TOKENS);
    }
    if let Some(n) = usage::from_header(stream) {
        assert!(n <= sluice_wire::MAX_TOKENS);
    }
});
