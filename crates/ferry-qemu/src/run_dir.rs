//! A VM's run directory: the files through which a supervisor finds and talks to its
//! QEMU. Everything needed to reattach after a supervisor restart lives here.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The serial console log is kept under this: past it, it is rotated to `console.log.1`.
pub const CONSOLE_LOG_LIMIT: u64 = 1 << 20;
/// `last_words` reads only this much of the end of each log.
pub const LAST_WORDS_TAIL: u64 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// QMP control socket (QEMU is the server).
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Host end of the guest agent's virtio-serial port.
    pub fn qga_socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    /// Written by QEMU itself (`-pidfile`), so it names QEMU and not a wrapper.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The guest's serial console, interactive (one client at a time).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// The graphical console: QEMU's VNC server (RFB).
    pub fn vnc_socket(&self) -> PathBuf {
        self.dir.join("vnc.sock")
    }

    /// What the guest wrote to its serial console lately (QEMU appends to it).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The console log before the last rotation.
    pub fn console_log_rotated(&self) -> PathBuf {
        self.dir.join("console.log.1")
    }

    /// Keeps the console log, which the guest fills at will, under `limit`: once it is
    /// past it, it is copied over `console.log.1` and emptied. QEMU opened it to append
    /// (`logappend=on`), so it goes on writing at the new end; what it writes between
    /// the copy and the truncation is lost. `true` when it rotated.
    pub fn rotate_console_log(&self, limit: u64) -> std::io::Result<bool> {
        let log = self.console_log();
        let size = match std::fs::metadata(&log) {
            Ok(metadata) => metadata.len(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error),
        };
        if size <= limit {
            return Ok(false);
        }
        std::fs::copy(&log, self.console_log_rotated())?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)?
            .set_len(0)?;
        Ok(true)
    }

    /// QEMU's own stdout and stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// The spec the running QEMU was started from, for reattaching.
    pub fn spec_file(&self) -> PathBuf {
        self.dir.join("spec.json")
    }

    /// What a QEMU that ended left behind, for the event that reports it: the guest
    /// kernel's first panic, oops or BUG line in the console's last 64 KiB, and QEMU's
    /// last words. Only the logs' tails are read, however large they grew.
    pub fn last_words(&self) -> String {
        let console = tail(&self.console_log(), LAST_WORDS_TAIL);
        let guest = console.lines().find(|line| {
            ["Kernel panic", "Oops", "BUG:"]
                .iter()
                .any(|mark| line.contains(mark))
        });
        let qemu = tail(&self.qemu_log(), LAST_WORDS_TAIL);
        let qemu: Vec<&str> = qemu
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let qemu = qemu[qemu.len().saturating_sub(2)..].join(" | ");
        [
            guest.map(|line| format!("guest console: {}", line.trim())),
            (!qemu.is_empty()).then(|| format!("QEMU: {qemu}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// Fixed-name socket paths must fit in `sun_path` (108 bytes).
    pub fn check_socket_paths(&self) -> Result<(), String> {
        for socket in [
            self.qmp_socket(),
            self.qga_socket(),
            self.console_socket(),
            self.vnc_socket(),
        ] {
            if socket.as_os_str().len() >= 108 {
                return Err(format!(
                    "socket path {} is longer than 107 bytes; use a shorter run directory",
                    socket.display()
                ));
            }
        }
        Ok(())
    }
}

/// The last `max` bytes of a file, from the first whole line in them; empty when the
/// file cannot be read (last words are a courtesy, never a reason to fail).
fn tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let start = size.saturating_sub(max);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.take(max).read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(match (start > 0, text.split_once('\n')) {
            (true, Some((_, whole_lines))) => whole_lines.to_string(),
            _ => text,
        })
    };
    read().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_read_only_the_tail_of_a_huge_console_log() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let filler = "x".repeat(79) + "\n";
        let mut console = String::from("Kernel panic - of an earlier boot\n");
        console.push_str(&filler.repeat(20_000));
        console.push_str("[ 9.1] Kernel panic - not syncing: this boot\n");
        std::fs::write(run.console_log(), console).unwrap();
        assert_eq!(
            run.last_words(),
            "guest console: [ 9.1] Kernel panic - not syncing: this boot"
        );
    }

    #[test]
    fn the_console_log_past_its_limit_moves_to_dot_1_and_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        assert!(!run.rotate_console_log(100).unwrap(), "no log yet");
        std::fs::write(run.console_log(), "a".repeat(100)).unwrap();
        assert!(!run.rotate_console_log(100).unwrap());
        std::fs::write(run.console_log(), "b".repeat(101)).unwrap();
        assert!(run.rotate_console_log(100).unwrap());
        assert_eq!(std::fs::metadata(run.console_log()).unwrap().len(), 0);
        assert_eq!(
            std::fs::read_to_string(run.console_log_rotated()).unwrap(),
            "b".repeat(101)
        );
        // The next rotation replaces the older one: one .1, never more.
        std::fs::write(run.console_log(), "c".repeat(101)).unwrap();
        assert!(run.rotate_console_log(100).unwrap());
        assert_eq!(
            std::fs::read_to_string(run.console_log_rotated()).unwrap(),
            "c".repeat(101)
        );
        assert!(!dir.path().join("console.log.2").exists());
    }

    #[test]
    fn last_words_name_the_guest_panic_and_the_end_of_qemus_log() {
        let dir = std::env::temp_dir().join(format!("ferry-last-words-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = RunDir::new(&dir);
        assert_eq!(run.last_words(), "");
        std::fs::write(
            run.console_log(),
            "booting\n[ 16.3] BUG: kernel NULL pointer dereference\n[ 16.4] Kernel panic - not syncing\n",
        )
        .unwrap();
        std::fs::write(run.qemu_log(), "one\ntwo\n\nthree\n").unwrap();
        assert_eq!(
            run.last_words(),
            "guest console: [ 16.3] BUG: kernel NULL pointer dereference; QEMU: two | three"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
