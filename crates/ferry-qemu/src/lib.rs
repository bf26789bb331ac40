//! The QEMU driver. Everything Ferry does to a virtual machine goes through here:
//!
//! - [`cmdline`] turns a validated [`ferry_model::VmSpec`] into QEMU's argv;
//! - [`accel`] decides between KVM and TCG with a functional probe;
//! - [`process`] spawns QEMU in its own process group, finds it again after the
//!   supervisor restarts, and signals it by the pid it recorded;
//! - [`qmp`] and [`qga`] are thin async clients for the monitor and the guest agent;
//! - [`machine`] ties them together into the lifecycle and migration operations the
//!   agent uses.

pub mod accel;
pub mod block;
mod bounded;
pub mod cmdline;
mod error;
pub mod image;
pub mod machine;
pub mod process;
pub mod qga;
pub mod qmp;
mod run_dir;
pub mod snapshot;
pub mod version;

pub use accel::{Accel, AccelReport, ProbeImage};
pub use block::{BlockJob, OpenDisk, TlsEndpoint};
pub use error::QemuError;
pub use machine::{
    Incoming, LaunchOptions, Machine, MigrationInfo, MigrationStatus, RunState, StopOutcome,
};
pub use qga::{ExecOutput, GuestAgent, GuestInterface, QgaError};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use run_dir::{RunDir, CONSOLE_LOG_LIMIT};
