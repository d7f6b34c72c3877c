//! Stage 2: the idempotency key, from a header or from the JSON body, validated
//! (SPEC §3 step 2). A Structured Field string (`"abc"`) is unquoted first.

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use serde_json::value::RawValue;

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

/// The key at `pointer` in a JSON body; `Ok(None)` when the body is not JSON or has no
/// such member. Strings are taken as they are, numbers by their exact text as sent
/// (`18446744073709551617` and `1e400` stay themselves; no float round trip). Only the
/// members on the pointer's path are decoded, each level as raw text, so no nesting
/// elsewhere in the body can hide the key; a member named twice on the path is refused,
/// since the upstream might read the other one.
pub fn from_json(
    body: &Bytes,
    pointer: &str,
    policy: &Policy,
) -> Result<Option<String>, ProxyError> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(None);
    };
    let Ok(mut raw) = serde_json::from_str::<&RawValue>(text) else {
        return Ok(None);
    };
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        match member(raw, &token)? {
            Some(next) => raw = next,
            None => return Ok(None),
        }
    }
    let key = match raw.get().as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(raw.get()).map_err(|_| not_scalar(pointer))?,
        Some(b'-' | b'0'..=b'9') => raw.get().to_string(),
        Some(b'n') => return Ok(None),
        _ => return Err(not_scalar(pointer)),
    };
    validate(key, policy).map(Some)
}

fn not_scalar(pointer: &str) -> ProxyError {
    ProxyError::KeyInvalid(format!(
        "the body member at {pointer} must be a string or a number"
    ))
}

/// One step of a JSON pointer: an object member or an array index, as raw JSON.
fn member<'a>(raw: &'a RawValue, token: &str) -> Result<Option<&'a RawValue>, ProxyError> {
    match raw.get().as_bytes().first() {
        Some(b'{') => {
            let mut seen = None;
            let pick = Pick {
                name: token,
                found: &mut seen,
            };
            let mut de = serde_json::Deserializer::from_str(raw.get());
            match serde::de::DeserializeSeed::deserialize(pick, &mut de) {
                Ok(()) => Ok(seen),
                Err(e) if e.to_string().starts_with("duplicate member") => {
                    Err(ProxyError::KeyInvalid(format!(
                        "the JSON body names the member {token:?} more than once"
                    )))
                }
                Err(_) => Ok(None),
            }
        }
        Some(b'[') => {
            let valid_index = token == "0" || !token.starts_with('0');
            let Some(i) = token.parse::<usize>().ok().filter(|_| valid_index) else {
                return Ok(None);
            };
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).unwrap_or_default();
            Ok(items.get(i).copied())
        }
        _ => Ok(None),
    }
}

/// Walks an object's members as raw text, keeping the one named `name`.
struct Pick<'n, 'f, 'a> {
    name: &'n str,
    found: &'f mut Option<&'a RawValue>,
}

impl<'de, 'n, 'f> serde::de::DeserializeSeed<'de> for Pick<'n, 'f, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'n, 'f> serde::de::Visitor<'de> for Pick<'n, 'f, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value: &'de RawValue = map.next_value()?;
            if name == self.name {
                if self.found.is_some() {
                    return Err(serde::de::Error::custom("duplicate member"));
                }
                *self.found = Some(value);
            }
        }
        Ok(())
    }
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
        let exp = json_key(r#"{"id":1e400}"#).unwrap(); // ok: test
        let frac = json_key(r#"{"id":1.50}"#).unwrap(); // ok: test
        assert_eq!(exp.as_deref(), Some("1e400"));
        assert_eq!(frac.as_deref(), Some("1.50"));
    }

    #[test]
    fn deep_nesting_beside_the_key_cannot_hide_it() {
        let deep = format!(
            r#"{{"x":{}1{},"id":"evt_1"}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(json_key(&deep).unwrap().as_deref(), Some("evt_1")); // ok: test
        assert_eq!(json_key("not json").unwrap(), None); // ok: test
        assert_eq!(json_key(r#"{"other":1}"#).unwrap(), None); // ok: test
        assert_eq!(json_key(r#"{"id":null}"#).unwrap(), None); // ok: test
        assert!(json_key(r#"{"id":"a","id":"b"}"#).is_err());
        assert!(json_key(r#"{"id":{"a":1}}"#).is_err());
        let nested = from_json(
            &Bytes::from_static(br#"{"data":[{"a/b":{"id":"k1"}}]}"#),
            "/data/0/a~1b/id",
            &Policy::default(),
        );
        assert_eq!(nested.unwrap().as_deref(), Some("k1")); // ok: test
    }
}
