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

    /// The guest's serial console.
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

    /// Fixed-name socket paths must fit in `sun_path` (108 bytes).
    pub fn check_socket_paths(&self) -> Result<(), String> {
        for socket in [self.qmp_socket(), self.qga_socket()] {
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
