//! A lease kept alive in the background. Keepalives go out every interval (TTL/3 unless
//! told), each acknowledged one marks a `RenewalClock`; a failed stream
//! is reopened. The lease counts as lost when etcd says it expired (TTL 0) or when no
//! keepalive succeeded for a whole TTL — the moment etcd may have deleted every key
//! bound to it. Loss is reported through a watch channel, never silently retried into a
//! new lease: whoever holds the lease decides what losing it means (the agent fences).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Store, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Held { id: i64 },
    Lost { id: i64 },
}

pub struct Lease {
    id: i64,
    ttl: Duration,
    state: watch::Receiver<LeaseState>,
    keeper: JoinHandle<()>,
    store: Store,
}

/// When etcd last acknowledged a renewal of this host's lease (wall-clock ms), shared
/// across the leases a host takes one after another: self-fencing reads it.
#[derive(Clone, Debug, Default)]
pub struct RenewalClock(Arc<AtomicU64>);

impl RenewalClock {
    pub fn mark(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_millis() as u64)
            .unwrap_or(0);
        self.0.store(now, Ordering::Release);
    }

    /// Wall-clock ms of the last acknowledged renewal; 0 if none yet.
    pub fn last_ms(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl Lease {
    /// Grants a lease of `ttl` (whole seconds, at least 2) and renews it every third.
    pub async fn grant(store: &Store, ttl: Duration) -> Result<Lease, StoreError> {
        Lease::grant_with(store, ttl, ttl / 3, RenewalClock::default()).await
    }

    /// Grants a lease renewed every `renew_every`, marking `clock` at each renewal.
    pub async fn grant_with(
        store: &Store,
        ttl: Duration,
        renew_every: Duration,
        clock: RenewalClock,
    ) -> Result<Lease, StoreError> {
        let seconds = ttl.as_secs().max(2) as i64;
        let response = store
            .client()
            .lease_grant(seconds, None)
            .await
            .map_err(|error| store.etcd_error(error))?;
        let id = response.id();
        clock.mark();
        let (state_tx, state) = watch::channel(LeaseState::Held { id });
        let ttl = Duration::from_secs(seconds as u64);
        let keeper = tokio::spawn(keep_alive(
            store.clone(),
            id,
            ttl,
            renew_every.max(Duration::from_millis(100)),
            clock,
            state_tx,
        ));
        Ok(Lease {
            id,
            ttl,
            state,
            keeper,
            store: store.clone(),
        })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_held(&self) -> bool {
        matches!(*self.state.borrow(), LeaseState::Held { .. })
    }

    /// Changes whenever the lease is lost.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut state = self.state.clone();
        let _ = state
            .wait_for(|state| matches!(state, LeaseState::Lost { .. }))
            .await;
    }

    /// Ends the lease now: every key bound to it is deleted.
    pub async fn revoke(self) -> Result<(), StoreError> {
        self.keeper.abort();
        self.store
            .client()
            .lease_revoke(self.id)
            .await
            .map_err(|error| self.store.etcd_error(error))?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn keep_alive(
    store: Store,
    id: i64,
    ttl: Duration,
    interval: Duration,
    clock: RenewalClock,
    state: watch::Sender<LeaseState>,
) {
    let mut last_renewed = Instant::now();
    'reconnect: loop {
        if last_renewed.elapsed() >= ttl {
            let _ = state.send(LeaseState::Lost { id });
            return;
        }
        // A cut network can leave the stream's setup hanging: bound it like a renewal.
        let Ok(Ok((mut keeper, mut responses))) =
            tokio::time::timeout(interval * 2, store.client().lease_keep_alive(id)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                continue 'reconnect;
            }
            let deadline = ttl.saturating_sub(last_renewed.elapsed());
            match tokio::time::timeout(deadline.max(Duration::from_millis(1)), responses.message())
                .await
            {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    last_renewed = Instant::now();
                    clock.mark();
                }
                Ok(Ok(Some(_))) => {
                    // etcd says the lease is gone (expired or revoked).
                    let _ = state.send(LeaseState::Lost { id });
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => continue 'reconnect,
            }
            tokio::time::sleep(interval).await;
        }
    }
}
