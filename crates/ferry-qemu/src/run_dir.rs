//! A VM's run directory: the files through which a supervisor finds and talks to its
//! QEMU. Everything needed to reattach after a supervisor restart lives here.

use std::path::{Path, PathBuf};

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

    /// Everything the guest wrote to its serial console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
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
    /// kernel's first panic, oops or BUG line on the console, and QEMU's last words.
    pub fn last_words(&self) -> String {
        let console = std::fs::read_to_string(self.console_log()).unwrap_or_default();
        let guest = console.lines().find(|line| {
            ["Kernel panic", "Oops", "BUG:"]
                .iter()
                .any(|mark| line.contains(mark))
        });
        let qemu = std::fs::read_to_string(self.qemu_log()).unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

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
