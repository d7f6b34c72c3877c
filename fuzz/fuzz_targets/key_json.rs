//! `proxy::key::from_json` on an arbitrary body at two pointers: never panics, and any
//! key it accepts is 1..=255 bytes of visible ASCII (the default policy).
#![no_main]

use bytes::Bytes;
use idemgate::config::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::from(data.to_vec());
    let policy = Policy::default();
    for pointer in ["/id", "/data/object/id"] {
        if let Ok(Some(k)) = idemgate::proxy::key::from_json(&body, pointer, &policy) {
            assert!(!k.is_empty(), "empty key accepted at {pointer}");
            assert!(
                (1..=255).contains(&k.len()),
                "key of {} bytes accepted at {pointer}",
                k.len()
            );
            assert!(
                k.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "key with non-visible-ASCII byte accepted at {pointer}: {k:?}"
            );
        }
    }
});
