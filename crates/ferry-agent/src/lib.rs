//! The Ferry agent: one per host.

pub mod config;
