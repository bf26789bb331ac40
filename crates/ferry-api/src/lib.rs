//! The one internal API. [`ops::ClusterApi`] holds every operation as a typed method;
//! the REST handlers in [`rest`], the CLI (through [`client::ApiClient`]) and the portal
//! all go through it, so no business logic lives in an HTTP handler or a CLI command.

pub mod access;
pub mod auth;
pub mod checkpoints;
pub mod client;
pub mod client_config;
pub mod cloud_init;
pub mod console;
mod error;
pub mod images;
pub mod migrate;
pub mod monitors;
pub mod ops;
pub mod policy;
pub mod provision;
pub mod rest;
pub mod serve;
pub mod streams;
pub mod templates;
pub mod types;

pub use error::ApiError;
