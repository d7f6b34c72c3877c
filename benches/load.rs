//! The load harness: idemgate beside the nginx reverse proxy it replaces, on one machine,
//! in one run. `cargo bench --bench load` installs wrk, nginx and redis-server when
//! missing, starts an nginx upstream (one worker, answers 201), an nginx proxy
//! (`worker_processes auto`, keep-alive upstream pool) and the release `idemgate` binary
//! on the memory store, on Redis and on the disk store (relaxed and strict), runs every
//! scenario three times with `wrk -t1 -c32 -d5s` (in rounds: each round runs every target
//! once), and prints the median req/s, p50 and p99 with ratios against nginx and against
//! the direct upstream; the store rows (Redis, disk relaxed and strict) also against the
//! memory store. For each median run it also prints where the CPU went per request (the
//! proxy's user and kernel time, the upstream's, Redis's, wrk's) and the machine's idle
//! share (`load/cpu.rs`). Then the storm row (1,000 concurrent requests on one key,
//! upstream taking 100 ms) and the memory row (1M records of 1 KiB).
//!
//! `IDEMGATE_LOAD_SECS` (default 5), `IDEMGATE_LOAD_RUNS` (default 3; 0 skips the table),
//! `IDEMGATE_LOAD_STORM` (0 skips the storm) and `IDEMGATE_LOAD_RECORDS` (default 1000000;
//! 0 skips the memory row) shorten it. `IDEMGATE_LOAD_ENV` adds `NAME=value` pairs
//! (comma-separated) to the idemgate processes' environment, to measure a setting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "load/mod.rs"]
mod load;

use load::*;

