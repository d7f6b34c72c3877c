//! Logging set-up: JSON lines for machines, pretty lines for people. Lines go through a
//! 64 KiB buffer flushed every 200 ms (and at once for warnings and errors), as nginx's
//! `access_log ... buffer= flush=` does: a write syscall per request line cost the proxy
//! about a tenth of its throughput.

use std::io::{BufWriter, IsTerminal, Stdout, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

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
    // A second init (tests) keeps the first subscriber.
    drop(result);
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
