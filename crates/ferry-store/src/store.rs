//! Typed reads and writes. Values are JSON records with a `version` field; a record
//! from a newer Ferry is refused rather than half-understood. Writes that must not race
//! (placements, creating a VM, taking an address) are etcd transactions that compare
//! the key's `mod_revision` (or its absence) and fail with [`StoreError::Conflict`] or
//! [`StoreError::Exists`] when someone else got there first.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Keys, StoreError};

/// A record and the revision it was last modified at (the CAS token).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    endpoints: String,
}

/// The client side of etcd's TLS: the cluster CA, and this client's certificate, whose
/// common name is its etcd user (etcd runs with `--client-cert-auth`).
#[derive(Clone)]
pub struct StoreTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for StoreTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTls").finish_non_exhaustive()
    }
}

impl StoreTls {
    pub(crate) fn options(&self) -> etcd_client::TlsOptions {
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem))
            .identity(etcd_client::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }
}

impl Store {
    /// Connects to etcd; `tls` for `https://` endpoints (a cluster's always are).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&StoreTls>,
    ) -> Result<Store, StoreError> {
        let joined = endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls {
            options = options.with_tls(tls.options());
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Store {
            client,
            keys: Keys::new(prefix),
            endpoints: joined,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub(crate) fn etcd_error(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let response = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(|error| self.etcd_error(error))?;
        match response.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                value: decode(key, kv.value())?,
                mod_revision: kv.mod_revision(),
            })),
        }
    }

    /// Raw keys, values and revisions under a prefix, read page by page at one
    /// revision (so a large prefix never hits the client's reply size limit), and that
    /// revision.
    pub async fn list_raw(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Vec<u8>, i64)>, i64), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut records = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = self
                .client
                .clone()
                .get(from.clone(), Some(options))
                .await
                .map_err(|error| self.etcd_error(error))?;
            if revision == 0 {
                revision = response
                    .header()
                    .map(|header| header.revision())
                    .unwrap_or(0);
            }
            for kv in response.kvs() {
                records.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                    kv.mod_revision(),
                ));
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((records, revision)),
            }
        }
    }

    pub async fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        lease: Option<i64>,
    ) -> Result<i64, StoreError> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let response = self
            .client
            .clone()
            .put(key, encode(value), options)
            .await
            .map_err(|error| self.etcd_error(error))?;
        Ok(response
            .header()
            .map(|header| header.revision())
            .unwrap_or(0))
    }

    /// Writes only if the key does not exist yet.
    pub async fn create<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        what: &str,
    ) -> Result<i64, StoreError> {
        self.compare_and_swap(key, 0, value)
            .await
            .map_err(|error| match error {
                StoreError::Conflict { .. } => StoreError::Exists {
                    what: what.to_string(),
                },
                other => other,
            })
    }

    /// Read-modify-write of one key: `change` gets the current value (`None` if the key
    /// does not exist) and returns the new one, which is written only if nobody wrote
    /// the key in between; on a conflict it starts again, up to 10 times.
    pub async fn update<T, E>(
        &self,
        key: &str,
        mut change: impl FnMut(Option<&T>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<StoreError>,
    {
        for _ in 0..10 {
            let current = self.get::<T>(key).await?;
            let revision = current.as_ref().map_or(0, |current| current.mod_revision);
            let next = change(current.as_ref().map(|current| &current.value))?;
            match self.compare_and_swap(key, revision, &next).await {
                Ok(_) => return Ok(next),
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Conflict {
            key: key.to_string(),
        }
        .into())
    }

    /// Writes only if the key was not modified since `mod_revision` (0: does not exist).
    pub async fn compare_and_swap<T: Serialize>(
        &self,
        key: &str,
        mod_revision: i64,
        value: &T,
    ) -> Result<i64, StoreError> {
        let compare = if mod_revision == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, mod_revision)
        };
        let txn =
            Txn::new()
                .when(vec![compare])
                .and_then(vec![TxnOp::put(key, encode(value), None)]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|error| self.etcd_error(error))?;
        if !response.succeeded() {
            return Err(StoreError::Conflict {
                key: key.to_string(),
            });
        }
        Ok(response
            .header()
            .map(|header| header.revision())
            .unwrap_or(0))
    }

    /// Writes several keys at once, each only if unmodified since its revision (0: does
    /// not exist); all or nothing. The conflict names the first key's.
    pub async fn compare_and_swap_all(
        &self,
        writes: &[(&str, i64, Vec<u8>)],
    ) -> Result<i64, StoreError> {
        let compares = writes
            .iter()
            .map(|(key, revision, _)| {
                if *revision == 0 {
                    Compare::create_revision(*key, CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(*key, CompareOp::Equal, *revision)
                }
            })
            .collect::<Vec<_>>();
        let puts = writes
            .iter()
            .map(|(key, _, value)| TxnOp::put(*key, value.clone(), None))
            .collect::<Vec<_>>();
        let response = self
            .client
            .clone()
            .txn(Txn::new().when(compares).and_then(puts))
            .await
            .map_err(|error| self.etcd_error(error))?;
        if !response.succeeded() {
            return Err(StoreError::Conflict {
                key: writes
                    .first()
                    .map(|(key, _, _)| key.to_string())
                    .unwrap_or_default(),
            });
        }
        Ok(response
            .header()
            .map(|header| header.revision())
            .unwrap_or(0))
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .clone()
            .delete(key, None)
            .await
            .map_err(|error| self.etcd_error(error))?;
        Ok(())
    }

    /// Deletes `key` only if it is unmodified since `revision`.
    pub async fn delete_if_unchanged(&self, key: &str, revision: i64) -> Result<(), StoreError> {
        let response = self
            .client
            .clone()
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
                    .and_then([TxnOp::delete(key, None)]),
            )
            .await
            .map_err(|error| self.etcd_error(error))?;
        if !response.succeeded() {
            return Err(StoreError::Conflict {
                key: key.to_string(),
            });
        }
        Ok(())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let options = etcd_client::DeleteOptions::new().with_prefix();
        self.client
            .clone()
            .delete(prefix, Some(options))
            .await
            .map_err(|error| self.etcd_error(error))?;
        Ok(())
    }

    /// Campaigns for leadership under `keys().leader()` with `lease`; resolves when this
    /// candidate leads. The leadership ends with the lease.
    pub async fn campaign(&self, candidate: &str, lease: i64) -> Result<Election, StoreError> {
        let response = self
            .client
            .clone()
            .campaign(self.keys.leader(), candidate, lease)
            .await
            .map_err(|error| self.etcd_error(error))?;
        let leader_key = response
            .leader()
            .map(|leader| leader.key().to_vec())
            .ok_or_else(|| StoreError::Corrupt {
                key: self.keys.leader(),
                reason: "campaign returned no leader key".into(),
            })?;
        Ok(Election { leader_key, lease })
    }

    /// The current leader's candidate value (its host name), if any.
    pub async fn leader(&self) -> Result<Option<String>, StoreError> {
        let (records, _) = self.list_raw(&format!("{}/", self.keys.leader())).await?;
        // The election's oldest key (lowest create revision) leads; list_raw sorts by key,
        // and etcd names election keys by lease id, so ask etcd instead.
        if records.is_empty() {
            return Ok(None);
        }
        match self.client.clone().leader(self.keys.leader()).await {
            Ok(response) => Ok(response
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            Err(error) => Err(self.etcd_error(error)),
        }
    }
}

/// Proof of leadership, for as long as its lease lives.
#[derive(Clone, Debug)]
pub struct Election {
    pub leader_key: Vec<u8>,
    pub lease: i64,
}

/// Keys read per request in a listing.
const LIST_PAGE: i64 = 256;

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own record types cannot fail (no maps with non-string keys).
    serde_json::to_vec(value).unwrap_or_default()
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let raw: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
            key: key.to_string(),
            reason: error.to_string(),
        })?;
    if let Some(found) = raw.get("version").and_then(serde_json::Value::as_u64) {
        let supported = ferry_model::cluster::RECORD_VERSION;
        if found > u64::from(supported) {
            return Err(StoreError::NewerRecord {
                key: key.to_string(),
                found: found as u32,
                supported,
            });
        }
    }
    serde_json::from_value(raw).map_err(|error| StoreError::Corrupt {
        key: key.to_string(),
        reason: error.to_string(),
    })
}
