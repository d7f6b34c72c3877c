//! `idemgate check` against the config fixtures (SPEC §2).
//!
//! - every file in `tests/fixtures/config/valid/` must exit 0 and print "FILE: ok";
//! - every file in `tests/fixtures/config/invalid/` must exit 2, and its stderr must
//!   contain each `# expect: <substring>` given in the file's leading comment block
//!   (at least one per file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use idemgate::config::{KeySource, RateLimit};

/// Set for every run: `valid/record-api-env-token.toml` reads it through "env:NAME".
const FIXTURE_TOKEN_VAR: &str = "IDEMGATE_FIXTURE_RECORD_TOKEN";
/// Removed for every run: `invalid/record-api-unset-env-token.toml` relies on it being unset.
const UNSET_TOKEN_VAR: &str = "SOME_UNSET_VAR_XYZ";

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind)
}

/// The `.toml` files of a fixture directory, sorted; panics if there are none.
fn fixture_files(kind: &str) -> Vec<PathBuf> {
    let dir = fixtures(kind);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read fixture dir {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| match entry {
            Ok(entry) => entry.path(),
            Err(e) => panic!("cannot list {}: {e}", dir.display()),
        })
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.toml fixtures in {}: the fixture directory must not be empty",
        dir.display()
    );
    files
}

fn check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .env(FIXTURE_TOKEN_VAR, "fixture-token-from-env")
        .env_remove(UNSET_TOKEN_VAR)
        .env_remove("IDEMGATE_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run idemgate check on {}: {e}", path.display()))
}

