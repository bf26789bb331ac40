//! The durable key-value log on SQLite. Every write appends to `writes` (sequence number,
//! key, value) and updates `kv` in one transaction, so `/kv?since=N` replays exactly the
//! writes that were acknowledged.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::Json;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::{check_name, ApiError, AppState};

/// A KV value is text; bigger payloads belong in `/files`.
const MAX_VALUE: usize = 1 << 20;

#[derive(Clone)]
pub struct Store {
    db: Arc<Mutex<Connection>>,
}

#[derive(Serialize)]
pub struct Write {
    seq: i64,
    key: String,
    value: String,
}

#[derive(Deserialize)]
pub struct Since {
    since: Option<i64>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let db =
            Connection::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // WAL + FULL: a commit returns only after the WAL is fsynced.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS writes (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, seq INTEGER NOT NULL);",
        )?;
        Ok(Store {
            db: Arc::new(Mutex::new(db)),
        })
    }

    async fn with_db<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db
                .lock()
                .map_err(|_| ApiError::internal("database lock poisoned"))?;
            work(&mut conn).map_err(ApiError::internal)
        })
        .await
        .map_err(ApiError::internal)?
    }

    pub async fn committed_writes(&self) -> Result<i64, ApiError> {
        self.with_db(|db| {
            db.query_row("SELECT COALESCE(MAX(seq), 0) FROM writes", [], |row| {
                row.get(0)
            })
        })
        .await
    }
}

pub async fn put(
    State(state): State<Arc<AppState>>,
    UrlPath(key): UrlPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    check_name("key", &key)?;
    if body.len() > MAX_VALUE {
        return Err(ApiError::bad_request(format!(
            "value is {} bytes; the limit is {MAX_VALUE}",
            body.len()
        )));
    }
    let value = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("value must be UTF-8 text"))?;
    let seq = state
        .kv
        .with_db(move |db| {
            let tx = db.transaction()?;
            tx.execute(
                "INSERT INTO writes (key, value) VALUES (?1, ?2)",
                params![key, value],
            )?;
            let seq = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO kv (key, value, seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value, seq = excluded.seq",
                params![key, value, seq],
            )?;
            tx.commit()?;
            Ok(seq)
        })
        .await?;
    Ok((StatusCode::OK, Json(serde_json::json!({"seq": seq}))))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    UrlPath(key): UrlPath<String>,
) -> Result<String, ApiError> {
    check_name("key", &key)?;
    let lookup = key.clone();
    let value: Option<String> = state
        .kv
        .with_db(move |db| {
            db.query_row(
                "SELECT value FROM kv WHERE key = ?1",
                params![lookup],
                |row| row.get(0),
            )
            .optional()
        })
        .await?;
    value.ok_or_else(|| ApiError::not_found(format!("key {key:?} does not exist")))
}

pub async fn list_since(
    State(state): State<Arc<AppState>>,
    Query(Since { since }): Query<Since>,
) -> Result<Json<Vec<Write>>, ApiError> {
    let since = since.unwrap_or(0);
    if since < 0 {
        return Err(ApiError::bad_request("since must be 0 or more"));
    }
    let writes = state
        .kv
        .with_db(move |db| {
            let mut query =
                db.prepare("SELECT seq, key, value FROM writes WHERE seq > ?1 ORDER BY seq")?;
            let rows = query.query_map(params![since], |row| {
                Ok(Write {
                    seq: row.get(0)?,
                    key: row.get(1)?,
                    value: row.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await?;
    Ok(Json(writes))
}
