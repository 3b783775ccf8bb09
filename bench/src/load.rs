//! The load generator: HTTP/1.1 keep-alive connections to Envoy's listener,
//! each request carrying one tenant of a rotating set.
//!
//! - [`closed_loop`]: every connection sends its next request as soon as the
//!   previous answer is in: the most the whole machine can do (max throughput).
//! - [`open_loop`]: a constant arrival rate from a precomputed schedule. A
//!   dispatcher thread releases request `i` at `start + i / rate`; whichever
//!   connection is free sends it, and its latency is measured from that
//!   intended send time, not from when a connection got round to it. A slow
//!   answer therefore shows up in the percentiles of every request queued
//!   behind it (no coordinated omission), as with wrk2.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// What to send: `GET path` to `addr`, request `i` with tenant `tenants[i % n]`.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub tenants: Arc<Vec<HeaderValue>>,
}

impl Target {
    pub fn new(addr: SocketAddr, path: &str, tenants: &[String]) -> Target {
        let tenants = tenants
            .iter()
            .map(|t| HeaderValue::from_str(t).unwrap_or(HeaderValue::from_static("invalid")))
            .collect();
        Target { addr, path: path.to_string(), tenants: Arc::new(tenants) }
    }

    fn tenant(&self, i: u64) -> HeaderValue {
        let n = self.tenants.len().max(1) as u64;
        self.tenants
            .get((i % n) as usize)
            .cloned()
            .unwrap_or(HeaderValue::from_static("none"))
    }
}

/// Answers by kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// 2xx: reached the upstream.
    pub ok: u64,
    /// 429: over quota.
    pub denied: u64,
    /// 503: quota service unavailable (fail-closed) or Envoy overflow.
    pub unavailable: u64,
    /// Any other status.
    pub other: u64,
    /// Connection errors (each one reconnects).
    pub errors: u64,
}

impl Counts {
    pub fn answered(&self) -> u64 {
        self.ok + self.denied + self.unavailable + self.other
    }

    fn add(&mut self, o: &Counts) {
        self.ok += o.ok;
        self.denied += o.denied;
        self.unavailable += o.unavailable;
        self.other += o.other;
        self.errors += o.errors;
    }

    fn record(&mut self, status: Option<u16>) {
        match status {
            Some(200..=299) => self.ok += 1,
            Some(429) => self.denied += 1,
            Some(503) => self.unavailable += 1,
            Some(_) => self.other += 1,
            None => self.errors += 1,
        }
    }
}

struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, sender: None }
    }

    async fn connect(&mut self) -> Option<&mut SendRequest<Empty<Bytes>>> {
        if self.sender.as_ref().is_some_and(|s| !s.is_closed()) {
            return self.sender.as_mut();
        }
        let stream = TcpStream::connect(self.addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        self.sender.as_mut()
    }

    /// One request; `None` on a connection error (the next call reconnects).
    async fn send(&mut self, target: &Target, i: u64) -> Option<u16> {
        let req = Request::get(target.path.as_str())
            .header(HOST, "bench")
            .header("x-tenant-id", target.tenant(i))
            .body(Empty::<Bytes>::new())
            .ok()?;
        let result = async {
            let sender = self.connect().await?;
            sender.ready().await.ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await.ok()?;
            Some(status)
        }
        .await;
        if result.is_none() {
            self.sender = None;
        }
        result
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime for the load generator: {e}"))
}

/// Result of a closed-loop run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    pub counts: Counts,
    pub seconds: f64,
    /// Answers per second (any status).
    pub rps: f64,
    /// 2xx answers per second.
    pub ok_rps: f64,
}

/// `conns` connections sending back to back for `duration`; requests rotate
/// over the target's tenants from the first.
pub fn closed_loop(target: &Target, conns: usize, threads: usize, duration: Duration) -> Throughput {
    run_closed(target, conns, threads, Some(duration), u64::MAX)
}

/// One request for each of the target's tenants, over `conns` connections
/// back to back: every tenant is then known to every component (a scaling
/// cell of 100,000 tenants really holds 100,000, whatever the rate).
pub fn touch_each(target: &Target, conns: usize, threads: usize) -> Throughput {
    run_closed(target, conns, threads, None, target.tenants.len() as u64)
}

/// Closed loop until `duration` has passed (or, without one, until
/// `requests` have been sent), never more than `requests`.
fn run_closed(target: &Target, conns: usize, threads: usize, duration: Option<Duration>, requests: u64) -> Throughput {
    let rt = runtime(threads);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let totals = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (target, next, stop) = (target.clone(), Arc::clone(&next), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(target.addr);
                let mut counts = Counts::default();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let status = conn.send(&target, i).await;
                    if status.is_none() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    counts.record(status);
                }
                counts
            }));
        }
        if let Some(duration) = duration {
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
        }
        let mut totals = Counts::default();
        for t in tasks {
            if let Ok(c) = t.await {
                totals.add(&c);
            }
        }
        totals
    });
    let seconds = started.elapsed().as_secs_f64();
    Throughput {
        counts: totals,
        seconds,
        rps: totals.answered() as f64 / seconds,
        ok_rps: totals.ok as f64 / seconds,
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub counts: Counts,
    pub offered_rps: f64,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// `rate` requests per second for `duration` on up to `conns` connections,
/// latency from each request's intended send time (see the module docs).
pub fn open_loop(target: &Target, rate: f64, duration: Duration, conns: usize, threads: usize) -> Latency {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let (tx, rx) = flume::bounded::<(u64, Instant)>(total as usize + 1);
    let hist = Arc::new(Mutex::new(new_histogram()));
    let rt = runtime(threads);
    let start = Instant::now() + Duration::from_millis(50);

    // The schedule: request i is due at start + i * period. A plain thread
    // sleeping to each due time (Linux wakes it within ~0.1 ms) releases it;
    // tokio's timer would round every due time up to a whole millisecond.
    let dispatcher = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send((i, due)).is_err() {
                return;
            }
        }
    });

    let counts = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (target, rx, hist) = (target.clone(), rx.clone(), Arc::clone(&hist));
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(target.addr);
                let mut local = new_histogram();
                let mut counts = Counts::default();
                while let Ok((i, due)) = rx.recv_async().await {
                    let status = conn.send(&target, i).await;
                    let us = due.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                    let _ = local.record(us.max(1));
                    counts.record(status);
                }
                if let Ok(mut h) = hist.lock() {
                    let _ = h.add(&local);
                }
                counts
            }));
        }
        drop(rx);
        let mut totals = Counts::default();
        for t in tasks {
            if let Ok(c) = t.await {
                totals.add(&c);
            }
        }
        totals
    });
    let _ = dispatcher.join();
    let elapsed = start.elapsed().as_secs_f64();
    let h = hist.lock().map(|h| h.clone()).unwrap_or_else(|_| new_histogram());
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        counts,
        offered_rps: rate,
        achieved_rps: counts.answered() as f64 / elapsed,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 us .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}
