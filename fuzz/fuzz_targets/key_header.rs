//! `proxy::key::from_header` on an arbitrary `Idempotency-Key` value: never panics, and
//! any key it accepts is 1..=255 bytes of visible ASCII (the default policy).
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use idemgate::config::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let name = HeaderName::from_static("idempotency-key");
    let mut headers = HeaderMap::new();
    headers.insert(name.clone(), value);
    if let Ok(Some(k)) = idemgate::proxy::key::from_header(&headers, &name, &Policy::default()) {
        assert!(!k.is_empty(), "empty key accepted");
        assert!((1..=255).contains(&k.len()), "key of {} bytes accepted", k.len());
        assert!(
            k.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "key with non-visible-ASCII byte accepted: {k:?}"
        );
    }
});
