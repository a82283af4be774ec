//! Accept loops: connection caps (global and per client address), one task per connection.

use crate::addr::client_key;
use crate::live::EndReason;
use crate::net::driver::DriveError;
use crate::proto::proxy;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

/// Caps on open connections.
pub struct ConnLimits {
    global: Arc<Semaphore>,
    /// Open connections per client key ([`client_key`]: an IPv4 address or an IPv6 prefix).
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
    /// IPv6 clients are counted per prefix of this length (`[limits] ipv6_prefix`).
    v6_prefix: u8,
}

/// Held while a connection is open.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    /// The client key the connection is counted under.
    key: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.limits.per_ip.lock()
            && let Some(n) = m.get_mut(&self.key)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl ConnLimits {
    /// `max`: all connections; `max_per_ip`: from one client, that is one IPv4 address or
    /// one IPv6 prefix of `v6_prefix` bits (a client with a /64 would otherwise open
    /// `max_per_ip` connections from each of its addresses).
    pub fn new(max: usize, max_per_ip: usize, v6_prefix: u8) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            global: Arc::new(Semaphore::new(max)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
            v6_prefix,
        })
    }

    /// A slot for a connection from `ip`, or `None` if a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        self.admit_with(permit, ip)
    }

    /// The per-address part of [`ConnLimits::admit`], for a connection already counted.
    fn admit_with(self: &Arc<Self>, permit: tokio::sync::OwnedSemaphorePermit, ip: IpAddr) -> Option<ConnGuard> {
        let key = client_key(ip, self.v6_prefix);
        let mut m = self.per_ip.lock().ok()?;
        let n = m.entry(key).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(ConnGuard { limits: self.clone(), key, _permit: permit })
    }
}

/// PROXY protocol on a listener (`[proxy_protocol]`): only the load balancers may connect,
/// and each connection must start with a header naming the client.
pub struct ProxyPolicy {
    /// Addresses allowed to connect.
    pub trusted: Vec<ipnet::IpNet>,
    /// How long the header may take.
    pub timeout: Duration,
}

