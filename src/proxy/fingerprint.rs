//! Stage 4: who the request is (record id) and what it is (fingerprint), both blake3.
//! Every part is length-prefixed so that no two different requests hash the same input.

use bytes::Bytes;
use http::{request, HeaderMap};

use crate::config::{BodyFingerprint, FingerprintPart, Policy};
use crate::store::{Fingerprint, RecordId};

fn part(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn header_values(h: &mut blake3::Hasher, headers: &HeaderMap, name: &http::HeaderName) {
    let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
    h.update(&(values.len() as u64).to_le_bytes());
    values.iter().for_each(|v| part(h, v));
}

/// blake3(scope header values, key): tenants with different credentials never share.
pub fn record_id(policy: &Policy, headers: &HeaderMap, key: &str) -> RecordId {
    let mut h = blake3::Hasher::new();
    h.update(b"idemgate record v1");
    for name in &policy.scope_headers {
        part(&mut h, name.as_str().as_bytes());
        header_values(&mut h, headers, name);
    }
    part(&mut h, key.as_bytes());
    RecordId(*h.finalize().as_bytes())
}

pub fn fingerprint(policy: &Policy, parts: &request::Parts, body: &Bytes) -> Fingerprint {
    let mut h = blake3::Hasher::new();
    h.update(b"idemgate fingerprint v1");
    for p in &policy.fingerprint {
        match p {
            FingerprintPart::Method => part(&mut h, parts.method.as_str().as_bytes()),
            FingerprintPart::Path => part(&mut h, parts.uri.path().as_bytes()),
            FingerprintPart::Query => part(&mut h, parts.uri.query().unwrap_or("").as_bytes()),
            FingerprintPart::Header(name) => {
                part(&mut h, name.as_str().as_bytes());
                header_values(&mut h, &parts.headers, name);
            }
            FingerprintPart::Body => match policy.body_fingerprint {
                BodyFingerprint::Raw => part(&mut h, body),
                BodyFingerprint::Json => part(&mut h, &canonical_json(body)),
            },
        }
    }
    Fingerprint(*h.finalize().as_bytes())
}

/// Key order and whitespace ignored. A body that is not JSON is hashed as raw bytes.
pub fn canonical_json(body: &Bytes) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let mut out = Vec::with_capacity(body.len());
            write_canonical(&v, &mut out);
            out
        }
        Err(_) => body.to_vec(),
    }
}

fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(serde_json::Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_order_and_whitespace() {
        let a = canonical_json(&Bytes::from_static(
            br#"{"b": [1, {"y":2,"x":1}], "a": "s"}"#,
        ));
        let b = canonical_json(&Bytes::from_static(br#"{"a":"s","b":[1,{"x":1,"y":2}]}"#));
        assert_eq!(a, b);
        let c = canonical_json(&Bytes::from_static(br#"{"a":"s","b":[{"x":1,"y":2},1]}"#));
        assert_ne!(a, c);
    }
}
