//! The management side of the agent protocol.
//!
//! [`AgentClient::call`] sends a command to a host's agent. A short command's answer comes in the
//! response; a long command gets a task id and this node's callback URL, and the caller waits on
//! the callback — never forever: the per-command timeout (global config `agent.timeout.<kind>`)
//! ends the wait with a `timeout` error, the caller's workflow rolls back, and its rollback
//! cleans up whatever the host may have done. A callback that arrives after the wait ended, or
//! twice, finds no waiter and is answered 404, which tells the agent to stop retrying.
//!
//! A command sent from a workflow's flow carries the chain's fence token ([`H_FENCE`], read from
//! [`current_chain`]); a rollback's or a taken-over chain's first command to a host is preceded
//! by a fence there ([`FenceCmd`]), repeated until none of the chain's older commands runs.

use crate::config::{ConfigDef, GlobalConfig};
use crate::error::{Error, ErrorCode};
use crate::flow::{current_chain, RunningChain};
use crate::ids::Ids;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_agent_protocol::{
    AgentAddress, AgentError, AgentErrorCode, Command, CommandKind, FenceCmd, FenceToken,
    TaskResult, AGENT_IDLE_TIMEOUT, H_CALLBACK, H_DEADLINE, H_FENCE, H_TASK, H_TOKEN, H_WAIT_UNTIL,
};
use stratus_rt::http::{HttpClient, HttpError};
use tokio::sync::oneshot;
use uuid::Uuid;

macro_rules! timeout_defs {
    ($( $kind:ident => $name:literal, $default:literal );* $(;)?) => {
        /// Per-command-kind timeouts, `agent.timeout.<kind>`: every kind but the fence, an
        /// exchange of the protocol's own that takes [`SUBMIT_TIMEOUT`] like a hand-over.
        pub static AGENT_TIMEOUTS: [ConfigDef; CommandKind::ALL.len() - 1] = [ $(
            ConfigDef::duration(
                concat!("agent.timeout.", $name),
                concat!("How long to wait for the agent to finish a ", $name, " command"),
                $default,
                100,
                24 * 3_600_000,
            )
        ),* ];
        fn timeout_index(k: CommandKind) -> Option<usize> {
            let mut i = 0;
            $( if k == CommandKind::$kind { return Some(i); } i += 1; )*
            let _ = i;
            None
        }
    };
}

timeout_defs! {
    Connect => "connect", "30s";
    Ping => "ping", "10s";
    VmStatus => "vm_status", "10s";
    VmConsole => "vm_console", "10s";
    VmStart => "vm_start", "5m";
    VmStop => "vm_stop", "5m";
    VmReboot => "vm_reboot", "5m";
    VmDestroy => "vm_destroy", "5m";
    VmMigrate => "vm_migrate", "10m";
    VmReceive => "vm_receive", "5m";
    VolumeCreate => "volume_create", "10m";
    VolumeDelete => "volume_delete", "5m";
    VolumeAttach => "volume_attach", "2m";
    VolumeDetach => "volume_detach", "2m";
}

/// The config entries of this module.
pub fn config_defs() -> Vec<&'static ConfigDef> {
    AGENT_TIMEOUTS.iter().collect()
}

/// How long handing a long command to an agent may take (the agent answers 202 at once).
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an agent keeps a fence ([`FenceCmd::until_ms`]): beyond the hand-over deadline of
/// any command sent before it — a long command's is [`SUBMIT_TIMEOUT`], a short one's its
/// timeout (30 s at most by default; a deployment that raises a short command's timeout above
/// this weakens the fence for that kind).
pub const FENCE_KEEP: Duration = Duration::from_secs(600);

/// How long a fence waits for a chain's older commands to end on a host: the longest default
/// command timeout (`vm_migrate`). Work that has started on a host runs to its end.
pub const FENCE_WAIT: Duration = Duration::from_secs(600);

/// Where and how to reach a host's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTarget {
    pub uuid: Uuid,
    pub address: AgentAddress,
    pub token: String,
}

