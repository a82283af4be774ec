//! Accept loops: connection caps (global and per client address), one task per connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
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
        let mut m = self.per_ip.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(ConnGuard { limits: self.clone(), ip, _permit: permit })
    }
}

/// Accepts on `listener` until `shutdown` turns true; runs `serve` for each connection.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
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