fn main() {
    for (cmd, package) in [
        ("wrk", "wrk"),
        ("nginx", "nginx"),
        ("redis-server", "redis-server"),
    ] {
        ensure(cmd, package);
    }
    let secs = env_num("IDEMGATE_LOAD_SECS", 5);
    let runs = env_num("IDEMGATE_LOAD_RUNS", 3);
    let dir = tempfile::tempdir().unwrap();
    let upstream = Nginx::upstream(dir.path());
    let nginx = Nginx::proxy(dir.path(), upstream.port);
    let redis = Redis::start(dir.path());
    let memory = Idemgate::start(
        dir.path(),
        "memory",
        upstream.port,
        "[store]\nmax_bytes = \"4GiB\"\n",
    );
    let shared = Idemgate::start(
        dir.path(),
        "redis",
        upstream.port,
        &format!(
            "[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n",
            redis.port
        ),
    );
    let disk = |name: &str, durability: &str| {
        let path = dir.path().join(format!("{name}-store"));
        let store = format!(
            "[store]\nbackend = \"disk\"\npath = \"{}\"\ndurability = \"{durability}\"\nmax_bytes = \"4GiB\"\n",
            path.display()
        );
        Idemgate::start(dir.path(), name, upstream.port, &store)
    };
    let relaxed = disk("disk-relaxed", "relaxed");
    let strict = disk("disk-strict", "strict");
    let scripts = Scripts::write(dir.path());
    let charge = |proxy: &Proc, redis: Option<&Proc>| Parties {
        proxy: proxy.pid(),
        upstream: Some(upstream.pid()).filter(|&p| p != proxy.pid()),
        redis: redis.map(Proc::pid),
    };
    let targets = [
        ("direct upstream", upstream.port, charge(&upstream, None)),
        ("nginx proxy", nginx.port, charge(&nginx, None)),
        ("idemgate (memory)", memory.port, charge(&memory, None)),
        (
            "idemgate (redis)",
            shared.port,
            charge(&shared, Some(&redis)),
        ),
        (
            "idemgate (disk, relaxed)",
            relaxed.port,
            charge(&relaxed, None),
        ),
        (
            "idemgate (disk, strict)",
            strict.port,
            charge(&strict, None),
        ),
    ];
    // Each with issue 9's target against nginx.
    let scenarios = [
        ("GET pass-through (no route)", &scripts.get, 3, 1.1),
        ("POST 1 KiB, new key each request", &scripts.new_key, 6, 1.0),
        ("POST 1 KiB, same key (replay)", &scripts.same_key, 6, 2.0),
    ];
    println!(
        "wrk -t1 -c32 -d{secs}s, median of {runs}; ratios against nginx and the direct upstream\n"
    );
    println!("| scenario | target | req/s | p50 | p99 | vs nginx | vs direct |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut against_memory = Vec::new();
    let mut budgets = Vec::new();
    let mut goals = Vec::new();
    // IDEMGATE_LOAD_RUNS=0 skips the table (for the storm and memory rows alone).
    for (name, script, count, goal) in scenarios.into_iter().filter(|_| runs > 0) {
        let results = interleaved(runs, count, |i| {
            let (_, port, parties) = &targets[i];
            charged(parties, || wrk(*port, script, secs))
        });
        for ((target, _, _), r) in targets.iter().zip(&results) {
            budgets.push(budget_row(name, target, &r.budget));
            println!(
                "| {name} | {target} | {:.0} | {} | {} | {:.2}x | {:.2}x |",
                r.rps,
                micros(r.p50_us),
                micros(r.p99_us),
                r.rps / results[1].rps,
                r.rps / results[0].rps
            );
        }
        goals.push(against_nginx(name, goal, &results[2], &results[1]));
        for ((target, _, _), r) in targets.iter().zip(&results).skip(3) {
            let ratio = r.rps / results[2].rps;
            let goal = if target.contains("redis") {
                let allowance = r.budget.proxy_allowance(0.5 * results[2].rps, cores());
                format!(
                    " (target >= 0.5x: {}; at 0.5x idemgate could spend at most {allowance:.1} µs of CPU per request, as above, and it spent {:.1})",
                    met(ratio >= 0.5),
                    r.budget.proxy()
                )
            } else {
                String::new()
            };
            against_memory.push(format!("{target} {name}: {ratio:.2}x{goal}"));
        }
    }
    println!();
    println!(
        "CPU per request in those runs (µs; /proc, clock ticks), and the machine's idle share:\n"
    );
    println!("| scenario | target | proxy user | proxy kernel | upstream | redis | wrk | idle |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in budgets {
        println!("{row}");
    }
    println!();
    for line in goals {
        println!("{line}");
    }
    println!();
    for line in against_memory {
        println!("against the memory store: {line}");
    }
    println!();
    if env_num("IDEMGATE_LOAD_STORM", 1) > 0 {
        storm(dir.path());
    }
    let records = env_num("IDEMGATE_LOAD_RECORDS", 1_000_000);
    if records > 0 {
        memory_row(dir.path(), &upstream, &scripts, records as u64, secs);
    }
}

fn budget_row(scenario: &str, target: &str, b: &Budget) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    format!(
        "| {scenario} | {target} | {:.1} | {:.1} | {} | {} | {:.1} | {:.0}% |",
        b.proxy_user,
        b.proxy_kernel,
        opt(b.upstream),
        opt(b.redis),
        b.wrk,
        b.idle_pct
    )
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "not met"
    }
}

/// The memory store's rate against nginx's and the target, with what the target would
/// leave idemgate per request on this machine.
fn against_nginx(scenario: &str, goal: f64, ours: &Wrk, nginx: &Wrk) -> String {
    let ratio = ours.rps / nginx.rps;
    let b = &ours.budget;
    let mut line = format!(
        "{scenario}: idemgate (memory) {ratio:.2}x nginx (target >= {goal:.1}x: {}); at {goal:.1}x it could spend at most {:.1} µs of CPU per request with this run's idle share and the other processes' CPU, and it spent {:.1} ({:.1} in the kernel)",
        met(ratio >= goal),
        b.proxy_allowance(goal * nginx.rps, cores()),
        b.proxy(),
        b.proxy_kernel
    );
    if goal > 1.05 && scenario.starts_with("GET") {
        line += &format!(
            "; p99 {} against nginx's {} (target: at or under: {})",
            micros(ours.p99_us),
            micros(nginx.p99_us),
            met(ours.p99_us <= nginx.p99_us)
        );
    }
    line
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}
