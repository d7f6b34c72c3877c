//! A fault-injecting TCP relay on real sockets, placed between the proxy and a
//! [`FakeUpstream`](super::FakeUpstream): the proxy's `[upstream] url` is [`Relay::url`].
//! Each accepted connection reads the current [`Fault`] once, so [`Relay::set_fault`]
//! applies to new connections only (a connection the proxy keeps pooled keeps its fault).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What the relay does to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relays both directions untouched.
    Pass,
    /// Nothing listens on the relay's port: a connect is refused and the request never leaves.
    Refuse,
    /// Forwards the request, passes `n` response bytes, then resets the client side (RST); 0 resets as soon as the upstream starts answering.
    ResetAfterResponseBytes(usize),
    /// Forwards the request, passes `n` response bytes, then closes the client side cleanly (FIN).
    CloseMidBody(usize),
    /// Forwards the request, never passes a response byte, and keeps the socket open until the client closes it.
    StallResponse,
    /// Forwards the request, passes `n` response bytes, then passes nothing more and keeps the socket open.
    StallAfterResponseBytes(usize),
    /// Forwards the request, waits this long once the upstream starts answering, then relays untouched.
    Delay(Duration),
}

#[derive(Default)]
struct Counters {
    accepted: AtomicUsize,
    finished: AtomicUsize,
    fired: AtomicUsize,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

type Command = (bool, oneshot::Sender<Result<(), String>>);

/// A running relay; dropping it stops listening (open connections run to their end).
pub struct Relay {
    addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    counters: Arc<Counters>,
    control: mpsc::UnboundedSender<Command>,
}

impl Relay {
    /// Starts relaying from a fresh port on 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr, fault: Fault) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listening = (fault != Fault::Refuse).then_some(listener);
        let fault = Arc::new(Mutex::new(fault));
        let counters = Arc::new(Counters::default());
        let (control, commands) = mpsc::unbounded_channel();
        tokio::spawn(accept_loop(
            addr,
            target,
            listening,
            commands,
            fault.clone(),
            counters.clone(),
        ));
        Relay {
            addr,
            fault,
            counters,
            control,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the fault for connections accepted from now on; returns once the port is
    /// closed (`Refuse`) or listening again (anything else).
    pub async fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
        let (ack, done) = oneshot::channel();
        self.control.send((fault != Fault::Refuse, ack)).unwrap();
        if let Err(e) = done.await.unwrap() {
            panic!("relay could not listen on {} again: {e}", self.addr);
        }
    }

    pub fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections that have ended (both sides closed or the fault tore them down).
    pub fn finished(&self) -> usize {
        self.counters.finished.load(Ordering::SeqCst)
    }

    /// How many times a fault took effect (reset, close, stall, delay).
    pub fn faults_fired(&self) -> usize {
        self.counters.fired.load(Ordering::SeqCst)
    }

    /// Request bytes passed from the proxy to the upstream.
    pub fn request_bytes(&self) -> u64 {
        self.counters.to_upstream.load(Ordering::SeqCst)
    }

    /// Response bytes passed from the upstream to the proxy.
    pub fn response_bytes(&self) -> u64 {
        self.counters.to_client.load(Ordering::SeqCst)
    }
}

async fn accept_loop(
    addr: SocketAddr,
    target: SocketAddr,
    mut listening: Option<TcpListener>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    fault: Arc<Mutex<Fault>>,
    counters: Arc<Counters>,
) {
    loop {
        let command = match &listening {
            Some(listener) => tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        counters.accepted.fetch_add(1, Ordering::SeqCst);
                        let fault = *fault.lock().unwrap();
                        tokio::spawn(relay_connection(client, target, fault, counters.clone()));
                    }
                    continue;
                }
                command = commands.recv() => command,
            },
            None => commands.recv().await,
        };
        // The relay was dropped: stop listening.
        let Some((listen, ack)) = command else { return };
        let result = match (listen, listening.is_some()) {
            (false, _) => {
                listening = None;
                Ok(())
            }
            (true, true) => Ok(()),
            (true, false) => match TcpListener::bind(addr).await {
                Ok(l) => {
                    listening = Some(l);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
        };
        let _ = ack.send(result);
    }
}

/// Where the response direction stands.
#[derive(PartialEq, Eq)]
enum Response {
    Relaying,
    /// Upstream finished or the fault ended the response: nothing more is passed.
    Done,
}

async fn relay_connection(
    client: TcpStream,
    target: SocketAddr,
    fault: Fault,
    counters: Arc<Counters>,
) {
    let finish = || counters.finished.fetch_add(1, Ordering::SeqCst);
    let Ok(upstream) = TcpStream::connect(target).await else {
        finish();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut request_buf = vec![0u8; 16 * 1024];
    let mut response_buf = vec![0u8; 16 * 1024];
    let mut request_open = true;
    let mut response = Response::Relaying;
    let mut passed = 0usize;
    let mut delayed = false;
    while request_open || response == Response::Relaying {
        tokio::select! {
            read = cr.read(&mut request_buf), if request_open => match read {
                Ok(0) | Err(_) => {
                    request_open = false;
                    let _ = uw.shutdown().await;
                }
                Ok(n) => {
                    if uw.write_all(&request_buf[..n]).await.is_err() {
                        request_open = false;
                    } else {
                        counters.to_upstream.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
            },
            read = ur.read(&mut response_buf), if response == Response::Relaying => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        response = Response::Done;
                        let _ = cw.shutdown().await;
                        continue;
                    }
                    Ok(n) => n,
                };
                let (limit, after) = match fault {
                    Fault::Pass | Fault::Refuse => (usize::MAX, None),
                    Fault::Delay(d) => {
                        if !delayed {
                            delayed = true;
                            counters.fired.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(d).await; // the Delay fault itself, not a wait for state
                        }
                        (usize::MAX, None)
                    }
                    Fault::ResetAfterResponseBytes(limit) => (limit, Some(After::Reset)),
                    Fault::CloseMidBody(limit) => (limit, Some(After::Close)),
                    Fault::StallResponse => (0, Some(After::Stall)),
                    Fault::StallAfterResponseBytes(limit) => (limit, Some(After::Stall)),
                };
                let take = n.min(limit.saturating_sub(passed));
                if take > 0 {
                    if cw.write_all(&response_buf[..take]).await.is_err() {
                        response = Response::Done;
                        continue;
                    }
                    passed += take;
                    counters.to_client.fetch_add(take as u64, Ordering::SeqCst);
                }
                let Some(after) = after.filter(|_| passed >= limit) else { continue };
                counters.fired.fetch_add(1, Ordering::SeqCst);
                response = Response::Done;
                match after {
                    After::Reset => {
                        // Linger 0 and a plain close (no shutdown first): the peer gets RST.
                        // (Deprecated because a non-zero linger blocks on drop; zero never does.)
                        #[allow(deprecated)]
                        if let Ok(client) = cr.reunite(cw) {
                            let _ = client.set_linger(Some(Duration::ZERO));
                            drop(client);
                        }
                        finish();
                        return;
                    }
                    After::Close => {
                        let _ = cw.flush().await;
                        let _ = cw.shutdown().await;
                    }
                    After::Stall => {}
                }
            }
        }
    }
    finish();
}

enum After {
    Reset,
    Close,
    Stall,
}
