//! A lease kept alive in the background. Keepalives go out every interval (TTL/3 unless
//! told), each acknowledged one marks a `RenewalClock`; a failed stream
//! is reopened. The lease counts as lost when etcd says it expired (TTL 0) or when no
//! keepalive succeeded for a whole TTL — the moment etcd may have deleted every key
//! bound to it. Loss is reported through a watch channel, never silently retried into a
//! new lease: whoever holds the lease decides what losing it means (the agent fences).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_model::cluster::monotonic_ms;

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

/// When the last renewal that etcd acknowledged was *sent* (monotonic ms, see
/// `ferry_model::cluster::monotonic_ms`), shared across the leases a host takes one
/// after another: self-fencing reads it. The send time, not the answer's arrival, is
/// what etcd's expiry counts from at the latest, so a slow answer never makes the
/// lease look younger than etcd thinks it is; and a monotonic clock, so a step of the
/// wall clock can neither switch fencing off nor fence a healthy host.
#[derive(Clone, Debug, Default)]
pub struct RenewalClock(Arc<AtomicU64>);

impl RenewalClock {
    /// A renewal sent at `sent_ms` (monotonic) was acknowledged.
    pub fn mark(&self, sent_ms: u64) {
        self.0.fetch_max(sent_ms.max(1), Ordering::AcqRel);
    }

    /// Monotonic ms of the last acknowledged renewal's send; `None` if none yet.
    pub fn last_ms(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|ms| *ms > 0)
    }

    /// How old the last acknowledged renewal is now; `None` if there was none.
    pub fn age_ms(&self) -> Option<u64> {
        Some(monotonic_ms().saturating_sub(self.last_ms()?))
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
        let sent = monotonic_ms();
        let response = store
            .client()
            .lease_grant(seconds, None)
            .await
            .map_err(|error| store.etcd_error(error))?;
        let id = response.id();
        clock.mark(sent);
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
        // The keeper ending without a word (aborted) also means nobody renews it any more.
        if state
            .wait_for(|state| matches!(state, LeaseState::Lost { .. }))
            .await
            .is_err()
        {
            tracing::debug!("lease {}: its keeper ended", self.id);
        }
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
    // Nobody listening any more only means nobody needs to hear of the loss.
    let report_lost = |state: &watch::Sender<LeaseState>| {
        if state.send(LeaseState::Lost { id }).is_err() {
            tracing::debug!("lease {id} lost with nobody watching it");
        }
    };
    'reconnect: loop {
        if last_renewed.elapsed() >= ttl {
            report_lost(&state);
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
            let sent = monotonic_ms();
            let sent_at = Instant::now();
            if keeper.keep_alive().await.is_err() {
                continue 'reconnect;
            }
            let deadline = ttl.saturating_sub(last_renewed.elapsed());
            match tokio::time::timeout(deadline.max(Duration::from_millis(1)), responses.message())
                .await
            {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    last_renewed = sent_at;
                    clock.mark(sent);
                }
                Ok(Ok(Some(_))) => {
                    // etcd says the lease is gone (expired or revoked).
                    report_lost(&state);
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => continue 'reconnect,
            }
            tokio::time::sleep(interval).await;
        }
    }
}
