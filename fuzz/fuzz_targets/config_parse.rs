//! `config::parse` on arbitrary UTF-8: never panics, and a refusal always carries at
//! least one error, each with a non-empty message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = idemgate::config::parse(text) {
        assert!(!errors.is_empty(), "parse failed with no errors");
        for e in &errors {
            assert!(!e.to_string().is_empty(), "empty error message: {e:?}");
        }
    }
});
