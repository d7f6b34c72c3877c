//! No container engine runs here, so the deploy files are checked by reading them: every
//! YAML document parses, the pieces an operator relies on are present and agree with each
//! other (ports, probes, grace periods, mounted paths), and every config they mount or
//! bake in passes `idemgate check` (the real binary).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use idemgate::config::{Backend, Config};
use yaml_rust2::{Yaml, YamlLoader};

/// The config path every deploy file runs idemgate with.
const CONFIG_PATH: &str = "/etc/idemgate/proxy.toml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

/// Files under `dir` whose extension is one of `exts`, leaving out `deploy/profiles`
/// (its own tests cover it).
fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let profiles = deploy("profiles");
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path != profiles {
                    stack.push(path);
                }
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn strs(y: &Yaml) -> Vec<&str> {
    y.as_vec()
        .unwrap_or_else(|| panic!("not a list: {y:?}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("not a string: {s:?}")))
        .collect()
}

/// The value following `flag` in an argument list.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1))
        .copied()
}

/// Runs `idemgate check --config PATH` and insists on exit 0.
fn check(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} fails idemgate check ({}):\n{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `idemgate::config::load` and `idemgate check` on one file.
fn load_and_check(path: &Path) -> Config {
    assert!(path.is_file(), "{} does not exist", path.display());
    check(path);
    idemgate::config::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn port_of(url: &http::Uri) -> u16 {
    url.port_u16().unwrap_or(match url.scheme_str() {
        Some("https") => 443,
        _ => 80,
    })
}

/// The number of a Kubernetes port reference: an integer, or a named port of `container`.
fn container_port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = port.as_str().unwrap_or_else(|| panic!("bad port {port:?}"));
    container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_i64()
        .unwrap()
}

/// Every key of `wanted` is in `labels` with the same value.
fn selects(wanted: &Yaml, labels: &Yaml) -> bool {
    let wanted = wanted.as_hash().expect("selector is a map");
    !wanted.is_empty()
        && wanted
            .iter()
            .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
}

#[test]
fn every_yaml_file_parses() {
    let files = files_under(&deploy(""), &["yaml", "yml"]);
    assert!(files.len() >= 2, "compose and kubernetes: {files:?}");
    for file in &files {
        let docs = yaml_docs(file);
        assert!(!docs.is_empty(), "{}: no documents", file.display());
        for (i, doc) in docs.iter().enumerate() {
            assert!(
                doc.as_hash().is_some(),
                "{} document {i} is not a map",
                file.display()
            );
        }
    }
}

#[test]
fn kubernetes_sidecar_has_probes_drain_hardening_and_a_valid_config() {
    let docs: Vec<Yaml> = files_under(&deploy("kubernetes"), &["yaml", "yml"])
        .iter()
        .flat_map(|f| yaml_docs(f))
        .collect();
    for doc in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(doc[key].as_str().is_some(), "{key} missing: {doc:?}");
        }
        assert!(doc["metadata"]["name"].as_str().is_some(), "unnamed object");
    }
    let object = |kind: &str, name: Option<&str>| {
        docs.iter()
            .find(|d| {
                d["kind"].as_str() == Some(kind)
                    && name.is_none_or(|n| d["metadata"]["name"].as_str() == Some(n))
            })
            .unwrap_or_else(|| panic!("no {kind} {name:?}"))
    };

    let deployment = object("Deployment", None);
    let template = &deployment["spec"]["template"];
    let pod = &template["spec"];
    assert!(
        selects(
            &deployment["spec"]["selector"]["matchLabels"],
            &template["metadata"]["labels"]
        ),
        "the Deployment's selector must match its pod labels"
    );
    let containers = pod["containers"].as_vec().unwrap();
    assert!(containers.len() >= 2, "the app and the sidecar");
    let sidecar = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("idemgate"))
        .expect("a container named idemgate");

    // The config: --config -> volumeMount -> volume -> ConfigMap key.
    let args = strs(&sidecar["args"]);
    let config_path = Path::new(flag_value(&args, "--config").expect("--config"));
    assert_eq!(config_path, Path::new(CONFIG_PATH));
    let mount = sidecar["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the config's directory is mounted");
    let volume = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let config_map = object("ConfigMap", volume["configMap"]["name"].as_str());
    let file_name = config_path.file_name().unwrap().to_str().unwrap();
    let toml = config_map["data"][file_name]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap has no {file_name}"));
    let config =
        idemgate::config::parse(toml).unwrap_or_else(|e| panic!("ConfigMap {file_name}: {e:?}"));
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    check(file.path());

    // Ports: the container exposes what the config listens on; probes hit the admin port.
    let admin = config.server.admin_listen.expect("admin_listen is set");
    assert!(
        admin.ip().is_unspecified() && config.server.listen.ip().is_unspecified(),
        "the kubelet and the Service reach the pod IP: listen on 0.0.0.0"
    );
    let ports: Vec<i64> = sidecar["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    for port in [config.server.listen.port(), admin.port()] {
        assert!(ports.contains(&i64::from(port)), "{port} not in {ports:?}");
    }
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            container_port(sidecar, &get["port"]),
            i64::from(admin.port()),
            "{probe} must hit admin_listen"
        );
    }

    // The upstream is the app container in the same pod.
    let upstream = &config.upstream.url;
    assert!(
        matches!(upstream.host(), Some("127.0.0.1" | "localhost")),
        "{upstream}"
    );
    let app_ports: Vec<i64> = containers
        .iter()
        .filter(|c| c["name"] != sidecar["name"])
        .flat_map(|c| c["ports"].as_vec().cloned().unwrap_or_default())
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert!(
        app_ports.contains(&i64::from(port_of(upstream))),
        "upstream {upstream} is not an app container port {app_ports:?}"
    );

    // Drain: preStop pause, then SIGTERM and shutdown_grace, all inside the pod's grace.
    let pre_stop = &sidecar["lifecycle"]["preStop"];
    assert!(!pre_stop.is_badvalue(), "no preStop");
    let pause = if let Some(seconds) = pre_stop["sleep"]["seconds"].as_i64() {
        seconds
    } else {
        let command = strs(&pre_stop["exec"]["command"]);
        assert_eq!(command.first(), Some(&"sleep"), "{command:?}");
        command[1].parse().unwrap()
    };
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace as u64) > config.server.shutdown_grace,
        "terminationGracePeriodSeconds {grace} must exceed shutdown_grace"
    );
    assert!(
        Duration::from_secs((grace - pause) as u64) > config.server.shutdown_grace,
        "terminationGracePeriodSeconds {grace} must exceed shutdown_grace plus the preStop pause {pause}s"
    );

    // Hardening and resources.
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    if let Some(uid) = security["runAsUser"].as_i64() {
        assert_ne!(uid, 0);
    }
    for container in containers {
        for kind in ["requests", "limits"] {
            assert!(
                container["resources"][kind]["memory"].as_str().is_some(),
                "{:?} has no memory {kind}",
                container["name"]
            );
        }
    }
    if config.store.backend == Backend::Memory {
        assert_eq!(
            deployment["spec"]["replicas"].as_i64().unwrap_or(1),
            1,
            "the memory store is per pod: one replica"
        );
    }

    // The Service sends clients to the proxy, not around it.
    let service = object("Service", None);
    assert!(
        selects(
            &service["spec"]["selector"],
            &template["metadata"]["labels"]
        ),
        "the Service must select the Deployment's pods"
    );
    let targets: Vec<i64> = service["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| container_port(sidecar, &p["targetPort"]))
        .collect();
    assert_eq!(targets, [i64::from(config.server.listen.port())]);
}

