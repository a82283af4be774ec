//! The hashing threads, shared fairly by the clients that want a hash (SECURITY.md §H).
//!
//! argon2id costs ~12 ms of a core and 19 MiB per evaluation, so a fixed set of threads
//! (`limits.max_concurrent_hashes`) does all of it. Jobs are queued **per owner** (the
//! client's address key: IPv4 /32, IPv6 /64 by default; admin requests have an owner of
//! their own) and the threads take them round-robin over the owners: one address with a
//! thousand jobs waiting gets one hash in turn like an address with one, so a flood from a
//! few addresses delays everyone else by a few hashes, not by the flood. Each owner may
//! have at most [`PER_OWNER`] jobs waiting or running; more are refused at once (that
//! client gets "try again later", nobody else does). A job whose requester has gone (the
//! connection closed, the request timed out: its answer channel is closed) or that waited
//! past its deadline is dropped without running.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Jobs one owner may have waiting or running at once. Turns, not this cap, make the
/// queue fair; the cap keeps one address from filling [`MAX_WAITING`], and is high
/// enough for an office behind one NAT address whose mail apps all log in at once.
pub const PER_OWNER: usize = 128;
/// Jobs waiting in all (memory bound; reached only with more than a thousand owners).
pub const MAX_WAITING: usize = 16_384;

/// Who a job is for: the fairness unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A client, by its client key ([`crate::addr::client_key`]).
    Address(IpAddr),
    /// The admin socket (imports, password changes).
    Admin,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// This owner has [`PER_OWNER`] jobs already.
    #[error("too many checks from this address at once")]
    Owner,
    /// [`MAX_WAITING`] jobs wait already.
    #[error("the hashing queue is full")]
    Full,
}

struct Job {
    run: Box<dyn FnOnce() + Send>,
    /// The requester stopped waiting.
    gone: Box<dyn Fn() -> bool + Send>,
    deadline: Option<Instant>,
    /// When it was queued (for the wait metric).
    queued: Instant,
}

#[derive(Default)]
struct OwnerQueue {
    jobs: VecDeque<Job>,
    running: usize,
}

#[derive(Default)]
struct State {
    owners: HashMap<Owner, OwnerQueue>,
    /// Owners with jobs waiting, in turn order.
    turn: VecDeque<Owner>,
    waiting: usize,
    closed: bool,
}

/// Counts for tests and the hashing gauge.
#[derive(Default)]
pub struct Gauge {
    active: AtomicUsize,
    peak: AtomicUsize,
    dropped: AtomicUsize,
}

struct Inner {
    state: Mutex<State>,
    ready: Condvar,
    gauge: Gauge,
    meters: Meters,
}

/// The pool's metrics (registered by [`HashPool::register_metrics`]).
struct Meters {
    /// Jobs waiting (`mailgate_hashing_queue_jobs`).
    waiting: prometheus_client::metrics::gauge::Gauge,
    /// Jobs running (`mailgate_hashing_running_jobs`).
    running: prometheus_client::metrics::gauge::Gauge,
    /// Time from queueing to a thread taking the job (`mailgate_hashing_wait_seconds`).
    wait: prometheus_client::metrics::histogram::Histogram,
    /// Jobs dropped without running (`mailgate_hashing_dropped_total`).
    dropped: prometheus_client::metrics::counter::Counter,
}

impl Meters {
    fn set_waiting(&self, n: usize) {
        self.waiting.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The pool. Cloning shares it; the threads end when the last clone is dropped.
#[derive(Clone)]
pub struct HashPool {
    inner: Arc<Inner>,
    _close: Arc<CloseOnDrop>,
}

/// Tells the threads to end when the last [`HashPool`] handle goes.
struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.closed = true;
        }
        self.0.ready.notify_all();
    }
}

