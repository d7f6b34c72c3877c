//! Which connection a store call runs on, and running a script call on it: a serving
//! thread's own connection when it has one, else the connection every runtime shares.

use std::sync::atomic::Ordering;

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::{ErrorKind, RedisResult, ServerErrorKind, Value};

use super::conn::{manager_config, OP_TIMEOUT};
use super::pipe::Pipe;
use super::scripts::Call;
use super::{unavailable, RedisStore};
use crate::store::StoreError;

/// A serving thread's own connection to a single node: our [`Pipe`] over plain TCP,
/// redis-rs's over TLS or a Unix socket.
#[derive(Clone)]
enum ThreadConn {
    Pipe(Pipe),
    Manager(ConnectionManager),
}

thread_local! {
    /// Each serving thread's connections, by store.
    /// Each entry remembers the store's [`RedisStore::generation`] it was made in.
    static THREAD_CONNS: std::cell::RefCell<std::collections::HashMap<u64, (u64, ThreadConn)>> =
        Default::default();
}

impl RedisStore {
    pub(super) async fn run(&self, call: Call<'_>) -> Result<Value, StoreError> {
        // Never retried: a script that timed out may have run.
        match self.thread_conn() {
            // A pipe that failed is replaced by `thread_conn` itself; an error reply
            // (a script's error, `-OOM`) leaves it working.
            Some(ThreadConn::Pipe(pipe)) => invoke_pipe(&call, &pipe).await,
            Some(ThreadConn::Manager(mut local)) => {
                let answer = invoke(&call, &mut local).await;
                if answer.is_err() {
                    // It has no response timer of its own (see `thread_conn`): the next
                    // call on this thread starts from a fresh connection.
                    THREAD_CONNS.with(|conns| conns.borrow_mut().remove(&self.id));
                }
                answer
            }
            None => invoke(&call, &mut self.conn()?).await,
        }
    }

    /// On a single-threaded runtime (a serving thread, see `server::workers`), this
    /// thread's own connection to a single node: its task runs on this thread, so a
    /// store call does not hop to another runtime and back (measured: replay 32.6k →
    /// 44.1k req/s, miss 12.3k → 15.6k). Over plain TCP it is our own [`Pipe`]; over
    /// TLS, redis-rs's. `None` elsewhere, and for a Cluster.
    fn thread_conn(&self) -> Option<ThreadConn> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let flavor = Handle::try_current().ok()?.runtime_flavor();
        if flavor != RuntimeFlavor::CurrentThread || self.urls.len() != 1 {
            return None;
        }
        let generation = self.generation.load(Ordering::Acquire);
        THREAD_CONNS.with(|conns| {
            let mut conns = conns.borrow_mut();
            match conns.get(&self.id) {
                Some((_, ThreadConn::Pipe(pipe))) if pipe.is_broken() => {}
                Some((made, conn)) if *made == generation => return Some(conn.clone()),
                _ => {}
            }
            let client = self.client(&self.urls[0]).ok()?;
            let conn = match Pipe::open(client.get_connection_info()) {
                Some(pipe) => ThreadConn::Pipe(pipe),
                None => {
                    // No response timer of its own: `invoke`'s covers each call, and a
                    // call that fails drops this connection (one timer per call was ~2%
                    // of a miss). Lazy: it connects on first use, from this thread.
                    let config = manager_config().set_response_timeout(None);
                    ThreadConn::Manager(client.get_connection_manager_lazy(config).ok()?)
                }
            };
            conns.insert(self.id, (generation, conn.clone()));
            Some(conn)
        })
    }
}

/// Whether Redis has forgotten the script (restarted, or `SCRIPT FLUSH`ed since the last
/// call): then it is loaded and the call sent again.
fn no_script<T>(answer: &RedisResult<T>) -> bool {
    matches!(answer, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
}

/// The pipe bounds each command's wait itself (see [`Pipe::call`]).
async fn invoke_pipe(call: &Call<'_>, pipe: &Pipe) -> Result<Value, StoreError> {
    let mut answer = pipe.call(|out| call.write(out)).await;
    if no_script(&answer) {
        answer = match pipe.call(|out| call.lua.write_load(out)).await {
            Ok(_) => pipe.call(|out| call.write(out)).await,
            Err(e) => Err(e),
        };
    }
    answer.map_err(unavailable)
}

async fn invoke(call: &Call<'_>, conn: &mut impl ConnectionLike) -> Result<Value, StoreError> {
    let cmd = call.cmd();
    let answer = async {
        match cmd.query_async::<Value>(conn).await {
            answer if no_script(&answer) => {
                call.lua.script.load_async(conn).await?;
                cmd.query_async::<Value>(conn).await
            }
            answer => answer,
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, answer).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable(format!("no answer within {OP_TIMEOUT:?}"))),
    }
}
