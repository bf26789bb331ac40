//! Reads with three outcomes. A key is present (its record decoded), absent, or
//! unreadable: it holds a value this build cannot decode (damaged, or written by a
//! newer Ferry during a rolling upgrade). Unreadable is never folded into absent: a
//! decision that needs the record waits. etcd being unreachable is an error of the
//! whole read, not of one key. Listings decode each key on its own, so one bad value
//! hides nothing else.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::de::DeserializeOwned;

use crate::store::decode;
use crate::{Store, StoreError, Versioned};

/// A key whose value cannot be decoded, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

impl Unreadable {
    fn of(key: &str, error: StoreError) -> Unreadable {
        Unreadable {
            key: key.to_string(),
            reason: error.to_string(),
        }
    }
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// One key, read.
#[derive(Clone, Debug, PartialEq)]
pub enum Read<T> {
    Present(Versioned<T>),
    Absent,
    Unreadable(Unreadable),
}

impl<T> Read<T> {
    pub fn present(&self) -> Option<&Versioned<T>> {
        match self {
            Read::Present(value) => Some(value),
            Read::Absent | Read::Unreadable(_) => None,
        }
    }

    /// The value, with unreadable as an error (for callers that must not guess).
    pub fn known(self) -> Result<Option<Versioned<T>>, Unreadable> {
        match self {
            Read::Present(value) => Ok(Some(value)),
            Read::Absent => Ok(None),
            Read::Unreadable(unreadable) => Err(unreadable),
        }
    }
}

/// Every key under a prefix, each decoded on its own, at one store revision.
#[derive(Clone, Debug)]
pub struct Listing<T> {
    pub entries: Vec<(String, Result<Versioned<T>, Unreadable>)>,
    pub revision: i64,
}

impl<T> Listing<T> {
    pub fn present(&self) -> impl Iterator<Item = (&str, &Versioned<T>)> {
        self.entries
            .iter()
            .filter_map(|(key, entry)| Some((key.as_str(), entry.as_ref().ok()?)))
    }

    pub fn unreadable(&self) -> impl Iterator<Item = &Unreadable> {
        self.entries
            .iter()
            .filter_map(|(_, entry)| entry.as_ref().err())
    }

    /// The readable records, for views and choices where leaving one out is safe (it
    /// is not shown, not chosen); each unreadable key is logged with its reason.
    pub fn readable(self) -> Vec<(String, Versioned<T>)> {
        self.entries
            .into_iter()
            .filter_map(|(key, entry)| match entry {
                Ok(value) => Some((key, value)),
                Err(unreadable) => {
                    tracing::warn!("etcd key {key}: left out, {unreadable}");
                    None
                }
            })
            .collect()
    }

    /// The records, or the first key that could not be read.
    pub fn all(self) -> Result<Vec<(String, Versioned<T>)>, Unreadable> {
        self.entries
            .into_iter()
            .map(|(key, entry)| Ok((key, entry?)))
            .collect()
    }
}

/// What a guarded write checks, all in the transaction that writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The key was not modified since `revision` (0: it does not exist).
    Unchanged { key: String, revision: i64 },
    /// The key exists (for example the leader's election key).
    Exists { key: String },
    /// The key does not exist (for example a dead host's lease-bound record).
    Absent { key: String },
}

/// Puts and deletes applied together only if every guard holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub guards: Vec<Guard>,
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

impl Change {
    pub fn guard(mut self, guard: Guard) -> Change {
        self.guards.push(guard);
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Change {
        self.puts.push((key.into(), value));
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Change {
        self.deletes.push(key.into());
        self
    }
}

impl Store {
    /// One key, with its three outcomes; `Err` only when etcd cannot answer.
    pub async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Read<T>, StoreError> {
        let response = self
            .client()
            .get(key, None)
            .await
            .map_err(|error| self.etcd_error(error))?;
        let Some(kv) = response.kvs().first() else {
            return Ok(Read::Absent);
        };
        Ok(match decode(key, kv.value()) {
            Ok(value) => Read::Present(Versioned {
                value,
                mod_revision: kv.mod_revision(),
            }),
            Err(error) => Read::Unreadable(Unreadable::of(key, error)),
        })
    }

    /// Every key under `prefix`, each decoded on its own.
    pub async fn list_each<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Listing<T>, StoreError> {
        let (raw, revision) = self.list_raw(prefix).await?;
        let entries = raw
            .into_iter()
            .map(|(key, value, mod_revision)| {
                let decoded = decode(&key, &value)
                    .map(|value| Versioned {
                        value,
                        mod_revision,
                    })
                    .map_err(|error| Unreadable::of(&key, error));
                (key, decoded)
            })
            .collect();
        Ok(Listing { entries, revision })
    }

    /// Applies `change` in one transaction; [`StoreError::Conflict`] (naming the first
    /// guarded key) when a guard does not hold.
    pub async fn apply(&self, change: &Change) -> Result<i64, StoreError> {
        let compares: Vec<Compare> = change
            .guards
            .iter()
            .map(|guard| match guard {
                Guard::Unchanged { key, revision: 0 } | Guard::Absent { key } => {
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
                }
                Guard::Unchanged { key, revision } => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
                }
                Guard::Exists { key } => {
                    Compare::create_revision(key.as_str(), CompareOp::Greater, 0)
                }
            })
            .collect();
        let operations: Vec<TxnOp> = change
            .puts
            .iter()
            .map(|(key, value)| TxnOp::put(key.as_str(), value.clone(), None))
            .chain(
                change
                    .deletes
                    .iter()
                    .map(|key| TxnOp::delete(key.as_str(), None)),
            )
            .collect();
        let response = self
            .client()
            .txn(Txn::new().when(compares).and_then(operations))
            .await
            .map_err(|error| self.etcd_error(error))?;
        if !response.succeeded() {
            let key = change
                .guards
                .first()
                .map(|guard| match guard {
                    Guard::Unchanged { key, .. }
                    | Guard::Exists { key }
                    | Guard::Absent { key } => key.clone(),
                })
                .unwrap_or_default();
            return Err(StoreError::Conflict { key });
        }
        Ok(response
            .header()
            .map(|header| header.revision())
            .unwrap_or(0))
    }
}