impl HostTarget {
    pub fn new(uuid: Uuid, address: &str, token: &str) -> Result<Self, Error> {
        let address = AgentAddress::parse(address).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(HostTarget {
            uuid,
            address,
            token: token.to_string(),
        })
    }
}

struct Pending {
    tx: oneshot::Sender<TaskResult>,
    host: Uuid,
    token: String,
}

/// Why a callback was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackRefusal {
    /// Nobody waits for this task (finished, timed out, or never ours).
    UnknownTask,
    /// The callback did not carry the host's token.
    WrongToken,
}

/// What `/metrics` reads besides the commands it counts by kind and outcome.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Callbacks for a task nobody waits for any more (it timed out, or the node restarted).
    pub late_callbacks: AtomicU64,
}

/// Sends commands to agents and matches callbacks to waiting callers. Cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    http: HttpClient,
    ids: Arc<Ids>,
    /// `http://IP:PORT/agent/callback` of this node.
    callback_base: String,
    pending: Arc<Mutex<HashMap<Uuid, Pending>>>,
    stats: Arc<AgentStats>,
    metrics: Arc<crate::metrics::Metrics>,
}

fn map_http(e: HttpError) -> Error {
    match e {
        HttpError::Timeout(addr, ms) => {
            Error::timeout(format!("agent at {addr} did not answer within {ms} ms"))
        }
        HttpError::Connect(addr, why) => Error::new(
            ErrorCode::HostUnreachable,
            format!("cannot reach the agent at {addr}: {why}"),
        ),
        other => Error::new(ErrorCode::HostUnreachable, other.to_string()),
    }
}

/// An agent's error as a Stratus error.
pub fn map_agent_error(kind: CommandKind, e: AgentError) -> Error {
    let code = match e.code {
        AgentErrorCode::InsufficientCapacity => ErrorCode::CapacityExhausted,
        AgentErrorCode::Unauthorized => ErrorCode::Unauthorized,
        AgentErrorCode::InvalidArgument => ErrorCode::InvalidArgument,
        AgentErrorCode::Unreachable => ErrorCode::HostUnreachable,
        // Only reaches a caller that already gave up (the deadline is its own timeout), or
        // whose chain a later epoch superseded (its rollback, a recovery).
        AgentErrorCode::Expired | AgentErrorCode::Fenced => ErrorCode::Timeout,
        _ => ErrorCode::AgentError,
    };
    Error::new(
        code,
        format!("{} on the host failed: {}", kind.as_str(), e.message),
    )
}