impl HashPool {
    /// Starts `threads` hashing threads (at least one), each with its argon2 memory.
    pub fn new(threads: usize) -> HashPool {
        let meters = Meters {
            waiting: Default::default(),
            running: Default::default(),
            wait: crate::metrics::wait_histogram(),
            dropped: Default::default(),
        };
        let inner = Arc::new(Inner { state: Mutex::default(), ready: Condvar::new(), gauge: Gauge::default(), meters });
        for n in 0..threads.max(1) {
            let inner = inner.clone();
            let spawned = std::thread::Builder::new().name(format!("mailgate-hash-{n}")).spawn(move || {
                crate::auth::password::reserve_working_memory();
                worker(&inner);
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a hashing thread");
            }
        }
        HashPool { _close: Arc::new(CloseOnDrop(inner.clone())), inner }
    }

    /// Queues `f` for `owner`; its result arrives on the returned channel. Dropping the
    /// receiver before the job starts cancels it. `deadline`: the job is dropped if it has
    /// not started by then.
    pub fn submit<T: Send + 'static>(
        &self,
        owner: Owner,
        deadline: Option<Instant>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, Busy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let probe = tx.clone();
        let job = Job {
            run: Box::new(move || {
                let sender = tx.lock().ok().and_then(|mut t| t.take());
                if let Some(sender) = sender {
                    let _ = sender.send(f());
                }
            }),
            gone: Box::new(move || probe.lock().ok().and_then(|t| t.as_ref().map(|s| s.is_closed())).unwrap_or(true)),
            deadline,
            queued: Instant::now(),
        };
        let mut s = self.inner.state.lock().map_err(|_| Busy::Full)?;
        if s.waiting >= MAX_WAITING {
            return Err(Busy::Full);
        }
        let q = s.owners.entry(owner).or_default();
        if q.jobs.len() + q.running >= PER_OWNER {
            return Err(Busy::Owner);
        }
        let first = q.jobs.is_empty();
        q.jobs.push_back(job);
        if first {
            s.turn.push_back(owner);
        }
        s.waiting += 1;
        self.inner.meters.set_waiting(s.waiting);
        drop(s);
        self.inner.ready.notify_one();
        Ok(rx)
    }

    /// The most jobs that have run at once.
    pub fn peak(&self) -> usize {
        self.inner.gauge.peak.load(Ordering::SeqCst)
    }

    /// Jobs dropped without running (requester gone, deadline passed).
    pub fn dropped(&self) -> usize {
        self.inner.gauge.dropped.load(Ordering::SeqCst)
    }

    /// Registers the queue's gauges, its wait histogram and its dropped-job counter.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        let m = &self.inner.meters;
        metrics.register("hashing_queue_jobs", "Hash jobs waiting for a hashing thread", m.waiting.clone());
        metrics.register("hashing_running_jobs", "Hash jobs running now", m.running.clone());
        metrics.register("hashing_wait_seconds", "Time a hash job waited for a thread", m.wait.clone());
        metrics.register(
            "hashing_dropped",
            "Hash jobs dropped without running (client gone, deadline passed)",
            m.dropped.clone(),
        );
    }

    /// Jobs waiting now.
    pub fn waiting(&self) -> usize {
        self.inner.state.lock().map(|s| s.waiting).unwrap_or(0)
    }
}

