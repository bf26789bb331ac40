//! File transfer: `PUT /files/{name}` lands the body durably (temporary file, fsync,
//! rename, directory fsync) before answering, so a 2xx survives a crash of the guest.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;

use crate::{check_name, ApiError, AppState};

pub const MAX_FILE: usize = 64 << 20;
/// Numbers the staging files, so that two uploads of one name never share one.
static NEXT_UPLOAD: AtomicU64 = AtomicU64::new(0);

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Store { dir })
    }
}

pub async fn put(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    check_name("file name", &name)?;
    let dir = state.files.dir.clone();
    let size = body.len();
    let upload = NEXT_UPLOAD.fetch_add(1, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let staging = dir.join(format!(".{name}.{upload}.partial"));
        let mut file = std::fs::File::create(&staging)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&staging, dir.join(&name))?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"size": size}))))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Bytes, ApiError> {
    check_name("file name", &name)?;
    match tokio::fs::read(state.files.dir.join(&name)).await {
        Ok(content) => Ok(Bytes::from(content)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("file {name:?} does not exist")))
        }
        Err(error) => Err(ApiError::internal(error)),
    }
}
