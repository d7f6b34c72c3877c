//! Where a wrk run's CPU went, per request: the proxy's user and kernel time, the
//! upstream's, Redis's, wrk's own, and how much of the two cores sat idle.
//!
//! Why: every process in the table shares one 2-core machine, so a proxy's rate is set
//! by what it spends per request against what the others leave it. With this printed
//! beside each rate, a run shows by itself which part of a gap is the proxy's user-space
//! work and which is the kernel time every proxy pays for the same sockets.

use std::process::Command;

/// The processes a run is charged to; each is the root of its process tree (nginx's
/// master and its workers).
#[derive(Clone, Copy)]
pub struct Parties {
    pub proxy: u32,
    pub upstream: Option<u32>,
    pub redis: Option<u32>,
}

/// Microseconds of CPU per request, and the machine's idle share (0–100).
#[derive(Clone, Copy, Debug, Default)]
pub struct Budget {
    pub proxy_user: f64,
    pub proxy_kernel: f64,
    pub upstream: Option<f64>,
    pub redis: Option<f64>,
    pub wrk: f64,
    pub idle_pct: f64,
}

impl Budget {
    /// The proxy's CPU per request in all.
    pub fn proxy(&self) -> f64 {
        self.proxy_user + self.proxy_kernel
    }

    /// The most CPU per request the proxy could spend at `rate` req/s on `cores`: an
    /// estimate that assumes the idle share and the others' CPU per request stay as in
    /// this run (the same arithmetic gives each run's own rate to within 1–3% on most
    /// rows).
    pub fn proxy_allowance(&self, rate: f64, cores: f64) -> f64 {
        let others = self.upstream.unwrap_or(0.0) + self.redis.unwrap_or(0.0) + self.wrk;
        cores * (1.0 - self.idle_pct / 100.0) * 1e6 / rate - others
    }
}

/// Clock ticks (user, kernel) at one moment.
#[derive(Clone, Copy, Default)]
pub struct Sample {
    proxy: (u64, u64),
    upstream: u64,
    redis: u64,
    wrk: u64,
    machine: (u64, u64),
}

impl Parties {
    pub fn sample(&self) -> Sample {
        // `getconf` is a child of ours: run it before any window, not inside one.
        clock_ticks();
        let both = |(u, k): (u64, u64)| u + k;
        Sample {
            proxy: tree_ticks(self.proxy),
            upstream: self.upstream.map_or(0, |p| both(tree_ticks(p))),
            redis: self.redis.map_or(0, |p| both(tree_ticks(p))),
            wrk: waited_children_ticks(),
            machine: machine_ticks(),
        }
    }

    /// What `requests` cost between `before` and `after`. A process that left the tree
    /// in between (an nginx worker restarting) would make a count go back: it reads 0.
    pub fn budget(&self, before: Sample, after: Sample, requests: f64) -> Budget {
        let per = |ticks: u64| ticks as f64 * 1e6 / clock_ticks() / requests.max(1.0);
        let (busy, idle) = (
            after.machine.0.saturating_sub(before.machine.0),
            after.machine.1.saturating_sub(before.machine.1),
        );
        Budget {
            proxy_user: per(after.proxy.0.saturating_sub(before.proxy.0)),
            proxy_kernel: per(after.proxy.1.saturating_sub(before.proxy.1)),
            upstream: self
                .upstream
                .map(|_| per(after.upstream.saturating_sub(before.upstream))),
            redis: self
                .redis
                .map(|_| per(after.redis.saturating_sub(before.redis))),
            wrk: per(after.wrk.saturating_sub(before.wrk)),
            idle_pct: idle as f64 * 100.0 / (busy + idle).max(1) as f64,
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    // Field 3 (the state) is a letter: keep the numbering by mapping it to 0.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// utime and stime of `pid` and of its direct children (nginx's workers).
fn tree_ticks(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some(f) = stat_fields(&name) else {
            continue;
        };
        // Indices from field 3: ppid is field 4, utime 14, stime 15.
        if name == pid.to_string().as_str() || f[1] == pid as u64 {
            total.0 += f[11];
            total.1 += f[12];
        }
    }
    total
}

/// CPU of this process's children that have been waited for: each wrk run, once its
/// output is collected.
fn waited_children_ticks() -> u64 {
    let f = stat_fields("self").unwrap();
    // cutime and cstime are fields 16 and 17.
    f[13] + f[14]
}

/// (busy, idle) ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    let line = text.lines().find(|l| l.starts_with("cpu ")).unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v[3] + v[4];
    let busy: u64 = v.iter().take(8).sum::<u64>() - idle;
    (busy, idle)
}
