//! The agent HTTP server, generic over the [`Hypervisor`] backend.
//!
//! - Every request must carry the host's token; anything else is refused with 401.
//! - Short commands answer in the body. Long commands need a task id and a callback URL, answer
//!   202 at once, run in their own task and POST the [`TaskResult`] to the callback, retrying
//!   with backoff until it is taken (2xx), refused as unknown (404), or a deadline passes.
//! - A task id already seen is not run again: while it runs the agent just answers 202; once it
//!   is done the stored result is delivered again (to the new callback URL).
//! - [`Faults`] lets the simulation delay or fail commands and drop or duplicate callbacks; the
//!   real agent uses [`NoFaults`].

use crate::hypervisor::Hypervisor;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use serde::Serialize;
use std::any::TypeId;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use stratus_agent_protocol::*;
use stratus_rt::http::{header, HttpClient, HttpError, TakeHeaders};
use uuid::Uuid;

/// What to do to a command before the backend sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandFault {
    /// Extra time before the command runs.
    pub delay: Duration,
    /// Fail without doing anything.
    pub fail_before: bool,
    /// Do the work, then report failure anyway (the host changed; the manager thinks not).
    pub fail_after: bool,
}

/// What happens to one callback delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackFate {
    Deliver,
    /// Never sent (the manager only learns by timeout and state sync).
    Drop,
    /// Sent twice.
    Duplicate,
}

/// How long a migration's source waits for the destination to take the VM (less when the
/// migration's sender stops waiting sooner).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Fault hooks (the simulation's; the real agent has none).
pub trait Faults: Send + Sync + 'static {
    fn command(&self, kind: CommandKind) -> CommandFault;
    fn callback(&self, kind: CommandKind) -> CallbackFate;
}

/// No faults.
pub struct NoFaults;

impl Faults for NoFaults {
    fn command(&self, _kind: CommandKind) -> CommandFault {
        CommandFault::default()
    }
    fn callback(&self, _kind: CommandKind) -> CallbackFate {
        CallbackFate::Deliver
    }
}

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The token the management plane must present (given at host-add time).
    pub token: String,
    /// Give up delivering a callback after this long.
    pub callback_deadline: Duration,
    /// Finished tasks remembered for duplicate detection, at most. A task whose request carried
    /// a deadline ([`H_DEADLINE`]) is forgotten once the deadline has passed, sooner.
    pub remembered_tasks: usize,
    /// How far this agent's clock is ahead of the management nodes' (milliseconds; behind when
    /// negative): the simulation's clock skew. A real agent reads its own clock and leaves it 0.
    pub clock_offset_ms: i64,
}

impl AgentConfig {
    pub fn new(token: impl Into<String>) -> Self {
        AgentConfig {
            token: token.into(),
            callback_deadline: Duration::from_secs(120),
            remembered_tasks: 10_000,
            clock_offset_ms: 0,
        }
    }
}

enum TaskState {
    /// Accepted, started or not; with the fence token of its workflow.
    Running(Option<FenceToken>),
    Done(TaskResult),
}

#[derive(Default)]
struct Tasks {
    map: HashMap<Uuid, TaskState>,
    /// Finished tasks in the order they finished, with their request's deadline.
    finished: VecDeque<(Uuid, Option<i64>)>,
    /// Chain → (the latest epoch fenced, kept until) ([`FenceCmd`]).
    fences: HashMap<Uuid, (u64, i64)>,
}

impl Tasks {
    /// `Fenced` when a command of `token` comes after a fence at a later epoch of its chain.
    fn fenced(&self, token: Option<FenceToken>, now: i64) -> Option<AgentError> {
        let token = token?;
        let &(epoch, until) = self.fences.get(&token.chain)?;
        (epoch > token.epoch && !expired(until, now)).then(|| {
            AgentError::new(
                AgentErrorCode::Fenced,
                format!(
                    "chain {} was fenced at epoch {epoch}; this command is of epoch {}: not run",
                    token.chain, token.epoch
                ),
            )
        })
    }