#[test]
fn compose_mounts_a_valid_config_and_checks_health() {
    let docs = yaml_docs(&deploy("compose.yaml"));
    assert_eq!(docs.len(), 1);
    let services = &docs[0]["services"];
    let sidecar = &services["idemgate"];
    assert!(!sidecar.is_badvalue(), "no idemgate service");

    // Built from the Dockerfile, with the repository root as context.
    let context = deploy(sidecar["build"]["context"].as_str().unwrap());
    let dockerfile = sidecar["build"]["dockerfile"].as_str().unwrap();
    assert!(context.join(dockerfile).is_file(), "{dockerfile}");
    assert!(context.join("Cargo.lock").is_file(), "context is the root");

    // --config names the mounted file, which loads and passes check.
    let command = strs(&sidecar["command"]);
    let config_path = flag_value(&command, "--config").expect("--config");
    assert_eq!(config_path, CONFIG_PATH);
    let source = strs(&sidecar["volumes"])
        .into_iter()
        .find_map(|v| {
            let mut parts = v.split(':');
            let source = parts.next()?;
            (parts.next()? == config_path).then_some(source)
        })
        .expect("a volume mounting the config");
    let config = load_and_check(&deploy(source));

    // The upstream is another service, on a port it opens.
    let upstream = &config.upstream.url;
    let host = upstream.host().unwrap();
    let api = &services[host];
    assert!(
        !api.is_badvalue() && host != "idemgate",
        "upstream {upstream} is not a compose service"
    );
    let port = port_of(upstream).to_string();
    let api_ports: Vec<&str> = ["expose", "ports"]
        .iter()
        .filter(|k| !api[**k].is_badvalue())
        .flat_map(|k| strs(&api[*k]))
        .collect();
    assert!(
        api_ports
            .iter()
            .any(|p| p.rsplit(':').next() == Some(&port)),
        "{host} does not open {port}: {api_ports:?}"
    );

    // Published ports reach the listeners; the healthcheck hits the admin port.
    let admin = config.server.admin_listen.expect("admin_listen is set");
    let published = strs(&sidecar["ports"]);
    for addr in [config.server.listen, admin] {
        assert!(
            addr.ip().is_unspecified(),
            "{addr}: unreachable from outside"
        );
        let port = addr.port().to_string();
        assert!(
            published
                .iter()
                .any(|p| p.rsplit(':').next() == Some(&port)),
            "{port} not published: {published:?}"
        );
    }
    let health = strs(&sidecar["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains(&format!(":{}/healthz", admin.port())),
        "{health}"
    );

    // Draining needs longer than compose's default 10s stop timeout.
    let stop = humantime::parse_duration(sidecar["stop_grace_period"].as_str().unwrap()).unwrap();
    assert!(
        stop > config.server.shutdown_grace,
        "stop_grace_period {stop:?} must exceed shutdown_grace"
    );
    if config.store.backend == Backend::Memory {
        assert!(
            sidecar["deploy"]["replicas"].as_i64().unwrap_or(1) == 1
                && sidecar["scale"].as_i64().unwrap_or(1) == 1,
            "the memory store is per process: one replica"
        );
        let text = std::fs::read_to_string(deploy("compose.yaml")).unwrap();
        assert!(
            text.contains("share") || text.contains("one replica"),
            "compose.yaml must say that replicas need a shared store"
        );
    }
}

/// One Dockerfile instruction: its keyword and the rest, continuation lines joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current.split_once(char::is_whitespace).unwrap();
                out.push((keyword.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "dangling continuation line");
    out
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let instructions = dockerfile_instructions(&text);
    let all = |keyword: &str| {
        instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    let froms = all("FROM");
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(froms[0].starts_with("rust:"), "{froms:?}");
    assert!(
        all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the image builds what Cargo.lock pins"
    );

    // Everything the build stage copies is in the context and not ignored.
    let ignored: Vec<String> = std::fs::read_to_string(root().join(".dockerignore"))
        .unwrap()
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        ignored.iter().any(|l| l == "target"),
        "target/ in the context"
    );
    let mut copied = Vec::new();
    for copy in all("COPY") {
        if copy.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = copy.split_whitespace().collect();
        let (dest, sources) = parts.split_last().unwrap();
        for source in sources {
            assert!(
                root().join(source).exists(),
                "COPY {source}: not in the repo"
            );
            assert!(
                !ignored.iter().any(|i| Path::new(source).starts_with(i)),
                "COPY {source}: excluded by .dockerignore"
            );
            copied.push((*source, *dest));
        }
    }

    // The runtime stage.
    let last_from = instructions.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"))
    };
    let user = last("USER").split(':').next().unwrap();
    assert!(user != "root" && user != "0", "runs as {user}");
    let entrypoint: Vec<String> = serde_json::from_str(last("ENTRYPOINT")).unwrap();
    assert_eq!(entrypoint, ["/usr/local/bin/idemgate"]);
    let cmd: Vec<String> = serde_json::from_str(last("CMD")).unwrap();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    assert_eq!(flag_value(&cmd, "--config"), Some(CONFIG_PATH));
    let exposed: Vec<u16> = all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert!(
        exposed.contains(&8080) && exposed.contains(&9090),
        "{exposed:?}"
    );

    // The config baked in at --config passes check and matches EXPOSE and HEALTHCHECK.
    let (baked, _) = copied
        .iter()
        .find(|(_, dest)| *dest == CONFIG_PATH)
        .expect("a default config at --config");
    let config = load_and_check(&root().join(baked));
    let admin = config.server.admin_listen.expect("admin_listen is set");
    for port in [config.server.listen.port(), admin.port()] {
        assert!(exposed.contains(&port), "{port} not exposed");
    }
    assert!(config.server.listen.ip().is_unspecified());
    let health = last("HEALTHCHECK");
    assert!(
        health.contains(&format!(":{}/healthz", admin.port())),
        "{health}"
    );
}

