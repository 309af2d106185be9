//! Child processes that cannot outlive the test that started them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a child gets to exit after SIGTERM before it is SIGKILLed. Envoy and the echo
/// app exit well within this; the bound keeps a wedged child from hanging the test.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Lines of the log printed when a test panics while the guard is alive.
const PANIC_TAIL_LINES: usize = 40;

/// Bytes read from the end of a log for a tail: enough for many lines, bounded so a huge
/// debug log does not flood the test output.
const TAIL_BYTES: u64 = 64 * 1024;

/// Creates a fresh temporary directory for one test's files (bootstraps, logs).
///
/// It is removed when the returned [`tempfile::TempDir`] is dropped; set
/// `TRELLIS_KEEP_TEST_DIRS=1` to keep it for post-mortem inspection.
pub fn test_dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("trellis-{name}-"))
        .tempdir()
        .context("creating the test temp dir")?;
    if std::env::var_os("TRELLIS_KEEP_TEST_DIRS").is_some_and(|v| v != "0") {
        dir.disable_cleanup(true);
        eprintln!("keeping test dir {}", dir.path().display());
    }
    Ok(dir)
}

/// Owns a child process: on drop (including during a panic) it is sent SIGTERM, then
/// SIGKILL after [`TERMINATE_GRACE`], and reaped.
///
/// Its stdout and stderr go to one log file, readable with [`ChildGuard::log_tail`]; when
/// the guard is dropped during a panic, the tail is printed to stderr so the test failure
/// shows what the process said.
///
/// The child stays in the test's process group on purpose: nextest signals the whole group
/// when it times a test out, which then reaches the child even though no destructor runs.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `command` with stdin closed and stdout+stderr appended to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> anyhow::Result<Self> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = command
            .spawn()
            .with_context(|| format!("spawning {name}: {command:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log_path,
            exit: None,
        })
    }

    /// The name given at spawn time (also the log file's stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where stdout and stderr are recorded.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8); empty if it cannot be read.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log (lossy UTF-8); empty if it cannot be read.
    pub fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log_path, lines).unwrap_or_default()
    }

    /// `Some(status)` once the child has exited, `None` while it runs.
    pub fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if let Some(status) = self.exit {
            return Ok(Some(status));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child
            .try_wait()
            .with_context(|| format!("polling {}", self.name))?;
        self.exit = status;
        Ok(status)
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit_status(), Ok(None))
    }

    /// Errors (with the log tail) if the child has already exited: for use right after a
    /// start, where an early exit usually means a bad config or a port clash.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.try_exit_status()? {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited early with {status}; log tail:\n{}",
                self.name,
                self.log_tail(PANIC_TAIL_LINES)
            ),
        }
    }

    /// Sends a signal (e.g. SIGHUP) to the child. No-op once it has exited.
    pub fn signal(&mut self, signal: Signal) -> anyhow::Result<()> {
        if self.try_exit_status()?.is_some() {
            return Ok(());
        }
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns how the child exited.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        // A failed SIGTERM (e.g. the child exited in between) still ends in SIGKILL + wait.
        let _ = self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let child = self.child.as_mut().context("child already taken")?;
        let _ = child.kill();
        let status = child
            .wait()
            .with_context(|| format!("waiting for {} after SIGKILL", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Polls `check` every `interval` until it succeeds, like [`crate::poll_until`], but
    /// fails at once (with the log tail) if the child exits meanwhile: a process that died
    /// on a bad config should not cost the whole timeout.
    pub fn wait_until<T, E: std::fmt::Display>(
        &mut self,
        timeout: Duration,
        interval: Duration,
        mut check: impl FnMut() -> Result<T, E>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            self.ensure_running()?;
            let last = match check() {
                Ok(value) => return Ok(value),
                Err(err) => err.to_string(),
            };
            let now = Instant::now();
            if now >= deadline {
                anyhow::bail!(
                    "{} not ready after {:.1?}; last error: {last}; log tail:\n{}",
                    self.name,
                    started.elapsed(),
                    self.log_tail(PANIC_TAIL_LINES)
                );
            }
            std::thread::sleep(interval.max(Duration::from_millis(1)).min(deadline - now));
        }
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} log tail ({}) ----\n{}\n---- end of {} log ----",
                self.name,
                self.log_path.display(),
                self.log_tail(PANIC_TAIL_LINES),
                self.name
            );
        }
        if let Err(err) = self.terminate(TERMINATE_GRACE) {
            eprintln!("failed to stop {}: {err:#}", self.name);
        }
    }
}

/// Runs a short-lived command (e.g. `xds-server bootstrap ...`) to completion and returns
/// its exit status, stdout and stderr, kept apart (unlike [`ChildGuard`]'s single log).
///
/// Fails if it does not exit within `timeout`, after killing it: a hung helper must not hang
/// the test. A non-zero exit is not an error here; check `output.status`.
pub fn run_to_completion(mut command: Command, timeout: Duration) -> anyhow::Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {command:?}"))?;
    // Drain both pipes concurrently so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("polling the child")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{command:?} still running after {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let join = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

fn read_tail(path: &Path, lines: usize) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    // When the read started mid-file the first line is probably partial: drop it.
    let skip_partial = usize::from(start > 0 && all.len() > lines);
    let from = all.len().saturating_sub(lines).max(skip_partial);
    Ok(all[from..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_last_lines() {
        let dir = test_dir("tail").expect("temp dir");
        let path = dir.path().join("x.log");
        let body: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, body).expect("write");
        assert_eq!(read_tail(&path, 2).expect("tail"), "line 98\nline 99");
        assert_eq!(read_tail(&path, 1000).expect("tail").lines().count(), 100);
    }

    #[test]
    fn guard_terminates_a_running_process() {
        let dir = test_dir("guard").expect("temp dir");
        let mut command = Command::new("sleep");
        command.arg("600");
        let mut guard = ChildGuard::spawn("sleep", command, dir.path()).expect("spawn");
        assert!(guard.is_running());
        let status = guard.terminate(Duration::from_secs(5)).expect("terminate");
        assert!(!status.success());
        assert!(!guard.is_running());
    }

    #[test]
    fn guard_escalates_to_sigkill() {
        let dir = test_dir("escalate").expect("temp dir");
        let mut command = Command::new("sh");
        // The child ignores SIGTERM, so only the SIGKILL fallback can stop it.
        command.args([
            "-c",
            "trap '' TERM; echo started; while :; do sleep 1; done",
        ]);
        let mut guard = ChildGuard::spawn("stubborn", command, dir.path()).expect("spawn");
        crate::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
            if guard.log().contains("started") {
                Ok(())
            } else {
                Err("no output yet")
            }
        });
        let started = Instant::now();
        let status = guard
            .terminate(Duration::from_millis(300))
            .expect("terminate");
        assert!(!status.success());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(guard.log_tail(5).contains("started"));
    }

    #[test]
    fn run_to_completion_separates_streams_and_times_out() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2; exit 3"]);
        let output = run_to_completion(command, Duration::from_secs(10)).expect("run");
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");

        let mut command = Command::new("sleep");
        command.arg("600");
        let started = Instant::now();
        let err = run_to_completion(command, Duration::from_millis(200)).expect_err("timeout");
        assert!(err.to_string().contains("still running"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
