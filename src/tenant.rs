//! Tenant identification from the request's header values.

use sluice_wire::{is_tenant_byte, MAX_TENANT_LEN};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantError {
    /// Header absent, empty or only whitespace: 401 `missing_tenant`.
    Missing,
    /// Present but unusable: 400 `invalid_tenant`, with the reason.
    Invalid(&'static str),
}

/// Picks the tenant id out of every value the tenant header arrived with.
///
/// A header given twice is rejected rather than resolved: picking either
/// value would let a client choose whose quota it spends. Surrounding
/// optional whitespace (RFC 9110 OWS) is trimmed; anything else outside the
/// safe set is rejected, never rewritten, so two different raw ids can never
/// map to one tenant.
pub fn extract<'a>(values: &[&'a [u8]]) -> Result<&'a str, TenantError> {
    let value = match values {
        [] => return Err(TenantError::Missing),
        [one] => *one,
        _ => {
            return if values.iter().all(|v| trim(v).is_empty()) {
                Err(TenantError::Missing)
            } else {
                Err(TenantError::Invalid("the tenant header was given more than once"))
            }
        }
    };
    let id = trim(value);
    if id.is_empty() {
        return Err(TenantError::Missing);
    }
    if id.len() > MAX_TENANT_LEN {
        return Err(TenantError::Invalid("the tenant id is longer than 128 bytes"));
    }
    if !id.iter().all(|b| is_tenant_byte(*b)) {
        return Err(TenantError::Invalid(
            "the tenant id may only contain A-Z a-z 0-9 . _ - : @",
        ));
    }
    // Every byte is ASCII, so this can not fail.
    std::str::from_utf8(id).map_err(|_| TenantError::Invalid("the tenant id is not ASCII"))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t')).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(start, |e| e + 1);
    v.get(start..end).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h09_missing_empty_and_blank_tenants_are_missing() {
        assert_eq!(extract(&[]), Err(TenantError::Missing));
        assert_eq!(extract(&[b""]), Err(TenantError::Missing));
        assert_eq!(extract(&[b"   \t "]), Err(TenantError::Missing));
        assert_eq!(extract(&[b"", b" "]), Err(TenantError::Missing));
    }

    #[test]
    fn h09_a_tenant_header_given_twice_is_invalid_never_joined() {
        assert!(matches!(extract(&[b"a", b"b"]), Err(TenantError::Invalid(_))));
        assert!(matches!(extract(&[b"a", b"a"]), Err(TenantError::Invalid(_))));
        assert!(matches!(extract(&[b"a,b"]), Err(TenantError::Invalid(_))));
    }

    #[test]
    fn h10_non_ascii_invalid_utf8_and_encoded_ids_are_rejected() {
        for raw in [&b"caf\xc3\xa9"[..], b"\x80\xff", b"\xc3", b"acme%20corp", b"a\x00b", b"a\x7fb", b"{acme}"] {
            assert!(matches!(extract(&[raw]), Err(TenantError::Invalid(_))), "{raw:?}");
        }
    }

    #[test]
    fn tenant_length_limit_is_128_bytes() {
        let ok = [b'a'; 128];
        let long = [b'a'; 129];
        assert_eq!(extract(&[&ok[..]]).map(str::len), Ok(128));
        assert!(matches!(extract(&[&long[..]]), Err(TenantError::Invalid(_))));
    }

    #[test]
    fn surrounding_whitespace_is_trimmed() {
        assert_eq!(extract(&[b"  acme-1 "]), Ok("acme-1"));
        assert_eq!(extract(&[b"org:team@eu.prod_2"]), Ok("org:team@eu.prod_2"));
    }
}
