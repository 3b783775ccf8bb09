//! Child processes owned by a test: output to a log file, stopped on drop,
//! log printed when the owning test panics.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a child gets to exit after SIGTERM before it is sent SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lines of a log shown when a test fails.
const LOG_TAIL_LINES: usize = 200;

/// A temp dir that is removed on drop unless `SLUICE_KEEP_TMP` is set (then
/// its path is printed so the logs and data can be read after the run).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sluice-{prefix}-"))
            .tempdir()
            .expect("create a temp dir for a test component");
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("SLUICE_KEEP_TMP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("SLUICE_KEEP_TMP: kept {}", dir.keep().display());
            }
        }
    }
}

/// Why a child did not become ready.
#[derive(Debug)]
pub enum NotReady {
    Exited(ExitStatus),
    TimedOut(Duration),
}

/// A running child process. Dropping it stops it (SIGTERM, then SIGKILL after
/// a grace period) and reaps it; if the current thread is panicking, the tail
/// of its log is printed first so a failing test shows what every process said.
pub struct ChildProc {
    name: String,
    child: Child,
    log_path: PathBuf,
    reaped: bool,
    log_reported: bool,
}

impl ChildProc {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> ChildProc {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap_or_else(|e| panic!("open log {} for {name}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone a log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {name} ({cmd:?}): {e}"));
        ChildProc {
            name: name.to_string(),
            child,
            log_path: log_path.to_path_buf(),
            reaped: false,
            log_reported: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the child has written so far (lossy UTF-8).
    pub fn log(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A header naming the process and log file, then the log's last lines.
    pub fn log_report(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let skipped = lines.len().saturating_sub(LOG_TAIL_LINES);
        let mut out = format!(
            "===== {} (pid {}) log: {} =====\n",
            self.name,
            self.pid(),
            self.log_path.display()
        );
        if skipped > 0 {
            out.push_str(&format!("... {skipped} earlier lines in the file ...\n"));
        }
        for line in lines.iter().skip(skipped) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&format!("===== end of {} log =====\n", self.name));
        out
    }

    /// The exit status if the child has exited (reaping it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    pub fn is_running(&mut self) -> bool {
        !self.reaped && self.exit_status().is_none()
    }

    /// Sends a signal (no-op once the child is reaped, so a recycled pid is never hit).
    pub fn signal(&self, sig: libc::c_int) {
        if self.reaped {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Freezes the child (SIGSTOP): its sockets stay open but nothing answers,
    /// which is how a hung dependency looks to its clients.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Undoes [`ChildProc::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Kills the child at once (SIGKILL: no shutdown code runs, as in a
    /// crash or an OOM kill) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if self.reaped || self.exit_status().is_some() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Stops the child: SIGTERM, then SIGKILL if it has not exited within the
    /// grace period. Idempotent.
    pub fn stop(&mut self) {
        if self.reaped || self.exit_status().is_some() {
            return;
        }
        self.resume();
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {}) ignored SIGTERM for {STOP_GRACE:?}: sending SIGKILL",
            self.name,
            self.pid()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Polls `ready` until it returns true, failing early if the child exits.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), NotReady> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Err(NotReady::Exited(status));
            }
            if ready() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(NotReady::TimedOut(timeout));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the child and panics with `msg` followed by its log.
    pub fn fail(mut self, msg: &str) -> ! {
        self.stop();
        self.log_reported = true;
        panic!("{msg}\n{}", self.log_report());
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if thread::panicking() && !self.log_reported {
            eprintln!("{}", self.log_report());
        }
        self.stop();
    }
}

/// Starts a component with `attempt`, retrying (up to 3 times) when the child
/// exited early because its port was taken between [`crate::free_port`] and
/// its bind. Any other failure panics with the child's log.
pub fn start_with_retry<T>(
    what: &str,
    mut attempt: impl FnMut() -> Result<T, (ChildProc, NotReady)>,
) -> T {
    const ATTEMPTS: usize = 3;
    for n in 1..=ATTEMPTS {
        match attempt() {
            Ok(started) => return started,
            Err((proc, reason)) => {
                let log = proc.log().to_ascii_lowercase();
                let port_taken =
                    log.contains("address already in use") || log.contains("addrinuse");
                if matches!(reason, NotReady::Exited(_)) && port_taken && n < ATTEMPTS {
                    eprintln!("{what}: port taken, retrying on another port ({n}/{ATTEMPTS})");
                    drop(proc);
                    continue;
                }
                let why = match reason {
                    NotReady::Exited(status) => format!("exited before it was ready ({status})"),
                    NotReady::TimedOut(t) => format!("was not ready after {t:?}"),
                };
                proc.fail(&format!("{what} {why}"));
            }
        }
    }
    panic!("{what}: no start attempt left");
}

/// Writes `contents` to `path`, panicking with the path on error.
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
