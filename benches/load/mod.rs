//! The parts of the load harness: installing tools, the processes it starts, wrk runs and
//! their parsing, and the storm and memory rows.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cpu;
mod storm;
pub use cpu::{Budget, Parties};
pub use storm::storm;

pub fn ensure(cmd: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output();
    if found.map(|o| o.status.success()).unwrap_or(false) {
        return;
    }
    eprintln!("installing {package}");
    let ok = Command::new("sh")
        .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "could not install {package}: install it and run again");
}

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub port: u16,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    /// SIGTERM first, so nginx's master takes its workers down with it (a SIGKILL left
    /// them running, orphaned, after each run); SIGKILL after 5 s.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut cmd: Command, port: u16) -> Proc {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_port(port);
    Proc { port, child }
}

pub struct Nginx;

/// 1 KiB: the body of every POST, and of the upstream's `/big` answer.
pub const KIB: usize = 1024;

impl Nginx {
    fn run(dir: &Path, name: &str, conf: &str, port: u16) -> Proc {
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let path = root.join("nginx.conf");
        let temps = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("{t}_temp_path {}/{t};", root.display()))
            .collect::<String>();
        let text = format!(
            "user root; pid {r}/nginx.pid; error_log {r}/error.log warn; events {{ worker_connections 8192; }}\n{conf}",
            r = root.display()
        )
        .replace("TEMPS", &temps);
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new("nginx");
        cmd.args([
            "-p",
            root.to_str().unwrap(),
            "-c",
            path.to_str().unwrap(),
            "-g",
            "daemon off;",
        ]);
        spawn(cmd, port)
    }

    /// One worker answering 201 to anything: the API being protected.
    pub fn upstream(dir: &Path) -> Proc {
        let port = free_port();
        let big = "b".repeat(KIB);
        let conf = format!(
            "worker_processes 1;\nhttp {{ access_log off; TEMPS client_body_buffer_size 16k; keepalive_requests 10000000;
             server {{ listen 127.0.0.1:{port};
               location /big {{ return 201 '{big}'; }}
               location / {{ return 201 '{{\"id\":\"ord_1\",\"status\":\"created\"}}'; }} }} }}"
        );
        Self::run(dir, "upstream", &conf, port)
    }

    /// What idemgate replaces: nginx as a reverse proxy with a keep-alive upstream pool.
    pub fn proxy(dir: &Path, upstream: u16) -> Proc {
        let port = free_port();
        let conf = format!(
            "worker_processes auto;\nhttp {{ access_log off; TEMPS keepalive_requests 10000000;
             upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
             server {{ listen 127.0.0.1:{port};
               location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}"
        );
        Self::run(dir, "proxy", &conf, port)
    }
}

pub struct Redis;

impl Redis {
    pub fn start(dir: &Path) -> Proc {
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", dir.to_str().unwrap()]);
        spawn(cmd, port)
    }
}

pub struct Idemgate;

impl Idemgate {
    /// The release binary with one enforced route, `POST /v1/orders`, at default settings
    /// (the per-request log line included, written to a discarded stdout).
    pub fn start(dir: &Path, name: &str, upstream: u16, store: &str) -> Proc {
        let port = free_port();
        let admin = free_port();
        let path = dir.join(format!("{name}.toml"));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n[upstream]\nurl = \"http://127.0.0.1:{upstream}\"\n{store}[[routes]]\nname = \"orders\"\npath = \"/v1/orders\"\n[[routes]]\nname = \"big\"\npath = \"/big\"\n"
        );
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemgate"));
        cmd.args(["--config", path.to_str().unwrap(), "--log-format", "json"]);
        let extra = std::env::var("IDEMGATE_LOAD_ENV").unwrap_or_default();
        for pair in extra.split(',').filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once('=') {
                cmd.env(k, v);
            }
        }
        let proc = spawn(cmd, port);
        wait_port(admin);
        std::fs::write(dir.join(format!("{name}.admin")), admin.to_string()).unwrap();
        proc
    }
}

pub struct Scripts {
    pub get: String,
    pub new_key: String,
    pub same_key: String,
    pub new_key_big: String,
}