#[test]
fn systemd_unit_parses_reloads_with_hup_and_is_hardened() {
    let text = std::fs::read_to_string(deploy("systemd/idemgate.service")).unwrap();
    let mut section = String::new();
    let mut sections = Vec::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            sections.push(section.clone());
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        assert!(!section.is_empty(), "line {}: key outside a section", n + 1);
        assert!(
            !k.trim().is_empty() && !k.contains(char::is_whitespace),
            "line {}: bad key {k:?}",
            n + 1
        );
        assert!(!v.ends_with('\\'), "line {}: continuation line", n + 1);
        keys.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    assert_eq!(sections, ["Unit", "Service", "Install"]);
    let get = |s: &str, k: &str| {
        keys.iter()
            .find(|(sec, key, _)| sec == s && key == k)
            .map(|(_, _, v)| v.as_str())
            .unwrap_or_else(|| panic!("[{s}] {k} missing"))
    };
    let service = |k: &str| get("Service", k);

    assert!(matches!(service("Type"), "simple" | "exec"));
    let exec: Vec<&str> = service("ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], "/usr/local/bin/idemgate");
    let config_path = flag_value(&exec, "--config").expect("--config");
    assert_eq!(config_path, CONFIG_PATH);
    let reload = service("ExecReload");
    assert!(
        reload.contains("kill") && reload.contains("-HUP") && reload.contains("$MAINPID"),
        "{reload}"
    );
    assert_eq!(service("KillSignal"), "SIGTERM");
    assert_eq!(service("Restart"), "on-failure");
    assert_eq!(service("DynamicUser"), "yes");
    assert!(service("Environment").contains("RUST_LOG="));
    assert!(!get("Install", "WantedBy").is_empty());

    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(service(key), "yes", "{key}");
    }
    assert_eq!(service("ProtectSystem"), "strict");
    let families: Vec<&str> = service("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    assert!(service("SystemCallFilter").contains("@system-service"));
    assert_eq!(service("CapabilityBoundingSet"), "", "no capabilities");
    assert_eq!(service("AmbientCapabilities"), "", "no capabilities");

    // The config it expects ships beside it and fits the unit.
    let name = Path::new(config_path)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let config = load_and_check(&deploy("systemd").join(name));
    let stop = service("TimeoutStopSec");
    let stop = stop
        .parse::<u64>()
        .map(Duration::from_secs)
        .unwrap_or_else(|_| humantime::parse_duration(stop).unwrap());
    assert!(
        stop > config.server.shutdown_grace,
        "TimeoutStopSec {stop:?} must exceed shutdown_grace"
    );
    let listeners: Vec<SocketAddr> = std::iter::once(config.server.listen)
        .chain(config.server.admin_listen)
        .collect();
    for addr in listeners {
        assert!(
            addr.port() >= 1024,
            "{addr}: a privileged port needs CAP_NET_BIND_SERVICE, which the unit drops"
        );
    }
}

#[test]
fn every_deploy_config_passes_check() {
    let configs = files_under(&deploy(""), &["toml"]);
    assert!(
        configs.len() >= 3,
        "compose, image and systemd configs: {configs:?}"
    );
    for config in &configs {
        check(config);
    }
}
