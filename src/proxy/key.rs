//! Stage 2: the idempotency key, from a header or from the JSON body, validated
//! (SPEC §3 step 2). A Structured Field string (`"abc"`) is unquoted first.

use bytes::Bytes;
use http::{HeaderMap, HeaderName};

use crate::config::Policy;
use crate::error::ProxyError;

/// The key from `name`, `Ok(None)` when absent.
pub fn from_header(
    headers: &HeaderMap,
    name: &HeaderName,
    policy: &Policy,
) -> Result<Option<String>, ProxyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ProxyError::KeyInvalid(format!(
            "the {name} header was sent more than once"
        )));
    }
    let raw = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ProxyError::KeyInvalid(format!("the {name} header is not visible ASCII")))?;
    let key = unquote(raw.trim()).ok_or_else(|| {
        ProxyError::KeyInvalid(format!(
            "the {name} header is a malformed structured-field string"
        ))
    })?;
    validate(key, policy).map(Some)
}

/// serde_json's own nesting limit; a body deeper than this cannot be searched.
const MAX_JSON_DEPTH: usize = 128;

/// The key at `pointer` in a JSON body; `Ok(None)` when the body is not JSON or has no
/// such member. Strings are taken as they are, numbers by their exact text as sent
/// (`18446744073709551617` and `1e400` stay themselves; no float round trip). A body
/// nested too deep to parse is refused rather than taken as keyless, so an optional
/// route cannot be made to run a duplicate by padding the body.
pub fn from_json(
    body: &Bytes,
    pointer: &str,
    policy: &Policy,
) -> Result<Option<String>, ProxyError> {
    let doc = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(doc) => doc,
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            return Err(ProxyError::KeyInvalid(format!(
                "the JSON body is nested deeper than {MAX_JSON_DEPTH} levels, so the key at {pointer} cannot be read"
            )))
        }
        Err(_) => return Ok(None),
    };
    let key = match doc.pointer(pointer) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.as_str().to_string(),
        Some(_) => {
            return Err(ProxyError::KeyInvalid(format!(
                "the body member at {pointer} must be a string or a number"
            )))
        }
    };
    validate(key, policy).map(Some)
}

/// RFC 8941 sf-string: `"` chars `"` with `\"` and `\\` escapes. Bare tokens pass as-is.
fn unquote(raw: &str) -> Option<String> {
    let Some(inner) = raw.strip_prefix('"') else {
        return Some(raw.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn validate(key: String, policy: &Policy) -> Result<String, ProxyError> {
    if key.is_empty() {
        return Err(ProxyError::KeyInvalid(
            "the idempotency key is empty".into(),
        ));
    }
    if let Some(bad) = key.chars().find(|c| !('\x21'..='\x7e').contains(c)) {
        return Err(ProxyError::KeyInvalid(format!(
            "the idempotency key may only hold visible ASCII (0x21-0x7E), found {bad:?}"
        )));
    }
    let len = key.len();
    if len < policy.min_key_length || len > policy.max_key_length {
        return Err(ProxyError::KeyInvalid(format!(
            "the idempotency key is {len} characters long; it must be {}..={}",
            policy.min_key_length, policy.max_key_length
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(value: &str) -> Result<Option<String>, ProxyError> {
        let mut h = HeaderMap::new();
        h.insert("idempotency-key", value.parse().unwrap()); // ok: test
        from_header(
            &h,
            &HeaderName::from_static("idempotency-key"),
            &Policy::default(),
        )
    }

    #[test]
    fn sf_string_and_token_are_one_key() {
        assert_eq!(key("\"abc\"").unwrap(), Some("abc".into())); // ok: test
        assert_eq!(key("abc").unwrap(), Some("abc".into())); // ok: test
        assert_eq!(key("\"a\\\"b\"").unwrap(), Some("a\"b".into())); // ok: test
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(key("\"\"").is_err());
        assert!(key("\"abc").is_err());
        assert!(key("a b").is_err());
        assert!(key(&"k".repeat(256)).is_err());
    }

    fn json_key(body: &str) -> Result<Option<String>, ProxyError> {
        from_json(&Bytes::from(body.to_string()), "/id", &Policy::default())
    }

    #[test]
    fn json_numbers_keep_their_exact_text() {
        let a = json_key(r#"{"id":18446744073709551616}"#).unwrap(); // ok: test
        let b = json_key(r#"{"id":18446744073709551617}"#).unwrap(); // ok: test
        assert_eq!(a.as_deref(), Some("18446744073709551616"));
        assert_eq!(b.as_deref(), Some("18446744073709551617"));
        assert_eq!(json_key(r#"{"id":1e400}"#).unwrap().as_deref(), Some("1e400")); // ok: test
        assert_eq!(json_key(r#"{"id":1.50}"#).unwrap().as_deref(), Some("1.50")); // ok: test
    }

    #[test]
    fn json_too_deep_is_refused_not_absent() {
        let deep = format!(r#"{{"id":"evt_1","x":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        let err = json_key(&deep).unwrap_err(); // ok: test
        assert!(err.to_string().contains("nested deeper than 128"), "{err}");
        assert_eq!(json_key("not json").unwrap(), None); // ok: test
        assert_eq!(json_key(r#"{"other":1}"#).unwrap(), None); // ok: test
    }
}
