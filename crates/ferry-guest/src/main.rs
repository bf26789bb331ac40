//! ferry-guest: the integration server of REFERENCE §1 in miniature. It runs inside the
//! test appliance and gives a client outside the VM three kinds of work whose loss would
//! be visible — a database write, an HTTP exchange, a file transfer — plus the evidence
//! to check for loss afterwards (`/kv?since=N`, a boot id).
//!
//! Durability contract: a 2xx on a write means the data is on the guest's disk (SQLite
//! commit with `synchronous=FULL`, or file + directory fsync). With a host cache mode
//! that passes flushes through, it is then on the host's disk too.

mod files;
mod kv;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Ferry's in-guest workload server")]
struct Args {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Directory for the database and the files (the appliance's data disk).
    #[arg(long, default_value = "/data")]
    data: PathBuf,
}

pub struct AppState {
    kv: kv::Store,
    files: files::Store,
    started: Instant,
    boot_id: String,
}

impl AppState {
    /// Opens (or creates) the database and the file store under `data`.
    pub fn open(data: &Path) -> anyhow::Result<Self> {
        Ok(AppState {
            kv: kv::Store::open(&data.join("kv.sqlite"))?,
            files: files::Store::open(data.join("files"))?,
            started: Instant::now(),
            boot_id: read_boot_id(),
        })
    }
}

/// A client error with the reason in the body, so a caller sees what was wrong.
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn bad_request(reason: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, reason.into())
    }
    pub fn not_found(reason: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, reason.into())
    }
    pub fn internal(error: impl std::fmt::Display) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

/// Keys and file names: one path segment of safe characters, never `.`/`..` or hidden.
pub fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let legal = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if legal {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{kind} {name:?} is not allowed: use 1-128 of A-Z a-z 0-9 . _ -, not starting with '.'"
        )))
    }
}

async fn health(
    state: axum::extract::State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let writes = state.kv.committed_writes().await?;
    Ok(Json(serde_json::json!({
        "status": "ok",
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "boot_id": state.boot_id,
        "writes": writes,
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|_| {
            format!(
                "pid-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            )
        })
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/kv", get(kv::list_since))
        .route("/kv/{key}", get(kv::get).put(kv::put))
        .route("/files/{name}", get(files::get).put(files::put))
        .layer(DefaultBodyLimit::max(files::MAX_FILE))
        .with_state(state)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = Arc::new(AppState::open(&args.data)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "ferry-guest: serving {} on {}",
        args.data.display(),
        args.listen
    );
    axum::serve(listener, router(state)).await?;
    Ok(())
}
