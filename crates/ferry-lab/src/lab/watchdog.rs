//! The lab's watchdog: what `/dev/watchdog` is on real hardware, for hosts on a kernel
//! without softdog (LAB-NOTES). One process per lab host runs outside the host (in the
//! root namespace) and reads a FIFO that the host's agent feeds (`ha.watchdog`). Once
//! fed, if no byte comes for its timeout, it powers the host off as `ferry lab fault
//! HOST power-off` does — the agent and every QEMU of the host SIGKILLed together — and
//! the host stays off until `ferry lab heal`, like a machine reset that never boots. An
//! agent that hangs (SIGSTOP, a deadlock) so has its host stopped for real, which is
//! what the leader's deadline (`ferry_manager::ha::dead_after_ms`) counts on.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Fault, Lab, LabSpec};

/// The lab watchdog's timeout: the agent feeds it every heartbeat (1 s).
pub const TIMEOUT_MS: u64 = 4000;
/// How often the FIFO is read.
const POLL: Duration = Duration::from_millis(50);

/// The FIFO a host's agent feeds.
pub fn fifo_path(spec: &LabSpec, host: u32) -> PathBuf {
    spec.host_run_dir(host).join("watchdog")
}

/// The arguments that start (and identify) the watchdog of `host`.
pub fn arguments(state_dir: &Path, host: u32) -> Vec<String> {
    vec![
        "lab".into(),
        "watchdog".into(),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--host".into(),
        host.to_string(),
    ]
}

/// Runs the watchdog of `host` of the lab in `state_dir` until killed; returns only
/// on an error that leaves it unable to watch.
pub fn run(state_dir: &Path, host: u32) -> Result<(), String> {
    let lab = Lab::load(state_dir).map_err(|error| error.to_string())?;
    let spec = lab.spec().clone();
    let fifo = fifo_path(&spec, host);
    let name = spec.host_name(host);
    match nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => {}
        Err(error) => return Err(format!("cannot make {}: {error}", fifo.display())),
    }
    // Read and write: the FIFO never reports end-of-file when an agent goes away, and
    // opening it never waits for a writer.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .map_err(|error| format!("cannot open {}: {error}", fifo.display()))?;
    let timeout = Duration::from_millis(TIMEOUT_MS);
    eprintln!(
        "watchdog of {name}: watching {} ({TIMEOUT_MS} ms)",
        fifo.display()
    );
    let mut last_feed: Option<Instant> = None;
    let mut buffer = [0u8; 256];
    loop {
        match reader.read(&mut buffer) {
            Ok(count) if count > 0 => last_feed = Some(Instant::now()),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(format!("reading {}: {error}", fifo.display())),
        }
        if last_feed.is_some_and(|fed| fed.elapsed() >= timeout) {
            // Disarmed until the next agent feeds it.
            last_feed = None;
            let outcome = Lab::load(state_dir)
                .map_err(|error| error.to_string())
                .and_then(|mut lab| {
                    lab.fault(host, Fault::PowerOff)
                        .map_err(|error| error.to_string())
                });
            match outcome {
                Ok(done) => eprintln!("watchdog of {name}: not fed for {TIMEOUT_MS} ms; {done}"),
                Err(error) => eprintln!("watchdog of {name}: cannot power the host off: {error}"),
            }
        }
        std::thread::sleep(POLL);
    }
}
