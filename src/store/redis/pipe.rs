//! A serving thread's own connection to a single Redis node over plain TCP. A call
//! appends its command to the connection's buffer and waits for its reply; one task on
//! the same thread writes whatever calls have gathered in one go and hands the replies
//! back in order. That is what redis-rs's multiplexed connection does, without its
//! channel, its per-call pipeline bookkeeping and its combinator parser (measured: see
//! the README's *Performance*). TLS and Unix sockets keep redis-rs's connection.
//!
//! It never reconnects: the first failure fails every call waiting and every later
//! one, and the store then drops it and makes a new one (`RedisStore::thread_conn`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use ::redis::{ConnectionInfo, RedisError, RedisResult, Value};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::conn::OP_TIMEOUT;
use super::resp;

type Reply = oneshot::Sender<RedisResult<Value>>;

/// How much the connection reads at a time, and the most it keeps of a buffer between
/// bursts.
const READ: usize = 16 * 1024;
const KEEP: usize = 256 * 1024;

/// A handle on the connection; when the last one drops, its task closes it.
#[derive(Clone)]
pub(super) struct Pipe(Arc<Handle>);

struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the task: commands to write, the last handle gone, or a command overdue.
    wake: Notify,
    /// Wakes the [`watch`]dog: a command queued while it was not timing any, or the task
    /// ended.
    watch: Notify,
}

#[derive(Default)]
struct State {
    /// Commands written by calls, not yet taken by the task.
    out: Vec<u8>,
    /// One per command sent or buffered, in order, with when it was queued.
    waiting: VecDeque<(Reply, Instant)>,
    /// Why the connection ended; every later call fails with it.
    failed: Option<String>,
    /// The last handle dropped: the task closes the connection and ends.
    closed: bool,
    /// The watchdog is timing the oldest waiting command.
    watched: bool,
    /// The watchdog found the oldest command unanswered for [`OP_TIMEOUT`]: the task
    /// fails the connection.
    overdue: bool,
}

impl State {
    /// Failed, or about to: a call made now could not be answered.
    fn ended(&self) -> bool {
        self.failed.is_some() || self.overdue
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave `State` half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.state().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Pipe {
    /// `None` for what this connection does not speak (TLS, Unix sockets). It connects
    /// in the background; calls made meanwhile are written once it has.
    pub(super) fn open(info: &ConnectionInfo) -> Option<Pipe> {
        let ::redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return None;
        };
        let redis = info.redis_settings();
        let mut hello = Vec::new();
        let mut replies = 0;
        if let Some(password) = redis.password() {
            let mut auth = ::redis::cmd("AUTH");
            if let Some(user) = redis.username() {
                auth.arg(user);
            }
            auth.arg(password).write_packed_command(&mut hello);
            replies += 1;
        }
        if redis.db() != 0 {
            ::redis::cmd("SELECT")
                .arg(redis.db())
                .write_packed_command(&mut hello);
            replies += 1;
        }
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Notify::new(),
            watch: Notify::new(),
        });
        let address = (host.clone(), *port);
        tokio::spawn(drive(shared.clone(), address, hello, replies));
        tokio::spawn(watch(shared.clone()));
        Some(Pipe(Arc::new(Handle { shared })))
    }

    /// The connection has ended: the thread should make a new one before its next call.
    pub(super) fn is_broken(&self) -> bool {
        self.0.shared.state().ended()
    }

    /// One command, written by `write` straight into the connection's buffer, and its
    /// reply. Bytes and waiter go in under one lock, so replies are matched by order
    /// alone. No timer of its own: the connection fails when its oldest waiting command
    /// has had no reply within [`OP_TIMEOUT`] (see [`watch`]).
    pub(super) async fn call(&self, write: impl FnOnce(&mut Vec<u8>)) -> RedisResult<Value> {
        let shared = &self.0.shared;
        let (tx, rx) = oneshot::channel();
        let unwatched = {
            let mut state = shared.state();
            if state.ended() {
                let why = state
                    .failed
                    .as_deref()
                    .unwrap_or("a command went unanswered");
                return Err(broken(why));
            }
            write(&mut state.out);
            state.waiting.push_back((tx, Instant::now()));
            !std::mem::replace(&mut state.watched, true)
        };
        shared.wake.notify_one();
        if unwatched {
            shared.watch.notify_one();
        }
        rx.await
            .unwrap_or_else(|_| Err(broken("the connection's task ended")))
    }
}

/// As an I/O error, so the store reports Redis as unavailable.
fn broken(why: &str) -> RedisError {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why.to_string()).into()
}

/// The connection's task: runs it until it fails or its last handle drops, then fails
/// whatever still waits.
async fn drive(shared: Arc<Shared>, address: (String, u16), hello: Vec<u8>, replies: usize) {
    let mut ending = Ending {
        shared: shared.clone(),
        why: "the connection's task ended".into(),
    };
    ending.why = match serve(&shared, &address, hello, replies).await {
        Ok(()) => "the connection was closed".to_string(),
        Err(e) => format!("Redis at {}:{}: {e}", address.0, address.1),
    };
}

