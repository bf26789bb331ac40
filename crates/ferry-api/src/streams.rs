//! Long-lived responses (the event stream, the serial and VNC consoles) counted per
//! token: each holds a task and a socket for as long as the client likes, so one token
//! may hold at most `MAX_STREAMS_PER_TOKEN` at once; the next is refused with 429 until
//! one ends. A stream's `StreamPermit` lives as long as it does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::ApiError;

pub const MAX_STREAMS_PER_TOKEN: usize = 8;

/// Open streams by token. Cheap to clone; the clones share the counts.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    limit: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits::new(MAX_STREAMS_PER_TOKEN)
    }
}

impl StreamLimits {
    pub fn new(limit: usize) -> StreamLimits {
        StreamLimits {
            limit,
            open: Arc::default(),
        }
    }

    /// A place for one more stream of `token`, or 429 when it has `limit` open.
    pub fn acquire(&self, token: &str) -> Result<StreamPermit, ApiError> {
        let mut open = lock(&self.open);
        let count = open.entry(token.to_string()).or_default();
        if *count >= self.limit {
            return Err(ApiError::TooManyRequests(format!(
                "this token already has {count} streams open (events, consoles), the limit of {}; close one first",
                self.limit
            )));
        }
        *count += 1;
        Ok(StreamPermit {
            token: token.to_string(),
            open: self.open.clone(),
        })
    }
}

/// One open stream; dropping it frees its place.
#[derive(Debug)]
pub struct StreamPermit {
    token: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&self.token) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.token);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counts stay consistent under a panic elsewhere: each change is one statement.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_past_its_stream_limit_gets_429_until_one_of_its_streams_ends() {
        let limits = StreamLimits::default();
        let mut permits: Vec<StreamPermit> = (0..MAX_STREAMS_PER_TOKEN)
            .map(|_| limits.acquire("alice").unwrap())
            .collect();
        let refused = limits.acquire("alice").unwrap_err();
        assert_eq!(refused.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            refused.to_string(),
            "this token already has 8 streams open (events, consoles), the limit of 8; close one first"
        );
        // Another token is counted on its own.
        let bob = limits.acquire("bob").unwrap();
        permits.pop();
        let again = limits.acquire("alice").unwrap();
        drop((permits, again, bob));
        assert!(lock(&limits.open).is_empty());
    }
}
