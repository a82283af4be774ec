//! Accept loops: connection caps (global and per client address), one task per connection.

use crate::proto::proxy;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

/// Caps on open connections.
pub struct ConnLimits {
    global: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// Held while a connection is open.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.limits.per_ip.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    /// `max`: all connections; `max_per_ip`: from one address.
    pub fn new(max: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits { global: Arc::new(Semaphore::new(max)), per_ip: Mutex::new(HashMap::new()), max_per_ip })
    }

    /// A slot for a connection from `ip`, or `None` if a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        self.admit_with(permit, ip)
    }

    /// The per-address part of [`ConnLimits::admit`], for a connection already counted.
    fn admit_with(self: &Arc<Self>, permit: tokio::sync::OwnedSemaphorePermit, ip: IpAddr) -> Option<ConnGuard> {
        let mut m = self.per_ip.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(ConnGuard { limits: self.clone(), ip, _permit: permit })
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

/// Accepts on `listener` until `shutdown` turns true; runs `serve` for each connection.
/// With a `proxy` policy, `serve` gets the client's address from the PROXY header.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
    proxy: Option<Arc<ProxyPolicy>>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
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
            let (limits, policy, serve) = (limits.clone(), policy.clone(), serve.clone());
            tokio::spawn(async move {
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
                serve(tcp, client).await;
            });
            continue;
        }
        let Some(guard) = limits.admit(peer.ip()) else {
            debug!(%peer, "connection refused: too many connections");
            drop(tcp);
            continue;
        };
        let fut = serve(tcp, peer);
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }
}
