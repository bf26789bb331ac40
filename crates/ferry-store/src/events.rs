//! The event log (`events/{ms}-{seq}-{source}`): written under a long lease, so it is
//! bounded in time, with keys that sort by time. Recording never fails an operation.

use std::time::{Duration, Instant};

use ferry_model::cluster::{now_ms, Event, RECORD_VERSION};
use ferry_model::events::EventKind;
use tokio::sync::Mutex;

use crate::{Store, StoreError};

/// Events live this long (they are written under a lease of this TTL).
const EVENT_TTL_SECONDS: i64 = 3600;
/// A message is kept up to this many bytes: parts of it come from guests and peers
/// (a console's last words, an agent's stderr), and every event sits in etcd for an hour.
pub const MAX_MESSAGE: usize = 1024;

/// `message` cut to at most `MAX_MESSAGE` bytes on a character boundary, ending in "…".
pub fn capped(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_MESSAGE {
        return message.into();
    }
    let ellipsis = "…";
    let mut end = MAX_MESSAGE - ellipsis.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &message[..end]).into()
}

pub struct EventLog {
    store: Store,
    source: String,
    state: Mutex<EventLease>,
}

#[derive(Default)]
struct EventLease {
    lease: Option<(i64, Instant)>,
    sequence: u64,
}

impl EventLog {
    pub fn new(store: Store, source: String) -> EventLog {
        EventLog {
            store,
            source,
            state: Mutex::new(EventLease::default()),
        }
    }

    /// Records an event; a failure is logged, never raised (an event must not fail an
    /// operation).
    pub async fn record(&self, subject: &str, kind: EventKind, message: &str) {
        let message = &*capped(message);
        if let Err(error) = self.try_record(subject, kind, message).await {
            tracing::warn!("cannot record event {kind} for {subject}: {error}");
        }
        tracing::info!(subject, kind = kind.as_str(), "{message}");
    }

    async fn try_record(
        &self,
        subject: &str,
        kind: EventKind,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let fresh = state.lease.filter(|(_, granted)| {
            granted.elapsed() < Duration::from_secs(EVENT_TTL_SECONDS as u64 / 2)
        });
        let lease = match fresh {
            Some((lease, _)) => lease,
            None => {
                let granted = self
                    .store
                    .client()
                    .lease_grant(EVENT_TTL_SECONDS, None)
                    .await
                    .map_err(|error| self.store.etcd_error(error))?;
                state.lease = Some((granted.id(), Instant::now()));
                granted.id()
            }
        };
        state.sequence += 1;
        let at_ms = now_ms();
        let event = Event {
            version: RECORD_VERSION,
            at_ms,
            source: self.source.clone(),
            subject: subject.into(),
            kind: kind.as_str().into(),
            message: message.into(),
        };
        // The source in the key keeps two hosts' events at the same millisecond apart.
        let key = format!(
            "{}-{}",
            self.store.keys().event(at_ms, state.sequence),
            self.source.replace('/', ".")
        );
        self.store.put(&key, &event, Some(lease)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_event_message_is_cut_on_a_character_boundary_with_an_ellipsis() {
        assert_eq!(capped("VM web-1 started"), "VM web-1 started");
        let exact = "a".repeat(MAX_MESSAGE);
        assert_eq!(capped(&exact), exact);
        // Three-byte characters: no cut can land on a boundary by luck.
        let long = "€".repeat(MAX_MESSAGE);
        let cut = capped(&long);
        assert!(cut.len() <= MAX_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.trim_end_matches('…').chars().all(|c| c == '€'));
        assert!(cut.len() > MAX_MESSAGE - 6);
    }
}
