use std::path::PathBuf;

use crate::qga::QgaError;
use crate::qmp::QmpError;

/// What went wrong driving a QEMU process. Each message names the VM or the file and,
/// where QEMU said why, carries its words.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The spec failed validation.
    #[error(transparent)]
    Spec(#[from] ferry_model::SpecError),
    /// A file the VM needs is missing.
    #[error("VM {vm}: {what} {} does not exist", path.display())]
    MissingFile {
        vm: String,
        what: &'static str,
        path: PathBuf,
    },
    /// QEMU exited (or never came up) while starting; `stderr` is what it printed.
    #[error("VM {vm}: QEMU failed to start: {stderr}")]
    StartFailed { vm: String, stderr: String },
    /// A VM with this run directory is already running.
    #[error("VM {vm}: already running as pid {pid}")]
    AlreadyRunning { vm: String, pid: i32 },
    /// Nothing runs for this run directory (no pidfile, or its pid is gone or not our QEMU).
    #[error("VM {vm}: not running ({reason})")]
    NotRunning { vm: String, reason: String },
    /// The monitor connection failed.
    #[error("VM {vm}: {source}")]
    Qmp { vm: String, source: QmpError },
    /// The guest agent failed.
    #[error("VM {vm}: {source}")]
    Qga { vm: String, source: QgaError },
    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Anything else, in a sentence.
    #[error("{0}")]
    Other(String),
}

impl QemuError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
        let context = context.into();
        move |source| QemuError::Io { context, source }
    }
}