/// A hashing thread: takes the next owner's next job, round-robin, and runs it.
fn worker(inner: &Inner) {
    loop {
        let (owner, job) = {
            let Ok(mut s) = inner.state.lock() else { return };
            loop {
                if s.closed {
                    return;
                }
                if let Some(next) = take_next(&mut s) {
                    inner.meters.set_waiting(s.waiting);
                    break next;
                }
                s = match inner.ready.wait(s) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        let taken = Instant::now();
        inner.meters.wait.observe(taken.saturating_duration_since(job.queued).as_secs_f64());
        let expired = job.deadline.is_some_and(|d| taken >= d);
        if expired || (job.gone)() {
            inner.gauge.dropped.fetch_add(1, Ordering::SeqCst);
            inner.meters.dropped.inc();
        } else {
            let now = inner.gauge.active.fetch_add(1, Ordering::SeqCst) + 1;
            inner.gauge.peak.fetch_max(now, Ordering::SeqCst);
            inner.meters.running.inc();
            (job.run)();
            inner.meters.running.dec();
            inner.gauge.active.fetch_sub(1, Ordering::SeqCst);
        }
        if let Ok(mut s) = inner.state.lock()
            && let Some(q) = s.owners.get_mut(&owner)
        {
            q.running = q.running.saturating_sub(1);
            if q.running == 0 && q.jobs.is_empty() {
                s.owners.remove(&owner);
            }
        }
    }
}

/// The next job in turn order; its owner goes to the back of the turn if it has more.
fn take_next(s: &mut State) -> Option<(Owner, Job)> {
    let owner = s.turn.pop_front()?;
    let q = s.owners.get_mut(&owner)?;
    let job = q.jobs.pop_front()?;
    q.running += 1;
    let more = !q.jobs.is_empty();
    s.waiting = s.waiting.saturating_sub(1);
    if more {
        s.turn.push_back(owner);
    }
    Some((owner, job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(n: u8) -> Owner {
        Owner::Address(IpAddr::from([192, 0, 2, n]))
    }

    /// One thread, held busy while jobs queue: an owner with many jobs and an owner with
    /// one take turns, so the one job runs second, not after the many.
    #[tokio::test]
    async fn owners_take_turns() {
        let pool = HashPool::new(1);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = pool.submit(addr(9), None, move || held.recv()).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut rxs = Vec::new();
        for i in 0..PER_OWNER {
            let order = order.clone();
            rxs.push(pool.submit(addr(1), None, move || order.lock().unwrap().push(format!("flood{i}"))).unwrap());
        }
        let o = order.clone();
        rxs.push(pool.submit(addr(2), None, move || o.lock().unwrap().push("owner".into())).unwrap());
        assert_eq!(pool.submit(addr(1), None, || ()).unwrap_err(), Busy::Owner, "per-owner cap");
        release.send(()).unwrap();
        let _ = blocker.await;
        for rx in rxs {
            rx.await.unwrap();
        }
        let order = order.lock().unwrap();
        let pos = order.iter().position(|s| s == "owner").unwrap();
        assert!(pos <= 1, "the single job ran at position {pos}: {order:?}");
    }

    /// A job whose requester stopped waiting, or whose deadline passed, never runs.
    #[tokio::test]
    async fn abandoned_jobs_are_dropped() {
        let pool = HashPool::new(1);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = pool.submit(addr(9), None, move || held.recv()).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let gone = pool.submit(addr(1), None, move || r.fetch_add(1, Ordering::SeqCst)).unwrap();
        drop(gone);
        let r = ran.clone();
        let late = pool.submit(addr(2), Some(Instant::now()), move || r.fetch_add(1, Ordering::SeqCst)).unwrap();
        let r = ran.clone();
        let kept = pool.submit(addr(3), None, move || r.fetch_add(1, Ordering::SeqCst)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        release.send(()).unwrap();
        let _ = blocker.await;
        kept.await.unwrap();
        assert!(late.await.is_err(), "the late job sent nothing");
        assert_eq!(ran.load(Ordering::SeqCst), 1, "only the job still wanted ran");
        assert_eq!(pool.dropped(), 2);
        assert_eq!(pool.waiting(), 0);
    }

    /// The metrics: jobs waiting and running while one thread is held, the wait of
    /// each job taken, the dropped ones; all back to 0 after.
    #[tokio::test]
    async fn the_queue_is_measured() {
        let pool = HashPool::new(1);
        let metrics = crate::metrics::Metrics::new();
        pool.register_metrics(&metrics);
        let sample = |name: &str| -> f64 {
            let text = metrics.render();
            let line = text.lines().find(|l| l.split(' ').next() == Some(name));
            line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("{name}\n{text}"))
        };
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = pool.submit(addr(9), None, move || held.recv()).unwrap();
        let queued: Vec<_> = (1..=3).map(|n| pool.submit(addr(n), None, || ()).unwrap()).collect();
        let gone = pool.submit(addr(4), None, || ()).unwrap();
        drop(gone);
        // The blocker is running (the others wait behind it).
        while sample("mailgate_hashing_running_jobs") < 1.0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(sample("mailgate_hashing_queue_jobs"), 4.0);
        std::thread::sleep(Duration::from_millis(20));
        release.send(()).unwrap();
        let _ = blocker.await;
        for rx in queued {
            rx.await.unwrap();
        }
        while pool.dropped() < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(sample("mailgate_hashing_queue_jobs"), 0.0);
        assert_eq!(sample("mailgate_hashing_wait_seconds_count"), 5.0, "every job taken, run or dropped");
        assert!(sample("mailgate_hashing_wait_seconds_sum") >= 4.0 * 0.02, "four waited behind the blocker");
        assert_eq!(sample("mailgate_hashing_dropped_total"), 1.0);
        // The last job's thread may still be finishing its bookkeeping.
        while sample("mailgate_hashing_running_jobs") > 0.0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
