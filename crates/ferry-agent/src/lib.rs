//! The Ferry agent: one per host. See [`daemon`] for what it does.

pub mod config;
pub mod daemon;
pub mod reconcile;
pub mod runtime;
