//! Decoding of the proxy-wasm header-map wire format, written here so that a
//! header name or value that is not UTF-8 can never panic the VM (the SDK's
//! own decoder unwraps `String::from_utf8` on names).
//!
//! Format: u32 count, then `count` pairs of (u32 name length, u32 value
//! length), then each name and value followed by a NUL byte. All integers
//! little-endian.

/// Borrowed (name, value) pairs; `None` when the buffer is inconsistent.
pub fn decode(buf: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if buf.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(buf, 0)? as usize;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    if data > buf.len() {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let sizes = 4 + i * 8;
        let name_len = read_u32(buf, sizes)? as usize;
        let value_len = read_u32(buf, sizes + 4)? as usize;
        let name = buf.get(data..data.checked_add(name_len)?)?;
        data = data.checked_add(name_len)?.checked_add(1)?;
        let value = buf.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len)?.checked_add(1)?;
        out.push((name, value));
    }
    Some(out)
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([*b.first()?, *b.get(1)?, *b.get(2)?, *b.get(3)?]))
}

/// The inverse of [`decode`]: local replies, tests and the fuzz targets use
/// it. Lengths beyond u32 (never seen in headers) are clamped rather than wrapped.
pub fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = len(pairs.len()).to_vec();
    for (n, v) in pairs {
        out.extend_from_slice(&len(n.len()));
        out.extend_from_slice(&len(v.len()));
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_non_utf8_bytes() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/v1/x"), (b"x-tenant-id", b"\xff\x80"), (b"\xc3", b"")];
        let buf = encode(&pairs);
        assert_eq!(decode(&buf).unwrap(), pairs);
        assert_eq!(decode(&[]).unwrap(), Vec::<(&[u8], &[u8])>::new());
    }

    #[test]
    fn truncated_or_lying_buffers_are_rejected_not_panicked_on() {
        let buf = encode(&[(b"a", b"bc")]);
        for cut in 0..buf.len() - 1 {
            if cut == 0 {
                continue;
            }
            assert!(decode(&buf[..cut]).is_none(), "cut {cut}");
        }
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
        let mut lying = buf.clone();
        lying[4] = 200;
        assert!(decode(&lying).is_none());
    }
}