    /// Record a fence and count the chain's older tasks still running. Fences past their time
    /// are forgotten here (a copy of an older command is refused as expired after it).
    fn fence(&mut self, c: &FenceCmd, now: i64) -> FenceReply {
        self.fences.retain(|_, (_, until)| !expired(*until, now));
        let f = self.fences.entry(c.token.chain).or_insert((0, c.until_ms));
        f.0 = f.0.max(c.token.epoch);
        f.1 = f.1.max(c.until_ms);
        let older = |t: &FenceToken| t.chain == c.token.chain && t.epoch < c.token.epoch;
        let running = self
            .map
            .values()
            .filter(|s| matches!(s, TaskState::Running(Some(t)) if older(t)))
            .count();
        FenceReply {
            running: running as u32,
        }
    }

    /// Record `task`'s result, and forget the finished tasks nobody can send again: those whose
    /// request's deadline has passed by `now` (a copy of the request arriving from now on is
    /// refused as expired before its task id is looked at; the agent's clock does not go back),
    /// and the oldest beyond `keep`. Only the front is looked at: a task without a deadline
    /// there keeps the ones behind it until the count moves it on (every command from a
    /// management node carries a deadline).
    fn finish(
        &mut self,
        task: Uuid,
        result: TaskResult,
        deadline: Option<i64>,
        now: i64,
        keep: usize,
    ) {
        self.map.insert(task, TaskState::Done(result));
        self.finished.push_back((task, deadline));
        while let Some(&(old, d)) = self.finished.front() {
            if !d.is_some_and(|d| expired(d, now)) && self.finished.len() <= keep {
                break;
            }
            self.finished.pop_front();
            self.map.remove(&old);
        }
    }
}

struct Inner<H> {
    hv: H,
    config: AgentConfig,
    faults: Arc<dyn Faults>,
    client: HttpClient,
    /// (host uuid, report url) once a management plane connected.
    binding: Mutex<Option<(Uuid, String)>>,
    tasks: Mutex<Tasks>,
}

/// An agent: a hypervisor behind the protocol. Cheap to clone.
pub struct Agent<H: Hypervisor> {
    inner: Arc<Inner<H>>,
}

impl<H: Hypervisor> Clone for Agent<H> {
    fn clone(&self) -> Self {
        Agent {
            inner: self.inner.clone(),
        }
    }
}