fn describe(path: &Path, out: &Output) -> String {
    format!(
        "{}\n  exit status: {:?}\n  --- stdout ---\n{}\n  --- stderr ---\n{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `# expect:` substrings of the file's leading comment block. An `# expect:` line
/// after the block is refused so a misplaced expectation cannot be silently ignored.
fn expectations(path: &Path) -> Result<Vec<String>, String> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut lines = src.lines().enumerate();
    let mut expects = Vec::new();
    for (i, line) in lines.by_ref() {
        let line = line.trim();
        if !line.starts_with('#') {
            break;
        }
        if let Some(expect) = line.strip_prefix("# expect:") {
            let expect = expect.trim();
            if expect.is_empty() {
                return Err(format!(
                    "{}: line {}: empty `# expect:`",
                    path.display(),
                    i + 1
                ));
            }
            expects.push(expect.to_string());
        }
    }
    if let Some((i, _)) = lines.find(|(_, line)| line.trim_start().starts_with("# expect:")) {
        return Err(format!(
            "{}: line {}: `# expect:` must be in the comment block at the top of the file",
            path.display(),
            i + 1
        ));
    }
    if expects.is_empty() {
        return Err(format!(
            "{}: no `# expect: ...` line at the top of the file",
            path.display()
        ));
    }
    Ok(expects)
}

#[test]
fn valid_fixtures_pass_check() {
    let mut failures = Vec::new();
    for path in fixture_files("valid") {
        let out = check(&path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ok_line = format!("{}: ok", path.display());
        if out.status.code() != Some(0) || !stdout.contains("ok") || !stdout.contains(&ok_line) {
            failures.push(format!(
                "expected exit 0 and {ok_line:?}: {}",
                describe(&path, &out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} valid fixture(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn invalid_fixtures_fail_check_with_expected_messages() {
    let mut failures = Vec::new();
    for path in fixture_files("invalid") {
        let expects = match expectations(&path) {
            Ok(expects) => expects,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let out = check(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(2) {
            failures.push(format!("expected exit 2: {}", describe(&path, &out)));
            continue;
        }
        let missing: Vec<&String> = expects
            .iter()
            .filter(|e| !stderr.contains(e.as_str()))
            .collect();
        if !missing.is_empty() {
            failures.push(format!(
                "stderr lacks {missing:?}: {}",
                describe(&path, &out)
            ));
        }
        // Every error line names the file.
        let unnamed: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim_start().starts_with(&*path.display().to_string()))
            .collect();
        if !unnamed.is_empty() {
            failures.push(format!(
                "stderr lines not naming the file {unnamed:?}: {}",
                describe(&path, &out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} invalid fixture(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn missing_config_file_exits_2_naming_the_file() {
    let dir = fixtures("invalid");
    let path = dir.join("this-file-does-not-exist.toml");
    assert!(!path.exists(), "{} must not exist", path.display());
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&path, &out));
    assert!(
        stderr.contains(&*path.display().to_string()),
        "stderr does not name the file: {}",
        describe(&path, &out)
    );
    assert!(out.stdout.is_empty(), "{}", describe(&path, &out));
}

#[test]
fn proxy_toml_example_loads_with_the_routes_it_shows() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml.example");
    let config = match idemgate::config::load(&path) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    };

    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(
        config.server.admin_listen.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9090")
    );
    assert!(config.server.tls.is_none());
    assert_eq!(config.upstream.url.to_string(), "http://127.0.0.1:3000/");
    assert!(
        config.record_api.is_none(),
        "[record_api] is commented out in the example"
    );

    let names: Vec<&str> = config.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["create-order", "refund-order", "stripe-webhook"]);

    let idempotency_key = KeySource::Header(http::HeaderName::from_static("idempotency-key"));
    let expected: [(&str, &str, KeySource, bool); 3] = [
        ("create-order", "/v1/orders", idempotency_key.clone(), false),
        (
            "refund-order",
            "/v1/orders/{id}/refund",
            idempotency_key,
            true,
        ),
        (
            "stripe-webhook",
            "/webhooks/stripe",
            KeySource::JsonPointer("/id".into()),
            true,
        ),
    ];
    for (route, (name, path, key, required)) in config.routes.iter().zip(expected) {
        assert_eq!(&*route.name, name);
        assert_eq!(route.methods, [http::Method::POST], "{name}: methods");
        assert_eq!(route.path.as_str(), path, "{name}: path");
        assert_eq!(route.key, key, "{name}: key");
        assert_eq!(route.policy.required, required, "{name}: required");
        assert_eq!(
            route.policy.ttl,
            std::time::Duration::from_secs(24 * 3600),
            "{name}: ttl"
        );
    }

    assert!(config.routes[0].duplicate_response.is_none());
    assert!(config.routes[1].duplicate_response.is_none());
    let Some(dup) = &config.routes[2].duplicate_response else {
        panic!("stripe-webhook: duplicate_response missing");
    };
    assert_eq!(dup.status, http::StatusCode::OK);
    assert_eq!(&dup.body[..], br#"{"ok":true,"cached":true}"#);
    assert_eq!(dup.content_type, "application/json");

    // The paths the example's routes are meant to enforce are matched by them.
    let post = http::Method::POST;
    let route_name = |path: &str| config.route(&post, path).map(|r| r.name.to_string());
    assert_eq!(route_name("/v1/orders").as_deref(), Some("create-order"));
    assert_eq!(
        route_name("/v1/orders/42/refund").as_deref(),
        Some("refund-order")
    );
    assert_eq!(
        route_name("/webhooks/stripe").as_deref(),
        Some("stripe-webhook")
    );
    assert_eq!(route_name("/v1/other"), None);
}

#[test]
fn full_fixture_resolves_every_key() {
    let path = fixtures("valid").join("full.toml");
    let config = match idemgate::config::load(&path) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    };
    let Some(tls) = &config.server.tls else {
        panic!("full.toml: server.tls missing");
    };
    assert_eq!(
        tls.cert_file,
        Path::new("tests/fixtures/config/tls/tls.crt")
    );
    assert_eq!(config.store.backend, idemgate::config::Backend::Redis);
    let urls = config.store.urls.as_ref().unwrap();
    assert_eq!(urls.list(), ["redis://127.0.0.1:6379/0"]);
    assert_eq!(config.idempotency.fingerprint.len(), 5);
    assert!(config
        .idempotency
        .fingerprint
        .contains(&idemgate::config::FingerprintPart::Header(
            http::HeaderName::from_static("x-tenant")
        )));
    for status in [200, 204, 404, 409, 503] {
        let status = http::StatusCode::from_u16(status).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            config.idempotency.store_statuses.contains(status),
            "{status} should be stored"
        );
    }
    for status in [302, 500] {
        let status = http::StatusCode::from_u16(status).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !config.idempotency.store_statuses.contains(status),
            "{status} should not be stored"
        );
    }
    // A route's overrides apply to it alone.
    let refund = &config.routes[1];
    assert_eq!(
        refund.key,
        KeySource::Header(http::HeaderName::from_static("x-request-id"))
    );
    assert_eq!(refund.policy.max_key_length, 64);
    assert!(!refund.policy.required);
    assert!(config.idempotency.required);
    assert_eq!(config.routes[2].key, KeySource::JsonPointer("/id".into()));
    let Some(api) = &config.record_api else {
        panic!("full.toml: record_api missing");
    };
    let tokens: Vec<&str> = api.tokens.iter().map(|t| t.expose()).collect();
    assert_eq!(tokens, ["literal-token-0123456789"]);
    assert!(
        !format!("{api:?}").contains("literal-token"),
        "a token in Debug output"
    );
    let Some(RateLimit { count, per }) = api.rate_limit else {
        panic!("full.toml: record_api.rate_limit missing");
    };
    assert_eq!((count, per), (100, std::time::Duration::from_secs(1)));
}

#[test]
fn a_redis_password_never_appears_in_check_output_or_debug() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let toml = "[upstream]\nurl = \"http://127.0.0.1:3000\"\n[store]\nbackend = \"redis\"\nurl = [\"redis://app:hunter2-secret@10.0.0.1:6379\", \"rediss://:hunter2-secret@10.0.0.2:6380\"]\n";
    std::fs::write(&path, toml).unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&path, &out));
    assert!(stdout.contains("redis://app:***@10.0.0.1:6379"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    let config = idemgate::config::load(&path).unwrap();
    assert!(!format!("{config:?}").contains("hunter2"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, toml.replace("rediss://", "https://")).unwrap();
    let out = check(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(":***@10.0.0.2") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}
