/// What went wrong talking to etcd or reading what it holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or refused the request.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    /// A value under a key is not the record we expect.
    #[error("etcd key {key}: unreadable record: {reason}")]
    Corrupt { key: String, reason: String },
    /// A record was written by a newer Ferry.
    #[error(
        "etcd key {key}: record version {found} is newer than this Ferry understands ({supported})"
    )]
    NewerRecord {
        key: String,
        found: u32,
        supported: u32,
    },
    /// A compare-and-swap lost: someone else changed the key first.
    #[error("etcd key {key} changed concurrently; re-read and retry")]
    Conflict { key: String },
    /// The key to create exists already.
    #[error("{what} already exists")]
    Exists { what: String },
    /// Starting a local etcd failed.
    #[error("etcd server: {0}")]
    Server(String),
}
