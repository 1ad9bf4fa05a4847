//! A QMP client: QEMU's JSON monitor over its unix socket. One connection per VM, held for the
//! VM's life: commands go out with an `id` and their answers come back matched to it; events
//! are broadcast to whoever listens. When QEMU exits the socket closes: pending commands fail
//! and [`Qmp::closed`] resolves — that is how the agent learns a VM is gone.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QEMU's monitor at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("QEMU's monitor closed (QEMU exited)")]
    Closed,
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU did not answer {0} in time")]
    Timeout(String),
    #[error("QEMU's monitor said something unreadable: {0}")]
    Protocol(String),
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Value>>>>>;

/// A connected monitor. Cheap to share (`Arc`).
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Value>,
    closed: watch::Receiver<bool>,
}

/// How long one command may take (a migration's or a disk's work is polled, not awaited).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connect to `path`, trying until `within` passes (QEMU makes the socket soon after it
    /// starts), and enter command mode.
    pub async fn connect(path: &Path, within: Duration) -> Result<Arc<Qmp>, QmpError> {
        let deadline = tokio::time::Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect(path.display().to_string(), e))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // The greeting comes first.
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("the greeting".into()))?
            .map_err(|e| QmpError::Protocol(e.to_string()))?
            .ok_or(QmpError::Closed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!("greeting {greeting:?}")));
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let qmp = Arc::new(Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            events: events.clone(),
            closed,
        });
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(%line, "unreadable QMP line");
                    continue;
                };
                if v.get("event").is_some() {
                    let _ = events.send(v);
                } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    let waiter = pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                        .and_then(|p| p.remove(&id));
                    if let Some(w) = waiter {
                        let _ = w.send(v);
                    }
                }
            }
            // Closed: fail whoever waits, and say so.
            pending.lock().unwrap_or_else(|e| e.into_inner()).take();
            let _ = closed_tx.send(true);
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Run `command` and return its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(p) => p.insert(id, tx),
            None => return Err(QmpError::Closed),
        };
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            if w.write_all(line.as_bytes()).await.is_err() {
                return Err(QmpError::Closed);
            }
        }
        let answer = match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Err(_) => {
                if let Some(p) = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    p.remove(&id);
                }
                return Err(QmpError::Timeout(command.to_string()));
            }
            Ok(Err(_)) => return Err(QmpError::Closed),
            Ok(Ok(v)) => v,
        };
        if let Some(e) = answer.get("error") {
            return Err(QmpError::Refused {
                command: command.to_string(),
                class: e["class"].as_str().unwrap_or("").to_string(),
                desc: e["desc"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Events from now on (`{"event": NAME, "data": {...}}`).
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves when the monitor has closed (QEMU exited).
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`, ...).
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status answered {v}")))
    }
}