fn json<T: Serialize>(status: u16, body: &T) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match serde_json::to_vec(body) {
        Ok(b) => (status, [("content-type", "application/json")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn error(e: AgentError) -> Response {
    json(e.code.http_status(), &e)
}

/// A header holding a time in milliseconds since the Unix epoch.
fn millis(h: &HeaderMap, name: &str) -> Option<i64> {
    header(h, name).and_then(|d| d.parse().ok())
}

/// A request's [`H_FENCE`], when it carries one.
fn fence_token(h: &HeaderMap) -> Option<FenceToken> {
    header(h, H_FENCE).and_then(FenceToken::parse)
}

/// Whether a request with `deadline` is expired at `now` (ms): the one rule for refusing it
/// ([`past`]) and for forgetting its finished task ([`Tasks::finish`]), so a copy of a request
/// whose task was forgotten is always refused.
fn expired(deadline: i64, now: i64) -> bool {
    now > deadline
}

/// `Expired` when `deadline` has passed: the command `what` (arrived, would have started) that
/// long after it, and is not run.
fn past(deadline: Option<i64>, now: i64, what: &str) -> Option<AgentError> {
    let deadline = deadline?;
    let late = now - deadline;
    expired(deadline, now).then(|| {
        AgentError::new(
            AgentErrorCode::Expired,
            format!("{what} {late} ms after its deadline; not run"),
        )
    })
}

impl<H: Hypervisor> Agent<H> {
    pub fn new(hv: H, config: AgentConfig, faults: Arc<dyn Faults>) -> Self {
        Agent {
            inner: Arc::new(Inner {
                hv,
                config,
                faults,
                client: HttpClient::with_idle_timeout(2, AGENT_IDLE_TIMEOUT),
                binding: Mutex::new(None),
                tasks: Mutex::new(Tasks::default()),
            }),
        }
    }

    pub fn hypervisor(&self) -> &H {
        &self.inner.hv
    }

    /// Serve on `addr` and forward the hypervisor's events as reports. Returns the bound address.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let bound =
            stratus_rt::http::spawn_server_with(addr, Self::router(), self.inner.clone()).await?;
        self.forward_reports();
        Ok(bound)
    }

    /// This agent's routes alone, for a server that serves several agents, each under a path
    /// prefix (`Router::nest`; the simulated agent process). Its reports start to flow too.
    pub fn routes(&self) -> Router {
        self.forward_reports();
        Self::router().layer(Extension(self.inner.clone()))
    }

    /// Forward the hypervisor's events to the management node as reports, from a task that
    /// lives as long as the agent. The first call takes the events; later calls do nothing.
    fn forward_reports(&self) {
        if let Some(mut events) = self.inner.hv.take_events() {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    // Boxed: the forwarding task lives as long as the agent.
                    Box::pin(Inner::report(&inner, ev)).await;
                }
            });
        }
    }

    /// The HTTP routes of the protocol, built once per hypervisor type and shared by every agent
    /// of the process (the simulation runs tens of thousands): each request finds its agent in
    /// an `Arc<Inner<H>>` extension that [`stratus_rt::http::spawn_server_with`] adds.
    fn router() -> Router {
        static ROUTERS: OnceLock<Mutex<HashMap<TypeId, Router>>> = OnceLock::new();
        let mut routers = ROUTERS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        routers
            .entry(TypeId::of::<H>())
            .or_insert_with(Self::build_router)
            .clone()
    }

    fn build_router() -> Router {
        let r = Router::new();
        let r = Self::sync::<ConnectCmd, _, _>(r, |a, c| async move {
            a.hv.management_node(&c.report_url);
            *a.binding.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((c.host_uuid, c.report_url));
            let mut facts = a.hv.facts().await?;
            facts.host_uuid = Some(c.host_uuid);
            Ok(facts)
        });
        let r = Self::sync::<PingCmd, _, _>(r, |a, c| async move {
            let host_uuid = {
                let mut b = a.binding.lock().unwrap_or_else(|e| e.into_inner());
                match b.as_mut() {
                    Some((h, url)) if *h == c.host_uuid => {
                        if !c.report_url.is_empty() {
                            url.clone_from(&c.report_url);
                            a.hv.management_node(&c.report_url);
                        }
                        Some(*h)
                    }
                    Some((h, _)) => Some(*h),
                    None => None,
                }
            };
            Ok(PingReply {
                host_uuid,
                vms: a.hv.vms().await,
                volumes: a.hv.volumes().await.into_iter().map(|v| v.uuid).collect(),
            })
        });
        let r = Self::sync::<VmStatusCmd, _, _>(
            r,
            |a, c| async move { Ok(a.hv.vm_status(c.vm).await) },
        );
        let r =
            Self::sync::<ReceiveVmCmd, _, _>(
                r,
                |a, c| async move { a.hv.receive_vm(&c.spec).await },
            );
        let r = Self::sync::<VmConsoleCmd, _, _>(r, |a, c| async move {
            a.hv.console(c.vm, c.max_bytes).await
        });
        let r = Self::long::<StartVmCmd, _, _>(
            r,
            |a, c, _| async move { a.hv.start_vm(&c.spec).await },
        );
        let r = Self::long::<StopVmCmd, _, _>(r, |a, c, _| async move {
            a.hv.stop_vm(c.vm, Duration::from_millis(c.graceful_timeout_ms), c.force)
                .await
        });
        let r =
            Self::long::<RebootVmCmd, _, _>(r, |a, c, _| async move { a.hv.reboot_vm(c.vm).await });
        let r =
            Self::long::<DestroyVmCmd, _, _>(
                r,
                |a, c, _| async move { a.hv.destroy_vm(c.vm).await },
            );
        let r = Self::long::<MigrateVmCmd, _, _>(r, |a, c, until| async move {
            Inner::migrate(&a, c, until).await
        });
        let r = Self::long::<CreateVolumeCmd, _, _>(r, |a, c, _| async move {
            a.hv.create_volume(&c).await
        });
        let r = Self::long::<DeleteVolumeCmd, _, _>(r, |a, c, _| async move {
            a.hv.delete_volume(c.volume).await
        });
        let r = Self::long::<AttachVolumeCmd, _, _>(r, |a, c, _| async move {
            a.hv.attach_volume(c.vm, &c.disk).await
        });
        let r = Self::sync::<FenceCmd, _, _>(r, |a, c| async move {
            let now = a.now_ms();
            Ok(a.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fence(&c, now))
        });
        Self::long::<DetachVolumeCmd, _, _>(r, |a, c, _| async move {
            a.hv.detach_volume(c.vm, c.volume).await
        })
    }

    fn authorized(inner: &Inner<H>, headers: &HeaderMap) -> Result<(), Box<Response>> {
        match header(headers, H_TOKEN) {
            Some(t) if t == inner.config.token => Ok(()),
            _ => Err(Box::new(error(AgentError::new(
                AgentErrorCode::Unauthorized,
                "missing or wrong x-stratus-token",
            )))),
        }
    }

    /// Refuse a command that arrived after its [`H_DEADLINE`] (its sender gave up on it), whose
    /// workflow was fenced at a later epoch, or whose [`H_FENCE`] does not parse.
    fn in_time(inner: &Inner<H>, headers: &HeaderMap) -> Result<(), Box<Response>> {
        if header(headers, H_FENCE).is_some() && fence_token(headers).is_none() {
            // Run unfenced, it could run where its chain was fenced: refused instead.
            return Err(Box::new(error(AgentError::new(
                AgentErrorCode::InvalidArgument,
                format!("{H_FENCE} is not <chain uuid>:<epoch>"),
            ))));
        }
        let now = inner.now_ms();
        match past(millis(headers, H_DEADLINE), now, "arrived").or_else(|| inner.fenced(headers)) {
            Some(e) => Err(Box::new(error(e))),
            None => Ok(()),
        }
    }

    fn parse<C: Command>(body: &[u8]) -> Result<C, Box<Response>> {
        serde_json::from_slice(body).map_err(|e| {
            Box::new(error(AgentError::new(
                AgentErrorCode::InvalidArgument,
                format!("bad {} request: {e}", C::PATH),
            )))
        })
    }

    /// A short command: answered in the response.
    fn sync<C, F, Fut>(r: Router, f: F) -> Router
    where
        C: Command,
        F: Fn(Arc<Inner<H>>, C) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<C::Reply, AgentError>> + Send + 'static,
    {
        r.route(
            C::PATH,
            post(
                move |Extension(inner): Extension<Arc<Inner<H>>>,
                      TakeHeaders(headers): TakeHeaders,
                      body: Bytes| {
                    let f = f.clone();
                    async move {
                        if let Err(resp) = Self::authorized(&inner, &headers)
                            .and_then(|()| Self::in_time(&inner, &headers))
                        {
                            return *resp;
                        }
                        let cmd: C = match Self::parse(&body) {
                            Ok(c) => c,
                            Err(resp) => return *resp,
                        };
                        let fault = inner.faults.command(C::KIND);
                        if !fault.delay.is_zero() {
                            tokio::time::sleep(fault.delay).await;
                            // Held back past its deadline, or fenced meanwhile: its sender gave
                            // up on it.
                            if let Some(e) = past(
                                millis(&headers, H_DEADLINE),
                                inner.now_ms(),
                                "would have started",
                            )
                            .or_else(|| inner.fenced(&headers))
                            {
                                return error(e);
                            }
                        }
                        if fault.fail_before {
                            return error(AgentError::failed(format!(
                                "{} failed (injected)",
                                C::PATH
                            )));
                        }
                        match f(inner, cmd).await {
                            Ok(_) if fault.fail_after => error(AgentError::failed(format!(
                                "{} failed after running (injected)",
                                C::PATH
                            ))),
                            Ok(reply) => json(200, &reply),
                            Err(e) => error(e),
                        }
                    }
                },
            ),
        )
    }

    /// A long command: 202 now, the result through the callback. `f` also gets the command's
    /// [`H_WAIT_UNTIL`], for work it hands on (a migration's receive).
    fn long<C, F, Fut>(r: Router, f: F) -> Router
    where
        C: Command,
        F: Fn(Arc<Inner<H>>, C, Option<i64>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<C::Reply, AgentError>> + Send + 'static,
    {
        r.route(
            C::PATH,
            post(move |Extension(inner): Extension<Arc<Inner<H>>>, TakeHeaders(headers): TakeHeaders, body: Bytes| {
                let f = f.clone();
                async move {
                    if let Err(resp) = Self::authorized(&inner, &headers)
                        .and_then(|()| Self::in_time(&inner, &headers))
                    {
                        return *resp;
                    }
                    let task = header(&headers, H_TASK).and_then(|t| Uuid::parse_str(t).ok());
                    let deadline = millis(&headers, H_DEADLINE);
                    let callback = header(&headers, H_CALLBACK).map(str::to_string);
                    let wait_until = millis(&headers, H_WAIT_UNTIL);
                    let token = fence_token(&headers);
                    let (Some(task), Some(callback)) = (task, callback) else {
                        return error(AgentError::new(
                            AgentErrorCode::InvalidArgument,
                            format!("{} needs {H_TASK} and {H_CALLBACK} headers", C::PATH),
                        ));
                    };
                    let cmd: C = match Self::parse(&body) {
                        Ok(c) => c,
                        Err(resp) => return *resp,
                    };
                    // Duplicate task: do not run again.
                    let previous = {
                        let mut t = inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
                        match t.map.get(&task) {
                            Some(TaskState::Running(_)) => Some(None),
                            Some(TaskState::Done(r)) => Some(Some(r.clone())),
                            None => {
                                t.map.insert(task, TaskState::Running(token));
                                None
                            }
                        }
                    };
                    match previous {
                        Some(Some(done)) => {
                            tokio::spawn(Inner::deliver(inner.clone(), callback, done));
                            return json(
                                202,
                                &serde_json::json!({"task": task, "duplicate": true}),
                            );
                        }
                        Some(None) => {
                            return json(202, &serde_json::json!({"task": task, "duplicate": true}))
                        }
                        None => {}
                    }
                    tracing::debug!(%task, path = C::PATH, body = %String::from_utf8_lossy(&body), "agent runs a command");
                    tokio::spawn(async move {
                        let fault = inner.faults.command(C::KIND);
                        if !fault.delay.is_zero() {
                            tokio::time::sleep(fault.delay).await;
                        }
                        // Work its sender no longer waits for is not started (it rolled back,
                        // or its workflow was fenced meanwhile).
                        let now = inner.now_ms();
                        let stale = past(wait_until, now, "would have started").or_else(|| {
                            let t = inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
                            t.fenced(token, now)
                        });
                        let outcome = if let Some(e) = stale {
                            Err(e)
                        } else if fault.fail_before {
                            Err(AgentError::failed(format!("{} failed (injected)", C::PATH)))
                        } else {
                            match f(inner.clone(), cmd, wait_until).await {
                                Ok(_) if fault.fail_after => Err(AgentError::failed(format!(
                                    "{} failed after running (injected)",
                                    C::PATH
                                ))),
                                Ok(v) => {
                                    Ok(serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
                                }
                                Err(e) => Err(e),
                            }
                        };
                        let result = TaskResult {
                            task,
                            kind: C::KIND,
                            outcome,
                        };
                        Inner::finish(&inner, task, result.clone(), deadline);
                        match inner.faults.callback(C::KIND) {
                            CallbackFate::Drop => {}
                            CallbackFate::Deliver => {
                                Inner::deliver(inner.clone(), callback, result).await
                            }
                            CallbackFate::Duplicate => {
                                Inner::deliver(inner.clone(), callback.clone(), result.clone())
                                    .await;
                                Inner::deliver(inner.clone(), callback, result).await;
                            }
                        }
                    });
                    json(202, &serde_json::json!({"task": task}))
                }
            }),
        )
    }
}

impl<H: Hypervisor> Inner<H> {
    /// This agent's clock (the one place it reads it; see [`AgentConfig::clock_offset_ms`]).
    fn now_ms(&self) -> i64 {
        stratus_rt::clock::now_ms() + self.config.clock_offset_ms
    }

    /// `Fenced` when the request's [`H_FENCE`] is older than its chain's fence.
    fn fenced(&self, headers: &HeaderMap) -> Option<AgentError> {
        let token = fence_token(headers)?;
        let now = self.now_ms();
        let t = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        t.fenced(Some(token), now)
    }

    fn finish(&self, task: Uuid, result: TaskResult, deadline: Option<i64>) {
        let now = self.now_ms();
        let keep = self.config.remembered_tasks;
        let mut t = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        t.finish(task, result, deadline, now, keep);
    }

    /// POST a result to its callback, retrying with backoff.
    async fn deliver(inner: Arc<Inner<H>>, callback: String, result: TaskResult) {
        let body = match serde_json::to_vec(&result) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a task result");
                return;
            }
        };
        let headers = [(H_TOKEN, inner.config.token.as_str())];
        let deadline = tokio::time::Instant::now() + inner.config.callback_deadline;
        let mut delay = Duration::from_millis(100);
        loop {
            match inner
                .client
                .post_url(&callback, &headers, body.clone(), Duration::from_secs(10))
                .await
            {
                Ok(r) if r.is_success() => return,
                // The manager does not know the task (it restarted): nobody is waiting.
                Ok(r) if r.status == 404 || r.status == 410 => return,
                Ok(r) => {
                    tracing::debug!(status = r.status, %callback, "callback refused; retrying")
                }
                Err(e) => tracing::debug!(error = %e, %callback, "callback failed; retrying"),
            }
            if tokio::time::Instant::now() + delay > deadline {
                tracing::warn!(task = %result.task, %callback, "giving up on a callback");
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn report(inner: &Arc<Inner<H>>, event: ReportEvent) {
        let Some((host_uuid, url)) = inner
            .binding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let body = match serde_json::to_vec(&Report { host_uuid, event }) {
            Ok(b) => b,
            Err(_) => return,
        };
        let headers = [(H_TOKEN, inner.config.token.as_str())];
        for attempt in 0..3u32 {
            match inner
                .client
                .post_url(&url, &headers, body.clone(), Duration::from_secs(5))
                .await
            {
                Ok(r) if r.is_success() => return,
                _ => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
            }
        }
    }

    /// Hand the VM and its disks to the destination agent (sending the running VM to the port it
    /// names, when it names one), then let go of them here. This side
    /// waits for the receive until the migration's `wait_until` (after it the management node
    /// has rolled the migration back and expects the VM here) or [`RECEIVE_TIMEOUT`], whichever
    /// comes first, and hands that moment to the destination as the receive's deadline: a
    /// destination that would only start taking the VM later does not. A receive that started
    /// in time and answers too late leaves a second copy there, which state sync destroys (the
    /// database names this host).
    async fn migrate(
        inner: &Arc<Inner<H>>,
        c: MigrateVmCmd,
        wait_until: Option<i64>,
    ) -> Result<(), AgentError> {
        let spec = inner.hv.vm_spec(c.vm).await?;
        let dest = AgentAddress::parse(&c.dest_address)
            .map_err(|e| AgentError::new(AgentErrorCode::InvalidArgument, e.to_string()))?;
        let body = serde_json::to_vec(&ReceiveVmCmd { spec })
            .map_err(|e| AgentError::failed(e.to_string()))?;
        let now = inner.now_ms();
        let own = now + RECEIVE_TIMEOUT.as_millis() as i64;
        let (deadline, sender_waits) = match wait_until {
            Some(t) if t < own => (t, false),
            _ => (own, true),
        };
        let timeout = Duration::from_millis((deadline - now).max(0) as u64);
        let deadline_header = deadline.to_string();
        let headers = [
            (H_TOKEN, c.dest_token.as_str()),
            (H_DEADLINE, deadline_header.as_str()),
        ];
        let r = match inner
            .client
            .post(
                dest.addr,
                &dest.path(ReceiveVmCmd::PATH),
                &headers,
                body,
                timeout,
            )
            .await
        {
            Ok(r) => r,
            Err(HttpError::Timeout(..)) if !sender_waits => {
                return Err(AgentError::new(
                    AgentErrorCode::Expired,
                    format!(
                        "the destination did not take the VM within {} ms, before the \
                         migration's sender stopped waiting; the VM stays here",
                        timeout.as_millis()
                    ),
                ))
            }
            Err(e) => return Err(AgentError::new(AgentErrorCode::Unreachable, e.to_string())),
        };
        if !r.is_success() {
            let e: AgentError = serde_json::from_slice(&r.body).unwrap_or_else(|_| {
                AgentError::failed(format!("destination answered {}", r.status))
            });
            return Err(e);
        }
        let reply: ReceiveReply = serde_json::from_slice(&r.body).map_err(|e| {
            AgentError::failed(format!("the destination's answer to a receive: {e}"))
        })?;
        if reply.migration_port.is_some() {
            inner.hv.send_vm(c.vm, dest.addr.ip(), &reply).await?;
        }
        inner.hv.release_migrated(c.vm).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(task: Uuid) -> TaskResult {
        TaskResult {
            task,
            kind: CommandKind::VmStart,
            outcome: Ok(serde_json::Value::Null),
        }
    }

    fn known(t: &Tasks) -> Vec<u128> {
        let mut v: Vec<u128> = t.map.keys().map(|u| u.as_u128()).collect();
        v.sort();
        v
    }

    #[test]
    fn finished_tasks_are_forgotten_past_their_deadline_or_beyond_the_count() {
        let id = Uuid::from_u128;
        let mut t = Tasks::default();
        // Running tasks are never forgotten here.
        t.map.insert(id(9), TaskState::Running(None));
        t.finish(id(1), done(id(1)), Some(1_000), 500, 4);
        t.finish(id(2), done(id(2)), Some(2_000), 900, 4);
        t.finish(id(3), done(id(3)), None, 1_000, 4);
        assert_eq!(
            known(&t),
            [1, 2, 3, 9],
            "nothing past its deadline at 1,000"
        );
        t.finish(id(4), done(id(4)), Some(9_000), 1_001, 4);
        assert_eq!(
            known(&t),
            [2, 3, 4, 9],
            "1 expired at 1,001, with room for it"
        );
        // 2 expires at 2,001; 3 has no deadline and is forgotten only beyond the count.
        t.finish(id(5), done(id(5)), Some(9_000), 2_001, 4);
        assert_eq!(known(&t), [3, 4, 5, 9]);
        t.finish(id(6), done(id(6)), Some(9_000), 2_002, 4);
        assert_eq!(known(&t), [3, 4, 5, 6, 9]);
        t.finish(id(7), done(id(7)), Some(9_000), 2_003, 4);
        assert_eq!(known(&t), [4, 5, 6, 7, 9], "the oldest beyond four");
        assert_eq!(t.finished.len(), 4);
    }

    #[test]
    fn a_fence_refuses_older_epochs_of_its_chain_until_its_time_and_counts_their_tasks() {
        let id = Uuid::from_u128;
        let (chain, other) = (id(1), id(2));
        let tok = |chain, epoch| Some(FenceToken { chain, epoch });
        let fence = |epoch, until_ms| FenceCmd {
            token: FenceToken { chain, epoch },
            until_ms,
        };
        let mut t = Tasks::default();
        t.map.insert(id(10), TaskState::Running(tok(chain, 0)));
        t.map.insert(id(11), TaskState::Running(tok(chain, 1)));
        t.map.insert(id(12), TaskState::Running(tok(other, 0)));
        t.map.insert(id(13), TaskState::Running(None));
        assert!(t.fenced(tok(chain, 0), 0).is_none(), "no fence yet");
        assert_eq!(t.fence(&fence(1, 1_000), 0).running, 1, "only task 10");
        let refused = t.fenced(tok(chain, 0), 500).expect("older epoch refused");
        assert_eq!(refused.code, AgentErrorCode::Fenced);
        assert!(
            t.fenced(tok(chain, 1), 500).is_none(),
            "the fence's own epoch"
        );
        assert!(t.fenced(tok(other, 0), 500).is_none(), "another chain");
        assert!(t.fenced(None, 500).is_none(), "a command of no chain");
        // A fence never goes back to an older epoch, and a later one counts more.
        assert_eq!(t.fence(&fence(0, 1_000), 600).running, 0);
        assert!(t.fenced(tok(chain, 0), 600).is_some());
        assert_eq!(t.fence(&fence(2, 1_000), 600).running, 2);
        // Past its time, it is forgotten (older copies are expired by then).
        assert!(t.fenced(tok(chain, 0), 1_001).is_none());
        t.fence(
            &FenceCmd {
                token: FenceToken {
                    chain: other,
                    epoch: 1,
                },
                until_ms: 5_000,
            },
            1_001,
        );
        assert_eq!(t.fences.len(), 1, "the chain's fence went at 1,001");
    }
}
