//! Ferry's vocabulary: the types every other crate speaks, and the rules that make a
//! value of them valid. Nothing here performs I/O, so every rule is unit-testable and a
//! value that passed validation can be trusted by the drivers above.

mod bytes;
pub mod cluster;
pub mod ha;
pub mod monitor;
mod names;
pub mod ops;
mod vm;

pub use bytes::{Bytes, BytesError};
pub use names::{HostName, MacAddr, NameError, VmName};
pub use vm::{
    default_cpu_model as vm_default_cpu_model, Boot, CacheMode, DiskFormat, DiskSpec, HostLimits,
    NicSpec, SpecError, VmSpec, MIN_MEMORY,
};
