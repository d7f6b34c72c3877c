//! `proxy::fingerprint::canonical_json`: never panics, is deterministic, and for a body
//! that is JSON, canonicalising the canonical form again changes nothing.
#![no_main]

use bytes::Bytes;
use idemgate::proxy::fingerprint::canonical_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::from(data.to_vec());
    let first = canonical_json(&body);
    let second = canonical_json(&body);
    assert_eq!(first, second, "canonical_json is not deterministic");
    if serde_json::from_slice::<serde_json::Value>(data).is_ok() {
        let again = canonical_json(&Bytes::from(first.clone()));
        assert!(
            again == first,
            "canonical form is not a fixed point:\n  once:  {:?}\n  twice: {:?}",
            String::from_utf8_lossy(&first),
            String::from_utf8_lossy(&again)
        );
    }
});
