//! Ferry's vocabulary: the types every other crate speaks, and the rules that make a
//! value of them valid. Nothing here performs I/O, so every rule is unit-testable and a
//! value that passed validation can be trusted by the drivers above.

pub mod access;
mod bytes;
pub mod checkpoint;
pub mod cluster;
pub mod events;
pub mod ha;
pub mod monitor;
mod names;
pub mod ops;
mod vm;

pub use bytes::{Bytes, BytesError};
pub use names::{HostName, MacAddr, NameError, ProjectName, UserName, VmName};
pub use vm::{
    default_boot_order, default_cpu_model as vm_default_cpu_model, default_network, Boot,
    BootDevice, CacheMode, CdromSpec, DiskBus, DiskFormat, DiskSpec, Firmware, HostLimits,
    NicModel, NicSpec, SpecError, StopCommand, VmSpec, MAX_STOP_TIMEOUT_SECONDS, MIN_MEMORY,
};
