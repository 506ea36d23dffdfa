//! A UDP relay on loopback that the tests put between a node and the coordinator's QUIC sync
//! port, to cut a node off and heal it again without touching either process.
//!
//! Each client address gets its own upstream socket (connected to the target), so the target sees
//! one stable peer per client and replies find their way back. While cut, datagrams in both
//! directions are dropped (and counted); nothing is queued for later. A bad link can be played
//! too: each datagram lost with a given probability (a seeded generator, so runs repeat) and the
//! rest delayed by a fixed time.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

/// Largest datagram relayed (QUIC never sends more than 64 KiB in one).
const MAX_DATAGRAM: usize = 65_536;
/// Pause after a socket error, so a persistent one cannot spin.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

#[derive(Default)]
struct Counters {
    open: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Datagrams lost to the impairment (per million).
    loss_ppm: AtomicU64,
    delay_micros: AtomicU64,
    rng: AtomicU64,
}

impl Counters {
    /// xorshift64 over an atomic: deterministic for a given seed and datagram order.
    fn next_random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_micros.load(Ordering::Relaxed))
    }
}

/// A running relay; its tasks are aborted on drop.
pub struct UdpRelay {
    /// Where clients send: point the node's `[coordinator] addr` here.
    pub addr: SocketAddr,
    pub target: SocketAddr,
    counters: Arc<Counters>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl UdpRelay {
    /// Binds 127.0.0.1:0 and relays to `target`, open from the start. Must run inside a tokio
    /// runtime.
    pub async fn start(target: SocketAddr) -> UdpRelay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        counters.open.store(true, Ordering::SeqCst);
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let main = tokio::spawn(relay_clients(front, target, counters.clone(), tasks.clone()));
        tasks.lock().push(main.abort_handle());
        UdpRelay { addr, target, counters, tasks }
    }

    /// Drops every datagram from now on, both ways.
    pub fn cut(&self) {
        self.counters.open.store(false, Ordering::SeqCst);
    }

    /// Plays a bad link from now on: each datagram (both ways) is lost with probability
    /// `loss_percent` / 100, the rest arrive `delay` late.
    pub fn impair(&self, loss_percent: u32, delay: Duration, seed: u64) {
        self.counters.loss_ppm.store(u64::from(loss_percent.min(100)) * 10_000, Ordering::SeqCst);
        self.counters.delay_micros.store(delay.as_micros() as u64, Ordering::SeqCst);
        self.counters.rng.store(seed, Ordering::SeqCst);
    }

    /// Relays again.
    pub fn heal(&self) {
        self.counters.open.store(true, Ordering::SeqCst);
    }

    pub fn is_open(&self) -> bool {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Datagrams relayed so far, both ways.
    pub fn forwarded(&self) -> u64 {
        self.counters.forwarded.load(Ordering::SeqCst)
    }

    /// Datagrams dropped while cut, both ways.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

/// Counts one datagram as relayed or dropped, by the relay's state; true when relayed.
fn pass(counters: &Counters) -> bool {
    let loss = counters.loss_ppm.load(Ordering::Relaxed);
    let lost = loss > 0 && counters.next_random() % 1_000_000 < loss;
    if counters.open.load(Ordering::SeqCst) && !lost {
        counters.forwarded.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// Client → target: one upstream socket per client, made on its first datagram, with a task that
/// carries the target's replies back to that client.
async fn relay_clients(
    front: Arc<UdpSocket>,
    target: SocketAddr,
    counters: Arc<Counters>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        if !pass(&counters) {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(socket) => socket.clone(),
            None => {
                let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                socket.connect(target).await.unwrap();
                let back = tokio::spawn(relay_back(socket.clone(), front.clone(), client, counters.clone()));
                tasks.lock().push(back.abort_handle());
                upstreams.insert(client, socket.clone());
                socket
            }
        };
        // A send error (target not listening yet, say) is a lost datagram, as on a real network.
        send_later(counters.delay(), &buf[..n], move |datagram| async move {
            let _ = upstream.send(&datagram).await;
        })
        .await;
    }
}

/// Target → one client.
async fn relay_back(upstream: Arc<UdpSocket>, front: Arc<UdpSocket>, client: SocketAddr, counters: Arc<Counters>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // ICMP port unreachable surfaces as an error on a connected socket; keep going.
        let Ok(n) = upstream.recv(&mut buf).await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        if pass(&counters) {
            let front = front.clone();
            send_later(counters.delay(), &buf[..n], move |datagram| async move {
                let _ = front.send_to(&datagram, client).await;
            })
            .await;
        }
    }
}

/// Sends at once, or after `delay` from a task of its own (so later datagrams are not held up).
async fn send_later<F, Fut>(delay: Duration, datagram: &[u8], send: F)
where
    F: FnOnce(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let datagram = datagram.to_vec();
    if delay.is_zero() {
        send(datagram).await;
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send(datagram).await;
        });
    }
}