impl Scripts {
    pub fn write(dir: &Path) -> Self {
        let body = "x".repeat(KIB);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let new_key = |path: &str| {
            format!(
                "math.randomseed(os.time())\nlocal run = tostring(math.random(1, 1000000000))\nlocal n = 0\nlocal body = \"{body}\"\nrequest = function()\n  n = n + 1\n  return wrk.format(\"POST\", \"{path}\", {{[\"Idempotency-Key\"] = run .. \"-\" .. n, [\"Content-Type\"] = \"application/json\"}}, body)\nend\n"
            )
        };
        Scripts {
            get: write("get.lua", "wrk.method = \"GET\"\nwrk.path = \"/items\"\n".into()),
            new_key: write("new.lua", new_key("/v1/orders")),
            new_key_big: write("new-big.lua", new_key("/big")),
            same_key: write(
                "same.lua",
                format!("wrk.method = \"POST\"\nwrk.path = \"/v1/orders\"\nwrk.body = \"{body}\"\nwrk.headers[\"Idempotency-Key\"] = \"same\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Wrk {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: f64,
    /// Filled by [`charged`].
    pub budget: Budget,
}

/// `run`, with the CPU each of `parties` spent per request during it.
pub fn charged(parties: &Parties, run: impl FnOnce() -> Wrk) -> Wrk {
    let before = parties.sample();
    let mut result = run();
    let after = parties.sample();
    result.budget = parties.budget(before, after, result.requests);
    result
}

pub fn wrk(port: u16, script: &str, secs: usize) -> Wrk {
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c32",
            &format!("-d{secs}s"),
            "--latency",
            "-s",
            script,
        ])
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Non-2xx"), "errors from :{port}:\n{text}");
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {prefix:?} in wrk output:\n{text}"))
    };
    Wrk {
        rps: field("Requests/sec:").parse().unwrap(),
        p50_us: duration_us(&field("50%")),
        p99_us: duration_us(&field("99%")),
        requests: text
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no request count in wrk output:\n{text}")),
        budget: Budget::default(),
    }
}

fn duration_us(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => f64::NAN,
    }
}

pub fn micros(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Runs every target `runs` times in rounds (each round runs each target once, in
/// order), so that a drift in the machine's speed while a row runs falls on all of
/// them alike, and returns each target's median run by req/s.
pub fn interleaved(runs: usize, targets: usize, mut run: impl FnMut(usize) -> Wrk) -> Vec<Wrk> {
    let mut all: Vec<Vec<Wrk>> = vec![Vec::new(); targets];
    for _ in 0..runs.max(1) {
        for (target, samples) in all.iter_mut().enumerate() {
            samples.push(run(target));
        }
    }
    all.into_iter()
        .map(|mut samples| {
            samples.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            samples[samples.len() / 2]
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap();
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

fn store_records(dir: &Path, name: &str) -> u64 {
    use std::io::{Read, Write};
    let admin = std::fs::read_to_string(dir.join(format!("{name}.admin"))).unwrap();
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", admin.trim().parse::<u16>().unwrap())).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix("idemgate_store_records "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// 1M completed records of 1 KiB: RSS growth against the body bytes, and the miss rate
/// with the store full against the rate on an empty store.
pub fn memory_row(dir: &Path, upstream: &Proc, scripts: &Scripts, records: u64, secs: usize) {
    let store = "[store]\nmax_bytes = \"4GiB\"\n";
    let mut fill = Idemgate::start(dir, "fill", upstream.port, store);
    let pid = fill.child.id();
    let before = rss_kib(pid);
    let empty = wrk(fill.port, &scripts.new_key_big, secs);
    while store_records(dir, "fill") < records {
        wrk(fill.port, &scripts.new_key_big, 10);
    }
    let held = store_records(dir, "fill");
    let grew = rss_kib(pid).saturating_sub(before) as f64 * 1024.0;
    let bodies = held as f64 * KIB as f64;
    let full = wrk(fill.port, &scripts.new_key_big, secs);
    println!(
        "memory: {held} records of 1 KiB held: RSS grew {:.0} MiB = {:.2}x the body bytes (target <= 1.5x); miss rate {:.0} req/s empty, {:.0} req/s full = {:.2}x (target >= 0.90x)",
        grew / (1 << 20) as f64,
        grew / bodies,
        empty.rps,
        full.rps,
        full.rps / empty.rps
    );
    let _ = fill.child.kill();
}
