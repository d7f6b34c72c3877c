//! Logging set-up: JSON lines for machines, pretty lines for people. Lines go through a
//! 64 KiB buffer flushed every 200 ms (and at once for warnings and errors), as nginx's
//! `access_log ... buffer= flush=` does: a write syscall per request line cost the proxy
//! about a tenth of its throughput.
//!
//! The per-request line in JSON is written by [`request_line`] itself rather than by
//! `tracing`'s JSON formatter (field visitors, a `serde_json` map, a UTF-8 check of every
//! fragment): the same keys in the same order for a fraction of the cost. `RUST_LOG`
//! still decides whether it is written.

use std::fmt::Write as _;
use std::io::{BufWriter, IsTerminal, Stdout, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use tracing_subscriber::fmt::MakeWriter;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogFormat {
    /// Pretty on a terminal, JSON otherwise (SPEC §1).
    pub fn detect() -> Self {
        if std::io::stdout().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(BufferedStdout);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // A second init (tests) keeps the first subscriber, and its format.
    if result.is_ok() {
        JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    }
}

/// Whether [`init`] chose JSON lines (then [`request_line`] writes its own).
static JSON: AtomicBool = AtomicBool::new(false);

/// What one request's log line says (the README's "Logs" section).
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub outcome: &'a str,
    pub status: u16,
    pub record: &'a str,
    pub upstream: Option<Duration>,
}

/// Logs one request at info under the target `idemgate::request`.
pub fn request_line(l: &RequestLine<'_>) {
    if !tracing::enabled!(target: "idemgate::request", tracing::Level::INFO) {
        return;
    }
    if !JSON.load(Ordering::Relaxed) {
        tracing::info!(
            target: "idemgate::request",
            method = l.method,
            path = l.path,
            route = l.route,
            outcome = l.outcome,
            status = l.status,
            record = l.record,
            upstream_ms = l.upstream.map(|d| d.as_secs_f64() * 1000.0),
            "request"
        );
        return;
    }
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    LINE.with(|line| {
        let Ok(mut out) = line.try_borrow_mut() else {
            return;
        };
        out.clear();
        json_line(&mut out, l);
        let _ = stdout().write_all(out.as_bytes());
    });
}

fn json_line(out: &mut String, l: &RequestLine<'_>) {
    out.push_str("{\"timestamp\":\"");
    timestamp(out, SystemTime::now());
    out.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
    for (key, value) in [
        ("method", l.method),
        ("path", l.path),
        ("route", l.route),
        ("outcome", l.outcome),
    ] {
        json_field(out, key, value);
    }
    out.push_str(",\"status\":");
    out.push_str(itoa::Buffer::new().format(l.status));
    json_field(out, "record", l.record);
    if let Some(d) = l.upstream {
        // Milliseconds to the microsecond, without the float formatter.
        let us = d.as_micros();
        out.push_str(",\"upstream_ms\":");
        out.push_str(itoa::Buffer::new().format(us / 1000));
        let frac = (us % 1000) as u16;
        out.push('.');
        out.push(char::from(b'0' + (frac / 100) as u8));
        out.push(char::from(b'0' + (frac / 10 % 10) as u8));
        out.push(char::from(b'0' + (frac % 10) as u8));
    }
    out.push_str("}\n");
}

/// RFC 3339 in UTC with microseconds, as `tracing`'s JSON lines have it. The part up to
/// the second is formatted once a second per thread; a line only adds its microseconds.
fn timestamp(out: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let cached = SECOND.with(|second| {
        let Ok(mut second) = second.try_borrow_mut() else {
            return false;
        };
        if second.0 != secs {
            second.1.clear();
            up_to_the_second(&mut second.1, secs);
            second.0 = secs;
        }
        out.push_str(&second.1);
        true
    });
    if !cached {
        up_to_the_second(out, secs);
    }
    let micros = since.subsec_micros();
    out.push('.');
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(micros);
    for _ in digits.len()..6 {
        out.push('0');
    }
    out.push_str(digits);
    out.push('Z');
}

/// `2026-11-22T22:41:18`, without the `Z` (humantime cannot write years past 9999: then
/// whatever it wrote, never a panic).
fn up_to_the_second(out: &mut String, secs: u64) {
    let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let _ = write!(out, "{}", humantime::format_rfc3339_seconds(whole));
    if out.ends_with('Z') {
        out.pop();
    }
}

/// `,"key":"value"` with the value escaped as JSON requires.
fn json_field(out: &mut String, key: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":\"");
    if !value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(value);
    } else {
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

const FLUSH_EVERY: Duration = Duration::from_millis(200);

fn stdout() -> MutexGuard<'static, BufWriter<Stdout>> {
    static OUT: OnceLock<Mutex<BufWriter<Stdout>>> = OnceLock::new();
    let out = OUT.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                let _ = stdout().flush();
            });
        Mutex::new(BufWriter::with_capacity(64 * 1024, std::io::stdout()))
    });
    // A panic mid-write leaves at worst a partial line in the buffer.
    out.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes what is still buffered; called before the process exits.
pub fn flush() {
    let _ = stdout().flush();
}

struct BufferedStdout;

/// One log line; warnings and errors are flushed as soon as they are written.
pub struct Line {
    urgent: bool,
}

impl<'a> MakeWriter<'a> for BufferedStdout {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = stdout();
        out.write_all(buf)?;
        if self.urgent {
            out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        stdout().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_latency_is_milliseconds_to_the_microsecond() {
        for (us, text) in [(40, "0.040"), (1_000, "1.000"), (999_999, "999.999")] {
            let mut out = String::new();
            let line = RequestLine {
                method: "GET",
                path: "/",
                route: "",
                outcome: "passthrough",
                status: 200,
                record: "",
                upstream: Some(Duration::from_micros(us)),
            };
            json_line(&mut out, &line);
            assert!(
                out.ends_with(&format!(",\"upstream_ms\":{text}}}\n")),
                "{out}"
            );
            let v: serde_json::Value = serde_json::from_str(&out).unwrap(); // ok: test
            assert_eq!(v["upstream_ms"].as_f64(), Some(us as f64 / 1000.0));
        }
    }

    #[test]
    fn a_request_line_is_one_json_object_whatever_the_path() {
        let mut out = String::new();
        json_line(
            &mut out,
            &RequestLine {
                method: "POST",
                path: "/a\"b\\c\u{1}é",
                route: "orders",
                outcome: "forwarded",
                status: 201,
                record: "f314667ab840",
                upstream: Some(Duration::from_micros(1_250_007)),
            },
        );
        assert!(out.ends_with("}\n") && out.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap(); // ok: test
        assert_eq!(v["path"], "/a\"b\\c\u{1}é");
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["status"], 201);
        assert_eq!(v["upstream_ms"], 1250.007);
        assert!(out.contains("\"upstream_ms\":1250.007}"), "{out}");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z')); // ok: test
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect(); // ok: test
        assert_eq!(keys.len(), 10);
    }

    #[test]
    fn the_timestamp_reads_as_humantime_writes_it() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        // Leading zeros in the microseconds, a second boundary, and back again.
        for micros in [0, 7, 999_999, 1_000_000, 1_000_042, 12_345, 3_000_000_001] {
            let at = base + Duration::from_micros(micros);
            let mut out = String::new();
            timestamp(&mut out, at);
            assert_eq!(out, humantime::format_rfc3339_micros(at).to_string());
        }
        // Past what humantime can write (year 10000): a line, never a panic.
        let mut out = String::new();
        timestamp(
            &mut out,
            SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800),
        );
        assert!(out.ends_with('Z'));
    }
}