/// Fails every call still waiting and every later one when the task ends, however it
/// ends (a panic included), so that no call waits for a reply that cannot come.
struct Ending {
    shared: Arc<Shared>,
    why: String,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.shared.state();
            state.failed.get_or_insert(self.why.clone());
            std::mem::take(&mut state.waiting)
        };
        for (reply, _) in waiting {
            let _ = reply.send(Err(broken(&self.why)));
        }
        self.shared.watch.notify_one();
    }
}

/// Fails the connection when its oldest command has waited [`OP_TIMEOUT`] for a reply:
/// replies come in order, so nothing behind it can be answered sooner, and every call
/// waiting on the connection fails with it, the newest too (their scripts may have run,
/// as with any call that times out). One timer a
/// connection, set again when it fires, and none while nothing waits (a timer a call,
/// polled on every pass, was ~2% of a Redis miss's instructions).
async fn watch(shared: Arc<Shared>) {
    let mut due = None;
    loop {
        match due {
            None => shared.watch.notified().await,
            Some(at) => tokio::time::sleep_until(at).await,
        }
        let now = Instant::now();
        let mut state = shared.state();
        if state.failed.is_some() || state.closed {
            return;
        }
        due = match state.waiting.front() {
            Some((_, queued)) if *queued + OP_TIMEOUT <= now => {
                state.overdue = true;
                drop(state);
                shared.wake.notify_one();
                return;
            }
            Some((_, queued)) => Some(*queued + OP_TIMEOUT),
            None => {
                state.watched = false;
                None
            }
        };
    }
}

async fn serve(
    shared: &Shared,
    address: &(String, u16),
    hello: Vec<u8>,
    replies: usize,
) -> Result<(), String> {
    let opened = tokio::time::timeout(OP_TIMEOUT, connect(address, hello, replies)).await;
    let (mut rd, mut wr, mut input) = match opened {
        Ok(opened) => opened?,
        // Bounded: calls wait at most OP_TIMEOUT, and so does this task for a server
        // that accepts and never answers.
        Err(_) => return Err(format!("not connected within {OP_TIMEOUT:?}")),
    };
    let (mut out, mut sent) = (Vec::new(), 0);
    loop {
        {
            // Checked on every pass: a server that stopped reading must not keep this
            // task, its socket and its buffers once every handle has gone.
            let mut state = shared.state();
            if state.closed {
                return Ok(());
            }
            if state.overdue {
                return Err(format!("no answer within {OP_TIMEOUT:?}"));
            }
            if sent == out.len() {
                take_commands(&mut state, &mut out);
                sent = 0;
            }
        }
        if input.is_empty() && input.capacity() > KEEP {
            input = BytesMut::new();
        }
        // Room for a whole read: a full buffer would otherwise be read 64 bytes at a time.
        input.reserve(READ);
        tokio::select! {
            read = rd.read_buf(&mut input) => {
                if read.map_err(|e| e.to_string())? == 0 {
                    return Err("the server closed the connection".into());
                }
                deliver(shared, &mut input)?;
            }
            written = wr.write(&out[sent..]), if sent < out.len() => {
                match written.map_err(|e| e.to_string())? {
                    0 => return Err("the connection took no more bytes".into()),
                    n => sent += n,
                }
            }
            () = shared.wake.notified() => {}
        }
    }
}

/// Swaps the (written) buffer `out` for the commands calls have gathered since.
fn take_commands(state: &mut State, out: &mut Vec<u8>) {
    out.clear();
    if out.capacity() > KEEP {
        // A burst of large records; do not hold its buffer for good.
        *out = Vec::new();
    }
    std::mem::swap(out, &mut state.out);
}

/// Connects, then authenticates and selects the database when the URL asks for them,
/// before any call's command is written (they would fail, or land in database 0).
async fn connect(
    (host, port): &(String, u16),
    hello: Vec<u8>,
    replies: usize,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, BytesMut), String> {
    let stream = TcpStream::connect((host.as_str(), *port))
        .await
        .map_err(|e| e.to_string())?;
    // Without it, a command written while another waits sits until that one's ACK.
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = stream.into_split();
    let mut input = BytesMut::with_capacity(READ);
    wr.write_all(&hello).await.map_err(|e| e.to_string())?;
    for _ in 0..replies {
        match next_reply(&mut rd, &mut input).await? {
            Ok(Value::Okay) => {}
            Ok(other) => return Err(format!("unexpected answer to AUTH or SELECT: {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((rd, wr, input))
}

/// Hands every whole reply in `input` to the call that waits for it: replies come in the
/// order the commands were written, and `call` queued each waiter with its command.
fn deliver(shared: &Shared, input: &mut BytesMut) -> Result<(), String> {
    while let Some((reply, used)) = resp::parse(input)? {
        input.advance(used);
        let waiting = shared.state().waiting.pop_front();
        match waiting {
            // The caller's future may have been dropped; its reply is dropped in its turn.
            Some((call, _)) => drop(call.send(reply)),
            None => return Err("a reply no call asked for".into()),
        }
    }
    Ok(())
}

/// The next reply, for the handshake (no call waits yet).
async fn next_reply(
    rd: &mut OwnedReadHalf,
    input: &mut BytesMut,
) -> Result<RedisResult<Value>, String> {
    loop {
        if let Some((reply, used)) = resp::parse(input)? {
            input.advance(used);
            return Ok(reply);
        }
        if rd.read_buf(input).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
    }
}
