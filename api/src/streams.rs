//! How many long-lived streams each token holds open: REST event feeds and GraphQL
//! subscriptions (`events`, `task`).
//!
//! Each such stream follows the log for as long as its client keeps it, and each reads every
//! record (a `task` subscription decodes every record of the log to pick its task's): a client
//! with a bug that opens a subscription per render, or a leaked auditor token, could open
//! thousands and take the server's CPU and memory from everyone else. `--max-connections` does
//! not bound them: one WebSocket carries any number of subscriptions. So each token may hold at
//! most `--max-streams-per-token` at once; the next is refused (`429 too_many_streams`) until one
//! ends, and the refusal names the limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};

use crate::error::ApiError;

/// The streams open per token (by its name in the tokens file).
pub struct StreamSlots {
    max_per_token: usize,
    open: Mutex<HashMap<Arc<str>, usize>>,
}

/// One open stream, counted against its token until dropped (when the feed's body or the
/// subscription ends, however it ends).
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    token: Arc<str>,
}

impl StreamSlots {
    pub fn new(max_per_token: usize) -> Arc<Self> {
        Arc::new(StreamSlots { max_per_token, open: Mutex::default() })
    }

    /// A slot for one more stream of the token named `token`, or `429 too_many_streams` when
    /// it holds the most it may.
    pub fn take(self: &Arc<Self>, token: &Arc<str>) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().expect("stream slots");
        let held = open.entry(token.clone()).or_insert(0);
        if *held >= self.max_per_token {
            return Err(ApiError {
                // A slot frees when a stream ends, which no client can predict: a client that
                // retried at once made ~13,000 refused requests a second (found by a client check).
                retry_after_s: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "token {} already holds {} event feeds and subscriptions open, the most \
                         --max-streams-per-token allows; end one first",
                        token, self.max_per_token
                    ),
                )
            });
        }
        *held += 1;
        Ok(StreamSlot { slots: self.clone(), token: token.clone() })
    }

    /// How many streams `token` holds open.
    pub fn held_by(&self, token: &str) -> usize {
        self.open.lock().expect("stream slots").get(token).copied().unwrap_or(0)
    }

    /// Streams open in all, the most one token holds, and the limit, for `/metrics` (without
    /// token names: a scoped token may read the metrics).
    pub fn gauges(&self) -> (usize, usize, usize) {
        let open = self.open.lock().expect("stream slots");
        (open.values().sum(), open.values().copied().max().unwrap_or(0), self.max_per_token)
    }
}

impl StreamSlot {
    /// `stream`, holding this slot until the stream ends or is dropped.
    pub fn hold<S: Stream>(self, stream: S) -> impl Stream<Item = S::Item> {
        stream.map(move |item| {
            let _held = &self;
            item
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("stream slots");
        if let Some(held) = open.get_mut(&self.token) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_at_most_its_limit_and_a_dropped_slot_is_free_again() {
        let slots = StreamSlots::new(2);
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        let first = slots.take(&alice).unwrap();
        let _second = slots.take(&alice).unwrap();
        let refused = slots.take(&alice).err().unwrap();
        assert_eq!((refused.status, refused.code), (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"));
        assert!(refused.message.contains("--max-streams-per-token"), "{}", refused.message);
        let _other = slots.take(&bob).expect("another token has slots of its own");
        drop(first);
        assert_eq!(slots.held_by("alice"), 1);
        let _again = slots.take(&alice).expect("a dropped slot is free again");
        assert_eq!(slots.held_by("alice"), 2);
        assert_eq!(slots.gauges(), (3, 2, 2));
    }
}
