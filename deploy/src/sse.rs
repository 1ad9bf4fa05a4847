//! A follower of a node's event stream (`GET /v1/events`, Server-Sent Events): what `stratus
//! events --follow` and the end-to-end tests read. When the connection drops it connects again
//! with `Last-Event-ID`, so a restart of the node loses nothing.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

/// One event as the stream carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The event's number (`id:`).
    pub seq: i64,
    /// Its topic (`event:`).
    pub topic: String,
    /// Its JSON (`data:`).
    pub data: serde_json::Value,
}

/// What to follow.
#[derive(Debug, Clone)]
pub struct Follow {
    pub addr: SocketAddr,
    pub token: String,
    /// Comma-separated globs over the topic; empty: everything.
    pub filter: String,
    /// Start after this event (`None`: from now).
    pub after: Option<i64>,
    /// After a dropped connection, keep trying to connect again for this long.
    pub reconnect_for: Duration,
}

/// How one connection ended.
enum Ended {
    /// `each` asked to stop.
    Stopped,
    /// The connection failed or closed: connect again.
    Dropped(anyhow::Error),
}

/// Hand each event to `each` until it returns `false`; returns the last event's number.
/// Connects again (from the last event) after a drop, for at most `reconnect_for` in a row; a
/// 4xx answer ends it at once.
pub async fn follow(f: &Follow, mut each: impl FnMut(Message) -> bool) -> anyhow::Result<i64> {
    let mut last = f.after;
    let mut dropped_at: Option<tokio::time::Instant> = None;
    loop {
        match connect_once(f, &mut last, &mut each, &mut dropped_at).await? {
            Ended::Stopped => return Ok(last.unwrap_or(0)),
            Ended::Dropped(e) => {
                let since = *dropped_at.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= f.reconnect_for {
                    return Err(e.context(format!(
                        "the event stream of {} dropped and did not come back within {:?}",
                        f.addr, f.reconnect_for
                    )));
                }
                tracing::debug!(error = %e, "event stream dropped; connecting again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn connect_once(
    f: &Follow,
    last: &mut Option<i64>,
    each: &mut impl FnMut(Message) -> bool,
    dropped_at: &mut Option<tokio::time::Instant>,
) -> anyhow::Result<Ended> {
    let dropped = |e: anyhow::Error| Ok(Ended::Dropped(e));
    let stream = match tokio::net::TcpStream::connect(f.addr).await {
        Ok(s) => s,
        Err(e) => return dropped(e.into()),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return dropped(e.into()),
    };
    tokio::spawn(conn);
    let mut path = "/v1/events".to_string();
    if !f.filter.is_empty() {
        path.push_str("?filter=");
        path.push_str(&stratus_core::client::encode(&f.filter));
    }
    let mut req = Request::get(path)
        .header("host", f.addr.to_string())
        .header("accept", "text/event-stream")
        .header("authorization", format!("Bearer {}", f.token));
    if let Some(n) = last {
        req = req.header("last-event-id", n.to_string());
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return dropped(e.into()),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        let text = body.map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = text.unwrap_or_default();
        if status.is_client_error() {
            bail!("{}: {}", status.as_u16(), text.trim());
        }
        return dropped(anyhow::anyhow!("{}: {}", status.as_u16(), text.trim()));
    }
    *dropped_at = None;
    let mut body = resp.into_body();
    // Bytes, not text: a character may be split between two frames.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = match body.frame().await {
            None => return dropped(anyhow::anyhow!("the node closed the stream")),
            Some(Err(e)) => return dropped(e.into()),
            Some(Ok(fr)) => fr,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let bytes: Vec<u8> = buf.drain(..end + 2).collect();
            let block = String::from_utf8(bytes).context("an event that is not UTF-8")?;
            let Some(m) = parse_block(&block)? else {
                continue;
            };
            *last = Some(m.seq);
            if !each(m) {
                return Ok(Ended::Stopped);
            }
        }
    }
}

/// One SSE block (lines up to a blank line): an event, or nothing (a comment).
fn parse_block(block: &str) -> anyhow::Result<Option<Message>> {
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if event == "error" {
        bail!("the node failed the stream: {data}");
    }
    let Some(id) = id else { return Ok(None) };
    Ok(Some(Message {
        seq: id.parse().with_context(|| format!("event id {id:?}"))?,
        topic: event,
        data: serde_json::from_str(&data).with_context(|| format!("event data {data:?}"))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_parse_to_events_and_comments_to_nothing() {
        let m = parse_block("id: 7\nevent: vm.created\ndata: {\"seq\":7}\n\n")
            .unwrap()
            .unwrap();
        assert_eq!(m.seq, 7);
        assert_eq!(m.topic, "vm.created");
        assert_eq!(m.data["seq"], 7);
        assert!(parse_block(": keep-alive\n\n").unwrap().is_none());
        assert!(parse_block("event: error\ndata: {}\n\n").is_err());
        assert!(parse_block("id: x\nevent: a\ndata: {}\n\n").is_err());
    }
}
