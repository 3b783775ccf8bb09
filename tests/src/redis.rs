//! A private `redis-server` on a free port with its own data dir.

use crate::paths::redis_server_bin;
use crate::process::{start_with_retry, ChildProc, NotReady, TestDir};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A Redis server owned by a test. Stopped and its data dir removed on drop.
pub struct Redis {
    proc: Option<ChildProc>,
    port: u16,
    persistent: bool,
    dir: TestDir,
}

impl Redis {
    /// Starts Redis without persistence (the fastest; data lives until drop).
    pub fn start() -> Redis {
        Redis::start_inner(false)
    }

    /// Starts Redis with AOF on (`appendfsync always`), so [`Redis::restart`]
    /// keeps every acknowledged write, as the `make run` Redis does.
    pub fn start_persistent() -> Redis {
        Redis::start_inner(true)
    }

    fn start_inner(persistent: bool) -> Redis {
        let dir = TestDir::new("redis");
        let (proc, port) = start_with_retry("redis-server", || {
            let port = crate::free_port();
            spawn(dir.path(), port, persistent).map(|p| (p, port))
        });
        Redis {
            proc: Some(proc),
            port,
            persistent,
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(ChildProc::pid)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/`, as the service's `--redis-url` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(ChildProc::log).unwrap_or_default()
    }

    /// Kills the server (SIGTERM, then SIGKILL): clients see connection refused.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Kills the server with SIGKILL (no shutdown save: only what the AOF
    /// already holds survives). [`Redis::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port and data dir.
    pub fn restart(&mut self) {
        self.stop();
        match spawn(self.dir.path(), self.port, self.persistent) {
            Ok(p) => self.proc = Some(p),
            Err((p, NotReady::Exited(s))) => p.fail(&format!(
                "redis-server did not restart on port {} ({s})",
                self.port
            )),
            Err((p, NotReady::TimedOut(t))) => p.fail(&format!(
                "redis-server did not answer PING within {t:?} after restart"
            )),
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is
    /// answered, so clients hit their timeouts.
    pub fn pause(&self) {
        if let Some(p) = &self.proc {
            p.pause();
        }
    }

    /// Undoes [`Redis::pause`].
    pub fn resume(&self) {
        if let Some(p) = &self.proc {
            p.resume();
        }
    }

    /// Runs one command, e.g. `redis.command(&["GET", "k"])`.
    pub fn command(&self, args: &[&str]) -> io::Result<RespValue> {
        command(self.addr(), args)
    }

    /// Runs one command and panics on an I/O or Redis error.
    pub fn cmd(&self, args: &[&str]) -> RespValue {
        match self.command(args) {
            Ok(RespValue::Error(e)) => panic!("redis {args:?} failed: {e}"),
            Ok(v) => v,
            Err(e) => panic!("redis {args:?} failed: {e}"),
        }
    }
}

fn spawn(dir: &Path, port: u16, persistent: bool) -> Result<ChildProc, (ChildProc, NotReady)> {
    spawn_with(dir, port, persistent, &[])
}

/// Starts `redis-server` on `port` with data in `dir` and `extra` arguments,
/// and waits until it answers PING.
pub(crate) fn spawn_with(
    dir: &Path,
    port: u16,
    persistent: bool,
    extra: &[&str],
) -> Result<ChildProc, (ChildProc, NotReady)> {
    let mut cmd = Command::new(redis_server_bin());
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--daemonize",
        "no",
        "--save",
        "",
    ])
    .args(["--logfile", "", "--protected-mode", "no"])
    .arg("--dir")
    .arg(dir);
    if persistent {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    cmd.args(extra);
    let mut proc = ChildProc::spawn("redis-server", cmd, &dir.join("redis.log"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match proc.wait_ready(
        READY_TIMEOUT,
        || matches!(command(addr, &["PING"]), Ok(RespValue::Simple(s)) if s == "PONG"),
    ) {
        Ok(()) => Ok(proc),
        Err(reason) => Err((proc, reason)),
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<RespValue>>),
}

impl RespValue {
    /// The reply as text: simple and bulk strings, integers.
    pub fn as_string(&self) -> Option<String> {
        match self {
            RespValue::Simple(s) => Some(s.clone()),
            RespValue::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            RespValue::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    /// The reply as an integer (integers and numeric strings).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            RespValue::Int(i) => Some(*i),
            other => other.as_string().and_then(|s| s.parse().ok()),
        }
    }

    /// The elements of an array reply as strings (nil and non-arrays: empty).
    pub fn strings(&self) -> Vec<String> {
        match self {
            RespValue::Array(Some(items)) => {
                items.iter().filter_map(RespValue::as_string).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Sends one command on a fresh connection and reads the reply.
pub fn command(addr: SocketAddr, args: &[&str]) -> io::Result<RespValue> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    stream.write_all(&req)?;
    read_value(&mut BufReader::new(stream))
}

fn read_value(r: &mut impl BufRead) -> io::Result<RespValue> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "redis closed the connection",
        ));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad RESP line {line:?}"),
        )
    };
    let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
    match kind {
        "+" => Ok(RespValue::Simple(rest.to_string())),
        "-" => Ok(RespValue::Error(rest.to_string())),
        ":" => rest.parse().map(RespValue::Int).map_err(|_| bad()),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                return Ok(RespValue::Bulk(None));
            }
            let mut buf = vec![0u8; usize::try_from(len).map_err(|_| bad())? + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(buf.len() - 2);
            Ok(RespValue::Bulk(Some(buf)))
        }
        "*" => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            if n < 0 {
                return Ok(RespValue::Array(None));
            }
            let mut items = Vec::new();
            for _ in 0..n {
                items.push(read_value(r)?);
            }
            Ok(RespValue::Array(Some(items)))
        }
        _ => Err(bad()),
    }
}
