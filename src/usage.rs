//! Real token usage from an upstream response (pure).
//!
//! Three sources, in this order of precedence: the configured response
//! header (a whole number), `usage` in a JSON body, `usage` in a data event
//! of a server-sent-events stream (OpenAI puts it in the last chunk when
//! `stream_options.include_usage` is set). `usage.total_tokens` is used; if
//! it is absent, `prompt_tokens + completion_tokens`. A figure that is
//! negative, fractional, not a number or above `MAX_TOKENS` is no figure:
//! the reservation then stands.
//!
//! The SSE scanner never holds the stream: the filter hands it each chunk as
//! it passes and it keeps at most [`MAX_LINE`] bytes of an unfinished line
//! (longer lines are skipped, and a usage line is a few hundred bytes).

use serde_json::Value;
use sluice_wire::MAX_TOKENS;

/// Longest SSE line (and event) the scanner keeps.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest JSON response body copied to look for `usage`; beyond it the
/// reservation stands.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// Usage as the upstream reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total: u64,
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
}

fn tokens(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64).filter(|n| *n <= MAX_TOKENS)
}

/// `usage` of a parsed response object or chunk.
pub fn from_value(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let prompt = tokens(u.get("prompt_tokens"));
    let completion = tokens(u.get("completion_tokens"));
    let total = match u.get("total_tokens") {
        Some(t) => tokens(Some(t))?,
        None => prompt?.checked_add(completion?)?,
    };
    (total <= MAX_TOKENS).then_some(Usage { total, prompt, completion })
}

/// `usage` of a whole JSON body.
pub fn from_json_body(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Value>(body).ok().as_ref().and_then(from_value)
}

/// A usage header: ASCII digits only (surrounding spaces allowed).
pub fn from_header(value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value).ok()?.trim();
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|n| *n <= MAX_TOKENS)
}

/// Incremental `text/event-stream` scanner.
#[derive(Debug, Default)]
pub struct SseScanner {
    /// The unfinished line.
    line: Vec<u8>,
    /// The current line grew past MAX_LINE: skip to its end.
    skipping: bool,
    /// Data of the current event (its `data:` lines joined by `\n`).
    data: Vec<u8>,
    data_overflow: bool,
    /// The previous chunk ended in CR, so a leading LF is part of that CRLF.
    after_cr: bool,
    usage: Option<Usage>,
}

impl SseScanner {
    pub fn new() -> SseScanner {
        SseScanner::default()
    }

