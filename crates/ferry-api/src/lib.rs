//! The one internal API. [`ops::ClusterApi`] holds every operation as a typed method;
//! the REST handlers in [`rest`], the CLI (through [`client::ApiClient`]) and the portal
//! all go through it, so no business logic lives in an HTTP handler or a CLI command.

pub mod auth;
pub mod client_config;
pub mod types;
