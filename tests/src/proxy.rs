//! A loopback TCP proxy that can black-hole its connections, for the fault
//! suite: a network path that stops carrying bytes without closing anything
//! (a dropped route, a firewall that drops packets, a failed-over VIP), which
//! SIGSTOP on the server only approximates.
//!
//! [`Proxy::black_hole`] makes every connection, open or new, swallow what
//! it is sent and forward nothing, while every socket stays open.
//! [`Proxy::heal`] makes *new* connections work again; connections that
//! were black-holed stay dead, as TCP connections whose path was cut do
//! until their owner gives up on them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

struct Conn {
    dead: Arc<AtomicBool>,
    sockets: [TcpStream; 2],
}

struct Shared {
    target: SocketAddr,
    black_holed: AtomicBool,
    stopped: AtomicBool,
    conns: Mutex<Vec<Conn>>,
    accepted: AtomicU64,
}

/// A running proxy; stopped (every connection closed) on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            black_holed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                accept(&s, client);
            }
        });
        Proxy { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://<addr>/` for a proxy in front of Redis.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Every connection, open or new, stops forwarding; nothing is closed.
    pub fn black_hole(&self) {
        self.shared.black_holed.store(true, Ordering::SeqCst);
        let conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.iter() {
            c.dead.store(true, Ordering::SeqCst);
        }
    }

    /// New connections forward again; black-holed ones stay dead.
    pub fn heal(&self) {
        self.shared.black_holed.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        let conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.iter() {
            for s in &c.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept(s: &Arc<Shared>, client: TcpStream) {
    let dead = Arc::new(AtomicBool::new(s.black_holed.load(Ordering::SeqCst)));
    let upstream = if dead.load(Ordering::SeqCst) {
        None
    } else {
        TcpStream::connect_timeout(&s.target, Duration::from_secs(2)).ok()
    };
    let Some(upstream) = upstream else {
        // Black-holed from the start: accept and swallow, never answer.
        let sink = client.try_clone().ok();
        if let Ok(c2) = client.try_clone() {
            s.conns.lock().unwrap_or_else(|e| e.into_inner()).push(Conn {
                dead: Arc::clone(&dead),
                sockets: [client, c2],
            });
        }
        if let Some(mut sink) = sink {
            thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while matches!(sink.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(c_read), Ok(u_write), Ok(u_read), Ok(c_write), Ok(c_keep), Ok(u_keep)) = (
        client.try_clone(),
        upstream.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    s.conns.lock().unwrap_or_else(|e| e.into_inner()).push(Conn {
        dead: Arc::clone(&dead),
        sockets: [c_keep, u_keep],
    });
    pump(c_read, u_write, Arc::clone(&dead));
    pump(u_read, c_write, dead);
}

/// Copies `from` to `to` until EOF; once `dead`, reads and drops everything.
fn pump(mut from: TcpStream, mut to: TcpStream, dead: Arc<AtomicBool>) {
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dead.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                break;
            }
        }
        if !dead.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
}