    /// The last usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Feeds the next chunk of the stream, split anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some((b'\n', tail)) = rest.split_first() {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
                None => {
                    self.push(rest);
                    return;
                }
                Some(i) => {
                    let (head, tail) = rest.split_at(i);
                    self.push(head);
                    self.end_line();
                    let (eol, after) = tail.split_at(1);
                    rest = after;
                    if eol == b"\r" {
                        match rest.first() {
                            Some(b'\n') => rest = rest.get(1..).unwrap_or_default(),
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                }
            }
        }
    }

    /// The stream ended: an event without its final blank line still counts.
    pub fn finish(&mut self) {
        if !self.line.is_empty() || self.skipping {
            self.end_line();
        }
        self.dispatch();
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.skipping {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            self.line.clear();
            self.skipping = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self) {
        let skipped = std::mem::take(&mut self.skipping);
        let line = std::mem::take(&mut self.line);
        if skipped {
            // Only a data line can matter; a skipped one spoils its event.
            self.data_overflow = true;
            return;
        }
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let Some(value) = line.strip_prefix(b"data:") else {
            return; // event:, id:, retry:, comments
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if !self.data.is_empty() {
            self.data.push(b'\n');
        }
        if self.data.len() + value.len() > MAX_LINE {
            self.data_overflow = true;
        } else {
            self.data.extend_from_slice(value);
        }
    }

    fn dispatch(&mut self) {
        let data = std::mem::take(&mut self.data);
        if std::mem::take(&mut self.data_overflow) || data.is_empty() {
            return;
        }
        // Parse only chunks that can carry usage: most are content deltas.
        if !contains(&data, b"\"usage\"") {
            return;
        }
        if let Some(u) = serde_json::from_slice::<Value>(&data).ok().as_ref().and_then(from_value) {
            self.usage = Some(u);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real OpenAI-style stream: role chunk, content chunks, a finish
    /// chunk, the usage chunk (`include_usage`), then `[DONE]`; with an
    /// SSE comment, an `event:` line and CRLF line ends in one place.
    const STREAM: &[u8] = b": keep-alive\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \\\"usage\\\" world\"},\"finish_reason\":null}],\"usage\":null}\r\n\r\n\
event: message\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":288,\"total_tokens\":300}}\n\n\
data: [DONE]\n\n";

    fn scan(chunks: &[&[u8]]) -> Option<Usage> {
        let mut s = SseScanner::new();
        for c in chunks {
            s.feed(c);
        }
        s.finish();
        s.usage()
    }

    const WANT: Usage = Usage { total: 300, prompt: Some(12), completion: Some(288) };

    #[test]
    fn h17_usage_in_the_final_sse_chunk_is_found_whole() {
        assert_eq!(scan(&[STREAM]), Some(WANT));
    }

    #[test]
    fn h17_usage_is_found_with_the_stream_split_at_every_byte_boundary() {
        for cut in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(scan(&[a, b]), Some(WANT), "split at {cut}");
        }
        // And every pair of split points (three chunks) from the start of
        // the last content event on, exhaustively: both cuts inside the
        // lines that decide the answer.
        let from = STREAM.len() - 260;
        for i in from..=STREAM.len() {
            for j in i..=STREAM.len() {
                let (a, rest) = STREAM.split_at(i);
                let (b, c) = rest.split_at(j - i);
                assert_eq!(scan(&[a, b, c]), Some(WANT), "split at {i} and {j}");
            }
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(scan(&bytes), Some(WANT));
    }

    #[test]
    fn a_stream_without_usage_reports_nothing() {
        let text = String::from_utf8_lossy(STREAM).replace(
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":288,\"total_tokens\":300}}\n\n",
            "",
        );
        assert_eq!(scan(&[text.as_bytes()]), None);
    }

    #[test]
    fn a_final_event_without_its_blank_line_still_counts_and_cr_alone_ends_lines() {
        assert_eq!(scan(&[b"data: {\"usage\":{\"total_tokens\":7}}"]).map(|u| u.total), Some(7));
        assert_eq!(scan(&[b"data: {\"usage\":{\"total_tokens\":8}}\r\rdata: [DONE]\r\r"]).map(|u| u.total), Some(8));
        // Multi-line data is joined by newlines (valid JSON whitespace).
        assert_eq!(scan(&[b"data: {\"usage\":\ndata: {\"total_tokens\":9}}\n\n"]).map(|u| u.total), Some(9));
    }

    #[test]
    fn memory_stays_bounded_and_overlong_lines_are_skipped() {
        let mut s = SseScanner::new();
        let junk = vec![b'x'; 4096];
        s.feed(b"data: {\"pad\":\"");
        for _ in 0..64 {
            s.feed(&junk);
            assert!(s.line.len() <= MAX_LINE && s.data.len() <= MAX_LINE);
        }
        s.feed(b"\",\"usage\":{\"total_tokens\":5}}\n\n");
        assert_eq!(s.usage(), None, "an event longer than MAX_LINE is skipped");
        s.feed(b"data: {\"usage\":{\"total_tokens\":6}}\n\n");
        s.finish();
        assert_eq!(s.usage().map(|u| u.total), Some(6), "the next event is read again");
    }

    #[test]
    fn h15_negative_fractional_and_absurd_usage_is_no_usage() {
        for body in [
            &br#"{"usage":{"total_tokens":-5}}"#[..],
            br#"{"usage":{"total_tokens":2.5}}"#,
            br#"{"usage":{"total_tokens":"300"}}"#,
            br#"{"usage":{"total_tokens":1e30}}"#,
            br#"{"usage":{"total_tokens":1000000001}}"#,
            br#"{"usage":null}"#,
            br#"{"usage":{"prompt_tokens":1}}"#,
            b"not json",
        ] {
            assert_eq!(from_json_body(body), None, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(from_json_body(br#"{"usage":{"prompt_tokens":10,"completion_tokens":5}}"#).map(|u| u.total), Some(15));
        assert_eq!(from_json_body(br#"{"usage":{"total_tokens":0}}"#).map(|u| u.total), Some(0));
        assert_eq!(from_header(b" 42 "), Some(42));
        for h in [&b"-1"[..], b"4.2", b"", b"12a", b"99999999999999", b"\xff"] {
            assert_eq!(from_header(h), None, "{h:?}");
        }
    }
}
