//! The Ferry agent: one per host. See [`daemon`] for what it does.

pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod executor;
pub mod fence_device;
pub mod fencing;
pub mod host_monitors;
pub mod migration;
pub mod monitors;
pub mod reconcile;
pub mod runtime;
pub mod secrets;
pub mod storage;