impl ProxyPolicy {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Why no client address came from a PROXY-protocol connection.
enum HeaderError {
    /// Connected and closed without a byte: a load balancer's health check.
    Closed,
    /// Anything else, in words for the log.
    Bad(String),
}

/// Reads a PROXY header byte-exact (the client's first bytes stay in the socket).
/// `Ok(None)`: a LOCAL header (the load balancer's own health check).
async fn read_proxy_header(tcp: &mut TcpStream, wait: Duration) -> Result<Option<SocketAddr>, HeaderError> {
    let read = async {
        let mut buf = Vec::with_capacity(64);
        loop {
            match proxy::need(&buf).map_err(|e| HeaderError::Bad(e.to_string()))? {
                0 => return proxy::client(&buf).map_err(|e| HeaderError::Bad(e.to_string())),
                n => {
                    let start = buf.len();
                    buf.resize(start + n, 0);
                    if let Err(e) = tcp.read_exact(&mut buf[start..]).await {
                        // A health check: connected and closed without a byte.
                        if start == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof {
                            return Err(HeaderError::Closed);
                        }
                        return Err(HeaderError::Bad(e.to_string()));
                    }
                }
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Bad("no PROXY header in time".into())),
    }
}

/// How a connection task ended, logged once where the task was spawned.
pub trait ConnEnd: Send + 'static {
    /// Writes the log line, if the end is worth one.
    fn log(&self, peer: SocketAddr);
}

impl ConnEnd for () {
    fn log(&self, _peer: SocketAddr) {}
}

impl ConnEnd for Result<(), DriveError> {
    fn log(&self, peer: SocketAddr) {
        match self {
            Ok(()) | Err(DriveError::PeerClosed | DriveError::Finished) => {}
            Err(DriveError::Ended(EndReason::Revoked)) => info!(%peer, "session ended: access revoked"),
            Err(e @ DriveError::Timeout) => debug!(%peer, reason = %e, "connection ended"),
            Err(e) => debug!(%peer, error = %e, "connection failed"),
        }
    }
}

/// Held by every connection task; shutdown waits until the last one is dropped
/// (mini-redis's `shutdown_complete`), so every client has had its goodbye.
#[derive(Clone)]
pub struct TaskGuard(#[allow(dead_code)] mpsc::Sender<()>);

/// Completes once every [`TaskGuard`] is gone.
pub struct AllDone(mpsc::Receiver<()>);

impl AllDone {
    /// Waits for the last connection task.
    pub async fn wait(mut self) {
        let _ = self.0.recv().await;
    }
}

/// A guard to hand to the accept loops and what completes when all its clones are gone.
pub fn task_guard() -> (TaskGuard, AllDone) {
    let (tx, rx) = mpsc::channel(1);
    (TaskGuard(tx), AllDone(rx))
}

/// Accepts on `listener` until `shutdown` turns true; runs `serve` for each connection.
/// With a `proxy` policy, `serve` gets the client's address from the PROXY header.
/// Each connection task holds a clone of `tasks`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
    proxy: Option<Arc<ProxyPolicy>>,
    tasks: TaskGuard,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: ConnEnd,
{
    let serve = Arc::new(serve);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (mut tcp, peer) = match accepted {
            // IPv4 clients of a [::] listener arrive as ::ffff:a.b.c.d; use the plain form
            // everywhere (limits, logs, the address passed upstream).
            Ok((tcp, peer)) => (tcp, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(policy) = &proxy {
            if !policy.trusts(peer.ip()) {
                warn!(%peer, "connection refused: this listener takes PROXY protocol connections from its load balancers only");
                continue;
            }
            // The load balancer's connections share its address: the per-address cap
            // applies to the client named in the header.
            let Ok(permit) = limits.global.clone().try_acquire_owned() else {
                debug!(%peer, "connection refused: too many connections");
                continue;
            };
            let (limits, policy, serve, task) = (limits.clone(), policy.clone(), serve.clone(), tasks.clone());
            tokio::spawn(async move {
                let _task = task;
                let client = match read_proxy_header(&mut tcp, policy.timeout).await {
                    Ok(Some(client)) => SocketAddr::new(client.ip().to_canonical(), client.port()),
                    Ok(None) => peer,
                    Err(HeaderError::Closed) => {
                        debug!(%peer, "load balancer health check");
                        return;
                    }
                    Err(HeaderError::Bad(e)) => {
                        warn!(%peer, error = %e, "connection refused: bad PROXY header");
                        return;
                    }
                };
                let Some(guard) = limits.admit_with(permit, client.ip()) else {
                    debug!(%client, "connection refused: too many connections");
                    return;
                };
                let _guard = guard;
                serve(tcp, client).await.log(client);
            });
            continue;
        }
        let Some(guard) = limits.admit(peer.ip()) else {
            debug!(%peer, "connection refused: too many connections");
            drop(tcp);
            continue;
        };
        let fut = serve(tcp, peer);
        let task = tasks.clone();
        tokio::spawn(async move {
            let (_guard, _task) = (guard, task);
            fut.await.log(peer);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Issue 13 item 11: a client with an IPv6 /64 is one client for the per-address cap;
    /// IPv4 and the IPv4-mapped form of the same address are one client too.
    #[test]
    fn addresses_in_one_ipv6_prefix_share_the_per_address_cap() {
        let limits = ConnLimits::new(100, 2, 64);
        let a = limits.admit(ip("2001:db8:1:2::1")).unwrap();
        let _b = limits.admit(ip("2001:db8:1:2:ffff:ffff:ffff:fffe")).unwrap();
        assert!(limits.admit(ip("2001:db8:1:2:abcd::9")).is_none(), "a third address of the /64 got in");
        // Another /64 is another client.
        let _c = limits.admit(ip("2001:db8:1:3::1")).unwrap();
        // A slot given back is free again for any address of the prefix.
        drop(a);
        let _d = limits.admit(ip("2001:db8:1:2::77")).unwrap();
        assert!(limits.admit(ip("2001:db8:1:2::78")).is_none());

        let _v4 = limits.admit(ip("192.0.2.7")).unwrap();
        let _mapped = limits.admit(ip("::ffff:192.0.2.7")).unwrap();
        assert!(limits.admit(ip("192.0.2.7")).is_none(), "the IPv4-mapped form is a different client");
        assert!(limits.admit(ip("192.0.2.8")).is_some(), "IPv4 is counted per address");

        // With `ipv6_prefix = 128` every IPv6 address is its own client again.
        let full = ConnLimits::new(100, 1, 128);
        let _e = full.admit(ip("2001:db8::1")).unwrap();
        assert!(full.admit(ip("2001:db8::2")).is_some());
        assert!(full.admit(ip("2001:db8::1")).is_none());
        // Every slot given back: nothing is left counted.
        drop((_b, _c, _d, _v4, _mapped, _e));
        assert!(limits.per_ip.lock().unwrap().is_empty());
    }

    /// The same through the accept loop: the clients arrive through a load balancer
    /// (PROXY protocol), the only way to get several IPv6 sources onto loopback.
    #[tokio::test]
    async fn the_accept_loop_caps_an_ipv6_prefix_as_one_client() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let policy = ProxyPolicy { trusted: vec!["127.0.0.1/32".parse().unwrap()], timeout: Duration::from_secs(5) };
        let (held_tx, held_rx) = watch::channel(false);
        tokio::spawn(accept_loop(
            listener,
            ConnLimits::new(100, 1, 64),
            shutdown,
            Some(Arc::new(policy)),
            task_guard().0,
            move |mut tcp: TcpStream, client: SocketAddr| {
                let mut held = held_rx.clone();
                async move {
                    let _ = tcp.write_all(format!("hello {}\n", client.ip()).as_bytes()).await;
                    // Keep the connection (and its slot) until the test ends.
                    let _ = held.changed().await;
                }
            },
        ));
        let connect = |source: &'static str| async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(format!("PROXY TCP6 {source} 2001:db8::ff 40000 993\r\n").as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            // The greeting line, or the close of a refused connection.
            while !got.ends_with(b"\n") {
                match tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await.unwrap().unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            (tcp, String::from_utf8(got).unwrap())
        };
        let (_first, greeting) = connect("2001:db8:1:2::1").await;
        assert_eq!(greeting, "hello 2001:db8:1:2::1\n");
        let (_second, greeting) = connect("2001:db8:1:2::2").await;
        assert_eq!(greeting, "", "a second address of the same /64 was served");
        let (_third, greeting) = connect("2001:db8:1:3::1").await;
        assert_eq!(greeting, "hello 2001:db8:1:3::1\n");
        let _ = held_tx.send(true);
        let _ = stop.send(true);
    }
}
