//! No container engine runs here, so the deploy files are checked by reading them: every
//! YAML parses, the pieces an operator relies on are present, and every config they
//! mount passes `idemgate check`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn yaml(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn check(path: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} fails idemgate check:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_sidecar_has_probes_drain_and_a_valid_config() {
    let docs = yaml("kubernetes/idemgate-sidecar.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let config_map = kind("ConfigMap");
    let toml = config_map["data"]["proxy.toml"].as_str().unwrap();
    let config =
        idemgate::config::parse(toml).unwrap_or_else(|e| panic!("ConfigMap proxy.toml: {e:?}"));

    let pod = &kind("Deployment")["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().unwrap();
    assert!(containers.len() >= 2, "the app and the sidecar");
    let sidecar = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("idemgate"))
        .unwrap();
    assert_eq!(
        sidecar["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        sidecar["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert!(!sidecar["lifecycle"]["preStop"].is_badvalue(), "no preStop");
    assert_eq!(
        sidecar["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        sidecar["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let mount = &sidecar["volumeMounts"][0]["mountPath"];
    let args: Vec<&str> = sidecar["args"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        args.contains(&format!("{}/proxy.toml", mount.as_str().unwrap()).as_str()),
        "{args:?}"
    );
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        Duration::from_secs(grace as u64) > config.server.shutdown_grace + Duration::from_secs(5),
        "termination grace {grace}s must exceed shutdown_grace plus the preStop pause"
    );
    let admin = config.server.admin_listen.unwrap();
    assert!(
        admin.ip().is_unspecified(),
        "probes come from the kubelet: admin must listen on 0.0.0.0"
    );
    assert_eq!(
        kind("Service")["spec"]["ports"][0]["targetPort"].as_str(),
        Some("proxy")
    );
}

#[test]
fn compose_mounts_a_valid_config_and_checks_health() {
    let docs = yaml("compose.yaml");
    let services = &docs[0]["services"];
    assert!(!services["api"].is_badvalue());
    let sidecar = &services["idemgate"];
    assert_eq!(
        sidecar["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    let volume = sidecar["volumes"][0].as_str().unwrap();
    let source = volume.split(':').next().unwrap();
    check(&deploy(source));
    let health: Vec<&str> = sidecar["healthcheck"]["test"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(health.iter().any(|p| p.ends_with("/healthz")), "{health:?}");
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("no USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    let health = lines
        .iter()
        .position(|l| l.starts_with("HEALTHCHECK"))
        .expect("no HEALTHCHECK");
    assert!(lines[health..].join("\n").contains("/healthz"));
    assert!(
        lines.iter().any(|l| l.contains("--locked")),
        "the image builds what Cargo.lock pins"
    );
    check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml.example"));
}

#[test]
fn systemd_unit_parses_reloads_with_hup_and_is_hardened() {
    let text = std::fs::read_to_string(deploy("systemd/idemgate.service")).unwrap();
    let mut section = String::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        assert!(!section.is_empty(), "line {}: key outside a section", n + 1);
        keys.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    let get = |s: &str, k: &str| {
        keys.iter()
            .find(|(sec, key, _)| sec == s && key == k)
            .map(|(_, _, v)| v.as_str())
    };
    for s in ["Unit", "Service", "Install"] {
        assert!(keys.iter().any(|(sec, _, _)| sec == s), "no [{s}]");
    }
    let exec = get("Service", "ExecStart").unwrap();
    assert!(
        exec.contains("idemgate --config /etc/idemgate/proxy.toml"),
        "{exec}"
    );
    assert!(get("Service", "ExecReload").unwrap().contains("-HUP"));
    for key in [
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "DynamicUser",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "RestrictAddressFamilies",
    ] {
        assert!(get("Service", key).is_some(), "hardening key {key} missing");
    }
    check(&deploy("systemd/proxy.toml"));
}

#[test]
fn every_deploy_config_passes_check() {
    let mut found = 0;
    let mut stack = vec![deploy("")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.ends_with("profiles") {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                check(&path);
                found += 1;
            }
        }
    }
    assert!(found >= 2, "no deploy configs found");
}