impl AgentClient {
    pub fn new(ids: Arc<Ids>, callback_base: String) -> Self {
        AgentClient {
            // A host's connection outlives the ping interval (`AGENT_IDLE_TIMEOUT`), so pings
            // and commands reuse it: with a shorter idle timeout nearly every ping connected
            // anew (docs/perf-log.md).
            http: HttpClient::with_idle_timeout(2, AGENT_IDLE_TIMEOUT).with_replay_key(H_TASK),
            ids,
            callback_base,
            pending: Arc::default(),
            stats: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// Count commands in `metrics` (the node's).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn stats(&self) -> &AgentStats {
        &self.stats
    }

    /// Tasks waiting for their callback.
    pub fn waiting(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The configured timeout of a command kind.
    pub fn timeout(config: &GlobalConfig, kind: CommandKind) -> Duration {
        match timeout_index(kind) {
            Some(i) => config.get(&AGENT_TIMEOUTS[i].key()),
            None => SUBMIT_TIMEOUT,
        }
    }

    /// Send `cmd` to `host`; wait at most `timeout` for the answer (or the callback). Within a
    /// chain's flow, the command carries the chain's fence token, and the chain is fenced on the
    /// host first when the flow's run must ([`RunningChain::must_fence`]).
    pub async fn call<C: Command>(
        &self,
        host: &HostTarget,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Reply, Error> {
        let out = self.call_inner(host, cmd, timeout).await;
        let how = out.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok");
        self.metrics.agent_command(C::KIND.as_str(), how);
        out
    }

    /// Make sure no command of the calling flow's chain at an older epoch can still run on
    /// `host`, when the flow's run must (a rollback, a taken-over chain) and has not yet: done
    /// before the first command to each host anyway; called directly before a flow acts on what
    /// another host did (a migration's undo asks the destination, after fencing the source).
    pub async fn settle(&self, host: &HostTarget) -> Result<(), Error> {
        match current_chain() {
            Some(run) if run.must_fence(host.uuid) => self.fence(host, &run).await,
            _ => Ok(()),
        }
    }

    async fn fence(&self, host: &HostTarget, run: &RunningChain) -> Result<(), Error> {
        let token = FenceToken {
            chain: run.chain,
            epoch: run.epoch,
        };
        let started = tokio::time::Instant::now();
        loop {
            let keep = FENCE_KEEP.as_millis() as i64;
            let cmd = FenceCmd {
                token,
                until_ms: stratus_rt::clock::now_ms() + keep,
            };
            let reply = self.short(host, &cmd, SUBMIT_TIMEOUT, None).await?;
            if reply.running == 0 {
                run.fenced_on(host.uuid);
                return Ok(());
            }
            if started.elapsed() >= FENCE_WAIT {
                return Err(Error::timeout(format!(
                    "{} commands of chain {} still run on host {} after {} s",
                    reply.running,
                    run.chain,
                    host.uuid,
                    FENCE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A short command: the answer is in the response.
    async fn short<C: Command>(
        &self,
        host: &HostTarget,
        cmd: &C,
        timeout: Duration,
        fence: Option<&str>,
    ) -> Result<C::Reply, Error> {
        let body = serde_json::to_vec(cmd)
            .map_err(|e| Error::internal(format!("cannot encode {}: {e}", C::PATH)))?;
        let refuse_after = deadline_after(timeout);
        let mut headers = vec![(H_TOKEN, host.token.as_str()), (H_DEADLINE, &refuse_after)];
        headers.extend(fence.map(|f| (H_FENCE, f)));
        let r = self
            .http
            .post(
                host.address.addr,
                &host.address.path(C::PATH),
                &headers,
                body,
                timeout,
            )
            .await
            .map_err(map_http)?;
        decode_reply::<C>(r.status, &r.body)
    }

    async fn call_inner<C: Command>(
        &self,
        host: &HostTarget,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Reply, Error> {
        let run = current_chain();
        if let Some(run) = &run {
            if run.must_fence(host.uuid) {
                self.fence(host, run).await?;
            }
        }
        let fence = run.map(|r| {
            FenceToken {
                chain: r.chain,
                epoch: r.epoch,
            }
            .header()
        });
        if !C::ASYNC {
            return self.short(host, cmd, timeout, fence.as_deref()).await;
        }
        let body = serde_json::to_vec(cmd)
            .map_err(|e| Error::internal(format!("cannot encode {}: {e}", C::PATH)))?;
        let task = self.ids.uuid();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                task,
                Pending {
                    tx,
                    host: host.uuid,
                    token: host.token.clone(),
                },
            );
        let _cleanup = Forget {
            pending: &self.pending,
            task,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let callback = format!("{}/{task}", self.callback_base);
        let task_s = task.to_string();
        // Handing the command over takes moments; only the work takes the command's timeout.
        let submit = timeout.min(SUBMIT_TIMEOUT);
        let refuse_after = deadline_after(submit);
        let wait_until = deadline_after(timeout);
        let mut headers = vec![
            (H_TOKEN, host.token.as_str()),
            (H_TASK, task_s.as_str()),
            (H_CALLBACK, callback.as_str()),
            (H_DEADLINE, refuse_after.as_str()),
            (H_WAIT_UNTIL, wait_until.as_str()),
        ];
        headers.extend(fence.as_deref().map(|f| (H_FENCE, f)));
        let r = self
            .http
            .post(
                host.address.addr,
                &host.address.path(C::PATH),
                &headers,
                body,
                submit,
            )
            .await
            .map_err(map_http)?;
        if r.status != 202 {
            // Refused before running (bad token, bad request, fenced).
            return decode_reply::<C>(r.status, &r.body);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = match stratus_rt::deadline::timeout(left, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => return Err(Error::internal("callback waiter dropped")),
            Err(_) => {
                return Err(Error::timeout(format!(
                    "{} on host {} got no result within {} ms",
                    C::KIND.as_str(),
                    host.uuid,
                    timeout.as_millis()
                )))
            }
        };
        match result.outcome {
            Ok(v) => serde_json::from_value(v)
                .map_err(|e| Error::internal(format!("bad result of {}: {e}", C::PATH))),
            Err(e) => Err(map_agent_error(C::KIND, e)),
        }
    }

    /// Hand a callback to its waiter. The token must be the host's.
    pub fn deliver(&self, result: TaskResult, token: &str) -> Result<Uuid, CallbackRefusal> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get(&result.task) {
            None => {
                self.stats.late_callbacks.fetch_add(1, Ordering::Relaxed);
                return Err(CallbackRefusal::UnknownTask);
            }
            Some(p) if p.token != token => return Err(CallbackRefusal::WrongToken),
            Some(_) => {}
        }
        let p = pending.remove(&result.task).expect("checked above");
        let _ = p.tx.send(result);
        Ok(p.host)
    }
}

/// A deadline header's value ([`H_DEADLINE`], [`H_WAIT_UNTIL`]) for `after` from now: after it
/// the caller has given up (and rolled back), so the agent must not start the command.
fn deadline_after(after: Duration) -> String {
    (stratus_rt::clock::now_ms() + after.as_millis() as i64).to_string()
}

/// Removes a task from the waiting table when the caller stops waiting (any way it stops).
struct Forget<'a> {
    pending: &'a Mutex<HashMap<Uuid, Pending>>,
    task: Uuid,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.task);
    }
}

fn decode_reply<C: Command>(status: u16, body: &[u8]) -> Result<C::Reply, Error> {
    if (200..300).contains(&status) {
        return serde_json::from_slice(body)
            .map_err(|e| Error::internal(format!("bad reply to {}: {e}", C::PATH)));
    }
    match serde_json::from_slice::<AgentError>(body) {
        Ok(e) => Err(map_agent_error(C::KIND, e)),
        Err(_) => Err(Error::new(
            ErrorCode::AgentError,
            format!("{} answered HTTP {status}", C::PATH),
        )),
    }
}

/// JSON body helper for tests and the API.
pub fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_timeout_entry() {
        let configured = CommandKind::ALL
            .into_iter()
            .filter(|k| *k != CommandKind::Fence);
        assert_eq!(configured.clone().count(), AGENT_TIMEOUTS.len());
        assert_eq!(timeout_index(CommandKind::Fence), None);
        for k in configured {
            let def = &AGENT_TIMEOUTS[timeout_index(k).expect("configured")];
            assert_eq!(def.name, format!("agent.timeout.{}", k.as_str()));
            assert!(def.parse(def.default).is_ok());
        }
    }

    #[test]
    fn callbacks_need_a_waiter_and_the_right_token() {
        let c = AgentClient::new(
            Arc::new(Ids::from_seed(1)),
            "http://127.0.0.1:1/agent/callback".into(),
        );
        let result = |task| TaskResult {
            task,
            kind: CommandKind::VmStart,
            outcome: Ok(serde_json::Value::Null),
        };
        assert_eq!(
            c.deliver(result(Uuid::from_u128(1)), "t"),
            Err(CallbackRefusal::UnknownTask)
        );
        let (tx, mut rx) = oneshot::channel();
        c.pending.lock().unwrap().insert(
            Uuid::from_u128(2),
            Pending {
                tx,
                host: Uuid::from_u128(9),
                token: "t".into(),
            },
        );
        assert_eq!(
            c.deliver(result(Uuid::from_u128(2)), "x"),
            Err(CallbackRefusal::WrongToken)
        );
        assert_eq!(
            c.deliver(result(Uuid::from_u128(2)), "t"),
            Ok(Uuid::from_u128(9))
        );
        assert!(rx.try_recv().is_ok());
        assert_eq!(
            c.deliver(result(Uuid::from_u128(2)), "t"),
            Err(CallbackRefusal::UnknownTask),
            "a duplicate finds no waiter"
        );
    }
}
