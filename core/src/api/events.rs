//! The event log as Server-Sent Events: `id` is the event's `seq`, `event` its topic, `data`
//! its JSON ([`crate::events::event_json`]). A reader that reconnects with `Last-Event-ID`
//! gets what follows it, nothing repeated and nothing skipped.

use crate::events::{event_json, Event, EventLog, Filter};
use axum::response::sse::{Event as SseEvent, Sse};
use futures::Stream;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use stratus_store::Row;
use tokio::sync::watch;
use uuid::Uuid;

/// Events read per store query.
const PAGE: u64 = 500;
/// A reader with nothing new polls this often (for events other nodes commit) …
const POLL: Duration = Duration::from_secs(1);
/// … and gets a comment this often, so proxies and clients see the stream is alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

struct Reader {
    log: Arc<EventLog>,
    /// The last event read (delivered or filtered out).
    after: i64,
    account: Option<Uuid>,
    filter: Filter,
    ready: VecDeque<Row<Event>>,
    wake: watch::Receiver<i64>,
    quiet_since: tokio::time::Instant,
    failed: bool,
}

pub(super) fn stream(
    log: Arc<EventLog>,
    after: i64,
    account: Option<Uuid>,
    filter: Filter,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let r = Reader {
        wake: log.subscribe(),
        log,
        after,
        account,
        filter,
        ready: VecDeque::new(),
        quiet_since: tokio::time::Instant::now(),
        failed: false,
    };
    Sse::new(futures::stream::unfold(r, |mut r| async move {
        let ev = r.next().await?;
        Some((Ok(ev), r))
    }))
}

impl Reader {
    /// The next thing to send; `None` ends the stream (after an error was sent).
    async fn next(&mut self) -> Option<SseEvent> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(e) = self.ready.pop_front() {
                self.quiet_since = tokio::time::Instant::now();
                return Some(
                    SseEvent::default()
                        .id(e.seq.to_string())
                        .event(e.topic.as_str())
                        .data(event_json(&e).to_string()),
                );
            }
            match self.log.after(self.after, PAGE, self.account).await {
                Ok(rows) if !rows.is_empty() => {
                    let last = rows.last().map_or(self.after, |e| e.seq);
                    debug_assert!(last > self.after, "events read in order");
                    self.after = last;
                    let keep = rows.into_iter().filter(|e| self.filter.matches(&e.topic));
                    self.ready.extend(keep);
                }
                Ok(_) => {
                    if self.quiet_since.elapsed() >= KEEP_ALIVE {
                        self.quiet_since = tokio::time::Instant::now();
                        return Some(SseEvent::default().comment("keep-alive"));
                    }
                    let _ = tokio::time::timeout(POLL, self.wake.changed()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the event log for a reader");
                    self.failed = true;
                    let body = serde_json::json!({"code": "internal", "message": e.to_string()});
                    return Some(SseEvent::default().event("error").data(body.to_string()));
                }
            }
        }
    }
}
