//! Routes of the API. See the module docs of [`crate::api`].

use super::{error, json, not_found_path, scope, RawBody};
use crate::auth::Caller;
use crate::bus::Message;
use crate::error::{Error, ErrorCode};
use crate::job::{Job, JobState};
use crate::model::*;
use crate::services::cascade::DeleteResource;
use crate::services::host::{AddHost, ChangeHostState, HostAction, ReconnectHost};
use crate::services::identity::{CreateAccount, CreateUser, SetQuotas};
use crate::services::network::{AddIpRange, AttachL2ToCluster, CreateL2Network, CreateL3Network};
use crate::services::offering::{CreateDiskOffering, CreateInstanceOffering, SetOfferingState};
use crate::services::storage::{
    AddImage, AttachBackupStorage, AttachPrimaryStorage, CreateBackupStorage, CreatePrimaryStorage,
};
use crate::services::vm::{
    AttachVolume, CreateDataVolume, CreateVm, DeleteVolume, DestroyVm, DetachVolume, ExpungeVm,
    MigrateVm, RebootVm, RecoverVm, StartVm, StopVm, VmStateReport,
};
use crate::services::webhook::{CreateWebhook, DeleteWebhook};
use crate::services::zone::{CreateCluster, CreateZone, UpdateCluster, UpdateZone};
use crate::services::Cloud;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use stratus_agent_protocol::{Report, ReportEvent, TaskResult, H_TOKEN};
use stratus_rt::http::{header, TakeHeaders};
use stratus_store::{Cond, JsonText, Query, RecordJson, Resource, Row};
use uuid::Uuid;

/// URL path segment → kind.
pub const RESOURCE_PATHS: &[(&str, &str)] = &[
    ("zones", "zone"),
    ("clusters", "cluster"),
    ("hosts", "host"),
    ("reservations", "reservation"),
    ("primary-storages", "primary_storage"),
    ("local-storages", "local_storage"),
    ("backup-storages", "backup_storage"),
    ("images", "image"),
    ("volumes", "volume"),
    ("l2-networks", "l2_network"),
    ("l3-networks", "l3_network"),
    ("ip-ranges", "ip_range"),
    ("used-ips", "used_ip"),
    ("vm-nics", "vm_nic"),
    ("instance-offerings", "instance_offering"),
    ("disk-offerings", "disk_offering"),
    ("vms", "vm"),
    ("jobs", "job"),
    ("flow-chains", "flow_chain"),
    ("accounts", "account"),
    ("users", "user"),
    ("api-tokens", "api_token"),
    ("audit", "audit"),
    ("events", "event"),
    ("webhooks", "webhook"),
];

/// Resource paths `DELETE` refuses: records of the engine and of other rows, which go with
/// what they record.
pub const UNDELETABLE: &[&str] = &[
    "jobs",
    "flow-chains",
    "reservations",
    "used-ips",
    "local-storages",
    "events",
];

pub fn kind_of_path(path: &str) -> Option<&'static str> {
    RESOURCE_PATHS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, k)| *k)
}

type Api = State<Arc<Cloud>>;

/// `?key=value&...` with repeated keys, percent-decoded.
fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    let Some(raw) = raw else { return Vec::new() };
    form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A JSON body (an empty one reads as `{}`).
pub(super) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, Error> {
    let b: &[u8] = if body.iter().all(|c| c.is_ascii_whitespace()) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(b).map_err(|e| Error::invalid(format!("bad request body: {e}")))
}

fn wait_of(pairs: &[(String, String)]) -> Result<Option<Duration>, Error> {
    match param(pairs, "wait") {
        None => Ok(None),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
            .map(|s| Some(Duration::from_secs_f64(s)))
            .ok_or_else(|| {
                Error::invalid(format!("wait must be seconds from 0 to 86400; got {v:?}"))
            }),
    }
}

/// What a job shows through the API.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub job_uuid: Uuid,
    pub resource_uuid: Option<Uuid>,
    pub operation: String,
    pub state: String,
    pub progress: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<stratus_store::JsonText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    /// While it runs: the step of its workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Takes the row: its result moves into the view instead of being copied.
fn job_view(j: Row<Job>) -> JobView {
    let error = j.error();
    JobView {
        job_uuid: j.uuid,
        resource_uuid: j.resource_uuid,
        state: j.state.as_str().to_string(),
        progress: j.progress,
        error,
        result: j.data.result,
        operation: j.data.operation,
        step: None,
    }
}

/// A running job's view with the step its workflow is at (from the journal). The journal
/// holds only chains in flight, so the chain of a job is found by reading it.
async fn running_job_view(c: &Cloud, j: Row<Job>) -> JobView {
    let id = j.uuid;
    let mut v = job_view(j);
    if v.state != JobState::Running.as_str() {
        return v;
    }
    let q = Query::of::<crate::flow::ChainRecord>().eq("job", id);
    let chains = match c.db().select::<crate::flow::ChainRecord>(&q).await {
        Ok(chains) => chains,
        Err(e) => {
            // The step is decoration: the view goes out without it.
            tracing::debug!(job = %id, error = %e, "cannot read the journal for a job's step");
            return v;
        }
    };
    if let Some(rec) = chains.first() {
        if let Some((step, percent)) = c.engine.chains.position(rec) {
            v.step = Some(step);
            v.progress = v.progress.max(percent);
        }
    }
    v
}

/// Render a reply for the API (rows without their secret fields).
pub trait ApiView {
    fn view(&self) -> JsonText;
}
impl<T: Resource> ApiView for Row<T> {
    fn view(&self) -> JsonText {
        self.api_text()
    }
}
macro_rules! plain_view {
    ($($t:ty),*) => { $( impl ApiView for $t {
        fn view(&self) -> JsonText { JsonText::of(self) }
    } )* };
}
plain_view!(
    (),
    String,
    u32,
    usize,
    crate::services::cascade::DeleteReport
);

/// Run `msg` as a job; answer at once or, with `wait`, when it ends.
async fn submit<M>(
    c: &Arc<Cloud>,
    me: &Caller,
    resource: Option<Uuid>,
    msg: M,
    wait: Option<Duration>,
) -> Response
where
    M: Message,
    M::Reply: ApiView,
{
    let bus = c.bus().clone();
    let job = c
        .engine
        .jobs
        .submit(Some(me.account), M::NAME, resource, move |_h| async move {
            let reply = bus.send(msg).await?;
            Ok(reply.view())
        })
        .await;
    let job = match job {
        Ok(j) => j,
        Err(e) => return error(&e),
    };
    let Some(wait) = wait else {
        return json(
            202,
            &serde_json::json!({"job_uuid": job, "resource_uuid": resource}),
        );
    };
    match c.engine.jobs.wait(job, wait).await {
        Ok(j) if j.state == JobState::Succeeded => json(200, &job_view(j)),
        Ok(j) if j.state == JobState::Failed => {
            let v = job_view(j);
            let status = v.error.as_ref().map_or(500, |e| e.code.http_status());
            json(status, &v)
        }
        Ok(j) => json(202, &job_view(j)),
        Err(e) if e.code == ErrorCode::Timeout => json(
            202,
            &serde_json::json!({"job_uuid": job, "resource_uuid": resource, "state": "Running"}),
        ),
        Err(e) => error(&e),
    }
}

async fn list(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path(res): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(kind) = kind_of_path(&res) else {
        return not_found_path(&format!("/v1/{res}"));
    };
    let pairs = query_pairs(&raw);
    let mut q = Query::new(kind);
    for (k, v) in &pairs {
        match k.as_str() {
            "q" => match Cond::parse(v) {
                Ok(cond) => q = q.cond(cond),
                Err(e) => return error(&e.into()),
            },
            "sort" => {
                q = match v.strip_prefix('-') {
                    Some(f) => q.sort_desc(f),
                    None => q.sort_asc(v),
                }
            }
            "limit" => match v.parse::<u64>() {
                Ok(n) if n <= 100_000 => q = q.limit(n),
                _ => {
                    return error(&Error::invalid(format!(
                        "limit must be 0..=100000; got {v:?}"
                    )))
                }
            },
            "offset" => match v.parse::<u64>() {
                Ok(n) => q = q.offset(n),
                _ => {
                    return error(&Error::invalid(format!(
                        "offset must be a number; got {v:?}"
                    )))
                }
            },
            "count" | "wait" => {}
            other => {
                return error(&Error::invalid(format!(
                    "unknown query parameter {other:?}; use q, sort, limit, offset, count"
                )))
            }
        }
    }
    match scope::list_condition(&me, kind) {
        Ok(Some(cond)) => q = q.cond(cond),
        Ok(None) => {}
        Err(e) => return error(&e),
    }
    if q.limit.is_none() {
        q = q.limit(1000);
    }
    let db = c.db();
    let rows = match db.query(&q).await {
        Ok(r) => r,
        Err(e) => return error(&e.into()),
    };
    #[derive(Serialize)]
    struct Items<'a> {
        items: Vec<RecordJson<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
    }
    let mut body = Items {
        items: rows.iter().map(|r| r.api_json()).collect(),
        total: None,
    };
    if param(&pairs, "count") == Some("true") {
        match db.count(&q).await {
            Ok(n) => body.total = Some(n),
            Err(e) => return error(&e.into()),
        }
    }
    json(200, &body)
}

async fn get_one(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path((res, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(kind) = kind_of_path(&res) else {
        return not_found_path(&format!("/v1/{res}"));
    };
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return error(&Error::invalid(format!("{id:?} is not a uuid")));
    };
    if kind == "job" {
        // `?wait=S`: answer when the job has ended, or as it is after S seconds.
        let jobs = &c.engine.jobs;
        let job = match wait_of(&query_pairs(&raw)) {
            Err(e) => Err(e),
            Ok(None) => jobs.get(uuid).await,
            Ok(Some(wait)) => match jobs.wait(uuid, wait).await {
                Err(e) if e.code == ErrorCode::Timeout => jobs.get(uuid).await,
                other => other,
            },
        };
        return match job.and_then(|j| {
            scope::check_read(&me, kind, uuid, j.account_uuid)?;
            Ok(j)
        }) {
            Ok(j) => json(200, &running_job_view(&c, j).await),
            Err(e) => error(&e),
        };
    }
    if let Err(e) = scope::check_use(&c, &me, kind, uuid).await {
        return error(&e);
    }
    match c.db().store().get(kind, uuid).await {
        Ok(Some(r)) => json(200, &r.api_json()),
        Ok(None) => error(&Error::not_found(kind, uuid)),
        Err(e) => error(&e.into()),
    }
}

/// `GET /v1/vms/{id}/console?bytes=N`: the end of the VM's serial console, from its host.
async fn vm_console(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return error(&Error::invalid(format!("{id:?} is not a uuid")));
    };
    let mut bytes = 64 * 1024;
    for (k, v) in query_pairs(&raw) {
        match (k.as_str(), v.parse::<u64>()) {
            ("bytes", Ok(n)) => bytes = n,
            _ => return error(&Error::invalid(format!("unknown or bad parameter {k}={v}"))),
        }
    }
    if let Err(e) = scope::check_use(&c, &me, "vm", uuid).await {
        return error(&e);
    }
    match crate::services::vm::console(&c, uuid, bytes).await {
        Ok(r) => json(
            200,
            &serde_json::json!({"vm_uuid": uuid, "text": r.text, "total_bytes": r.total_bytes}),
        ),
        Err(e) => error(&e),
    }
}

async fn create(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path(res): Path<String>,
    RawQuery(raw): RawQuery,
    RawBody(body): RawBody,
) -> Response {
    let pairs = query_pairs(&raw);
    let wait = match wait_of(&pairs) {
        Ok(w) => w,
        Err(e) => return error(&e),
    };
    macro_rules! go {
        ($t:ty) => {
            match parse_body::<$t>(&body) {
                Ok(m) => submit(&c, &me, None, m, wait).await,
                Err(e) => error(&e),
            }
        };
    }
    // A resource an account owns: the caller's account, or one an admin names.
    macro_rules! owned {
        ($t:ty) => {
            match parse_body::<$t>(&body) {
                Ok(mut m) => match scope::new_owner(&c, &me, m.account_uuid).await {
                    Ok(a) => {
                        m.account_uuid = Some(a);
                        submit(&c, &me, None, m, wait).await
                    }
                    Err(e) => error(&e),
                },
                Err(e) => error(&e),
            }
        };
    }
    if let Some(kind) = kind_of_path(&res) {
        if let Err(e) = scope::check_create(&me, kind) {
            return error(&e);
        }
    }
    match res.as_str() {
        "zones" => go!(CreateZone),
        "clusters" => go!(CreateCluster),
        "primary-storages" => go!(CreatePrimaryStorage),
        "backup-storages" => go!(CreateBackupStorage),
        "images" => match parse_body::<AddImage>(&body) {
            // A file:// URL is a path on the hosts, read by their agents as root: an admin's.
            Ok(m) if !me.admin && m.url.starts_with("file://") => error(&Error::new(
                ErrorCode::Forbidden,
                "only an admin names a file:// image (a path on the hosts); upload it \
                 (PUT /v1/images/{id}/file) or give an http:// URL",
            )),
            _ => owned!(AddImage),
        },
        "instance-offerings" => go!(CreateInstanceOffering),
        "disk-offerings" => go!(CreateDiskOffering),
        "l2-networks" => go!(CreateL2Network),
        "l3-networks" => owned!(CreateL3Network),
        "ip-ranges" => go!(AddIpRange),
        "webhooks" => owned!(CreateWebhook),
        "accounts" => go!(CreateAccount),
        "users" => match parse_body::<NewUser>(&body) {
            Ok(u) => match crate::auth::new_password_hash(&c.engine.ids, &u.password) {
                Ok(password_hash) => {
                    let m = CreateUser {
                        name: u.name,
                        account_uuid: u.account_uuid,
                        password_hash,
                    };
                    submit(&c, &me, None, m, wait).await
                }
                Err(e) => error(&e),
            },
            Err(e) => error(&e),
        },
        "hosts" => match parse_body::<AddHost>(&body) {
            Ok(mut m) => {
                let id = *m.uuid.get_or_insert_with(|| c.engine.ids.uuid());
                submit(&c, &me, Some(id), m, wait).await
            }
            Err(e) => error(&e),
        },
        "vms" => match parse_body::<CreateVm>(&body) {
            Ok(mut m) => match vm_request_scope(&c, &me, &mut m).await {
                Ok(()) => {
                    let id = *m.uuid.get_or_insert_with(|| c.engine.ids.uuid());
                    submit(&c, &me, Some(id), m, wait).await
                }
                Err(e) => error(&e),
            },
            Err(e) => error(&e),
        },
        "volumes" => match parse_body::<CreateDataVolume>(&body) {
            Ok(mut m) => {
                let scoped = async {
                    m.account_uuid = Some(scope::new_owner(&c, &me, m.account_uuid).await?);
                    if let Some(vm) = m.vm_uuid {
                        scope::check_write(&c, &me, "vm", vm).await?;
                    }
                    Ok::<_, Error>(())
                };
                match scoped.await {
                    Ok(()) => {
                        let id = *m.uuid.get_or_insert_with(|| c.engine.ids.uuid());
                        submit(&c, &me, Some(id), m, wait).await
                    }
                    Err(e) => error(&e),
                }
            }
            Err(e) => error(&e),
        },
        other => match kind_of_path(other) {
            Some(_) => error(&Error::invalid(format!(
                "{other} cannot be created through the API"
            ))),
            None => not_found_path(&format!("/v1/{other}")),
        },
    }
}

/// A VM request as `me` may make it: owned by its account, naming only images and networks it
/// may use, and leaving placement to the allocator unless an admin chooses.
async fn vm_request_scope(c: &Cloud, me: &Caller, m: &mut CreateVm) -> Result<(), Error> {
    m.account_uuid = Some(scope::new_owner(c, me, m.account_uuid).await?);
    if me.admin {
        return Ok(());
    }
    if m.zone_uuid.is_some() || m.cluster_uuid.is_some() || m.host_uuid.is_some() {
        return Err(Error::new(
            ErrorCode::Forbidden,
            "only an admin may choose a VM's zone, cluster or host",
        ));
    }
    scope::check_use(c, me, "image", m.image_uuid).await?;
    for l3 in &m.l3_network_uuids {
        scope::check_use(c, me, "l3_network", *l3).await?;
    }
    Ok(())
}

/// `POST /v1/users`: the password is hashed here, before any message carries it.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    name: String,
    account_uuid: Uuid,
    password: String,
}

async fn update(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path((res, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    RawBody(body): RawBody,
) -> Response {
    let pairs = query_pairs(&raw);
    let wait = match wait_of(&pairs) {
        Ok(w) => w,
        Err(e) => return error(&e),
    };
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return error(&Error::invalid(format!("{id:?} is not a uuid")));
    };
    let mut obj = match parse_body::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(o)) => o,
        Ok(_) => return error(&Error::invalid("the body must be a JSON object")),
        Err(e) => return error(&e),
    };
    if !me.admin {
        return error(&Error::new(
            ErrorCode::Forbidden,
            "only an admin account's users may update resources",
        ));
    }
    obj.insert("uuid".into(), uuid.to_string().into());
    let v = serde_json::Value::Object(obj);
    macro_rules! go {
        ($t:ty) => {
            match serde_json::from_value::<$t>(v) {
                Ok(m) => submit(&c, &me, Some(uuid), m, wait).await,
                Err(e) => error(&Error::invalid(format!("bad request body: {e}"))),
            }
        };
    }
    match res.as_str() {
        "zones" => go!(UpdateZone),
        "clusters" => go!(UpdateCluster),
        "accounts" => go!(SetQuotas),
        other => error(&Error::invalid(format!(
            "{other} cannot be updated through the API"
        ))),
    }
}

async fn delete(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path((res, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Response {
    let pairs = query_pairs(&raw);
    let wait = match wait_of(&pairs) {
        Ok(w) => w,
        Err(e) => return error(&e),
    };
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return error(&Error::invalid(format!("{id:?} is not a uuid")));
    };
    let force = param(&pairs, "force") == Some("true");
    if let Some(kind) = kind_of_path(&res) {
        if let Err(e) = scope::check_write(&c, &me, kind, uuid).await {
            return error(&e);
        }
    }
    match res.as_str() {
        "vms" => submit(&c, &me, Some(uuid), DestroyVm { uuid, force }, wait).await,
        "volumes" => submit(&c, &me, Some(uuid), DeleteVolume { uuid, force }, wait).await,
        "webhooks" => submit(&c, &me, Some(uuid), DeleteWebhook { uuid }, wait).await,
        other => match kind_of_path(other) {
            Some(kind) if !UNDELETABLE.contains(&other) => {
                let m = DeleteResource {
                    kind: kind.to_string(),
                    uuid,
                    force,
                };
                submit(&c, &me, Some(uuid), m, wait).await
            }
            Some(_) => error(&Error::invalid(format!(
                "{other} cannot be deleted through the API"
            ))),
            None => not_found_path(&format!("/v1/{other}")),
        },
    }
}

/// `me` may run an action on `uuid` of `res` with body `b`: it owns the resource and anything
/// the body names; only an admin chooses a host.
async fn action_scope(
    c: &Cloud,
    me: &Caller,
    res: &str,
    uuid: Uuid,
    b: &ActionBody,
) -> Result<(), Error> {
    if me.admin {
        return Ok(());
    }
    let Some(kind) = kind_of_path(res) else {
        return Ok(());
    };
    scope::check_write(c, me, kind, uuid).await?;
    if b.host_uuid.is_some() || b.cluster_uuid.is_some() || b.zone_uuid.is_some() {
        return Err(Error::new(
            ErrorCode::Forbidden,
            "only an admin may name a host, cluster or zone",
        ));
    }
    if let Some(vm) = b.vm_uuid {
        scope::check_write(c, me, "vm", vm).await?;
    }
    Ok(())
}

#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ActionBody {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    host_uuid: Option<Uuid>,
    #[serde(default)]
    vm_uuid: Option<Uuid>,
    #[serde(default)]
    cluster_uuid: Option<Uuid>,
    #[serde(default)]
    zone_uuid: Option<Uuid>,
}

async fn action(
    State(c): Api,
    Extension(me): Extension<Caller>,
    Path((res, id, act)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    RawBody(body): RawBody,
) -> Response {
    let pairs = query_pairs(&raw);
    let wait = match wait_of(&pairs) {
        Ok(w) => w,
        Err(e) => return error(&e),
    };
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return error(&Error::invalid(format!("{id:?} is not a uuid")));
    };
    let b: ActionBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let need = |what: &str, v: Option<Uuid>| {
        v.ok_or_else(|| Error::invalid(format!("{act} needs {what}")))
    };
    if let Err(e) = action_scope(&c, &me, &res, uuid, &b).await {
        return error(&e);
    }
    let s = Some(uuid);
    match (res.as_str(), act.as_str()) {
        ("vms", "start") => submit(&c, &me, s, StartVm { uuid }, wait).await,
        ("vms", "stop") => {
            submit(
                &c,
                &me,
                s,
                StopVm {
                    uuid,
                    force: b.force,
                },
                wait,
            )
            .await
        }
        ("vms", "reboot") => submit(&c, &me, s, RebootVm { uuid }, wait).await,
        ("vms", "destroy") => {
            submit(
                &c,
                &me,
                s,
                DestroyVm {
                    uuid,
                    force: b.force,
                },
                wait,
            )
            .await
        }
        ("vms", "recover") => submit(&c, &me, s, RecoverVm { uuid }, wait).await,
        ("vms", "expunge") => {
            submit(
                &c,
                &me,
                s,
                ExpungeVm {
                    uuid,
                    force: b.force,
                },
                wait,
            )
            .await
        }
        ("vms", "migrate") => {
            submit(
                &c,
                &me,
                s,
                MigrateVm {
                    uuid,
                    host_uuid: b.host_uuid,
                },
                wait,
            )
            .await
        }
        ("hosts", "reconnect") => submit(&c, &me, s, ReconnectHost { uuid }, wait).await,
        ("hosts", a @ ("enable" | "disable" | "maintenance")) => {
            let action: HostAction = a.parse().expect("matched");
            submit(&c, &me, s, ChangeHostState { uuid, action }, wait).await
        }
        ("volumes", "attach") => match need("vm_uuid", b.vm_uuid) {
            Ok(vm) => {
                submit(
                    &c,
                    &me,
                    s,
                    AttachVolume {
                        volume_uuid: uuid,
                        vm_uuid: vm,
                    },
                    wait,
                )
                .await
            }
            Err(e) => error(&e),
        },
        ("volumes", "detach") => match c.db().get::<Volume>(uuid).await {
            Ok(Some(v)) => match v.vm_uuid {
                Some(vm) => {
                    submit(
                        &c,
                        &me,
                        s,
                        DetachVolume {
                            volume_uuid: uuid,
                            vm_uuid: vm,
                        },
                        wait,
                    )
                    .await
                }
                None => error(&Error::new(
                    ErrorCode::InvalidState,
                    format!("volume {uuid} is not attached"),
                )),
            },
            Ok(None) => error(&Error::not_found("volume", uuid)),
            Err(e) => error(&e.into()),
        },
        ("l2-networks", "attach-cluster") => match need("cluster_uuid", b.cluster_uuid) {
            Ok(cl) => {
                submit(
                    &c,
                    &me,
                    s,
                    AttachL2ToCluster {
                        l2_uuid: uuid,
                        cluster_uuid: cl,
                    },
                    wait,
                )
                .await
            }
            Err(e) => error(&e),
        },
        ("primary-storages", "attach-cluster") => match need("cluster_uuid", b.cluster_uuid) {
            Ok(cl) => {
                submit(
                    &c,
                    &me,
                    s,
                    AttachPrimaryStorage {
                        ps_uuid: uuid,
                        cluster_uuid: cl,
                    },
                    wait,
                )
                .await
            }
            Err(e) => error(&e),
        },
        ("backup-storages", "attach-zone") => match need("zone_uuid", b.zone_uuid) {
            Ok(z) => {
                submit(
                    &c,
                    &me,
                    s,
                    AttachBackupStorage {
                        bs_uuid: uuid,
                        zone_uuid: z,
                    },
                    wait,
                )
                .await
            }
            Err(e) => error(&e),
        },
        ("instance-offerings" | "disk-offerings", a @ ("enable" | "disable")) => {
            let state = if a == "enable" {
                EnableState::Enabled
            } else {
                EnableState::Disabled
            };
            submit(&c, &me, s, SetOfferingState { uuid, state }, wait).await
        }
        ("zones", a @ ("enable" | "disable")) => {
            let state = Some(if a == "enable" {
                EnableState::Enabled
            } else {
                EnableState::Disabled
            });
            submit(
                &c,
                &me,
                s,
                UpdateZone {
                    uuid,
                    name: None,
                    description: None,
                    state,
                },
                wait,
            )
            .await
        }
        ("clusters", a @ ("enable" | "disable")) => {
            let state = Some(if a == "enable" {
                EnableState::Enabled
            } else {
                EnableState::Disabled
            });
            submit(
                &c,
                &me,
                s,
                UpdateCluster {
                    uuid,
                    name: None,
                    state,
                },
                wait,
            )
            .await
        }
        (r, a) => not_found_path(&format!("/v1/{r}/{uuid}/actions/{a}")),
    }
}

async fn config_list(State(c): Api) -> Response {
    json(200, &c.engine.config.list())
}

async fn config_get(State(c): Api, Path(name): Path<String>) -> Response {
    match c.engine.config.list().into_iter().find(|v| v.name == name) {
        Some(v) => json(200, &v),
        None => error(&Error::not_found("config entry", name)),
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigSet {
    value: serde_json::Value,
}

async fn config_set(State(c): Api, Path(name): Path<String>, RawBody(body): RawBody) -> Response {
    let b: ConfigSet = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let text = match &b.value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match c.engine.config.set(&name, &text).await {
        Ok(v) => {
            c.bus().publish(
                "/config/change",
                || serde_json::json!({"name": name, "value": v.to_string()}),
            );
            config_get(State(c), Path(name)).await
        }
        Err(e) => error(&e),
    }
}

async fn callback(
    State(c): Api,
    Path(task): Path<String>,
    TakeHeaders(headers): TakeHeaders,
    RawBody(body): RawBody,
) -> Response {
    let token = header(&headers, H_TOKEN).unwrap_or("");
    let result: TaskResult = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(&Error::invalid(format!("bad task result: {e}"))),
    };
    if Uuid::parse_str(&task).ok() != Some(result.task) {
        return error(&Error::invalid("task in the path and the body differ"));
    }
    match c.agents.deliver(result, token) {
        Ok(_) => json(200, &serde_json::json!({"ok": true})),
        Err(crate::agent::CallbackRefusal::UnknownTask) => error(&Error::new(
            ErrorCode::NotFound,
            format!("nobody waits for task {task}"),
        )),
        Err(crate::agent::CallbackRefusal::WrongToken) => error(&Error::new(
            ErrorCode::Unauthorized,
            "wrong token for this task",
        )),
    }
}

async fn report(
    State(c): Api,
    TakeHeaders(headers): TakeHeaders,
    RawBody(body): RawBody,
) -> Response {
    let token = header(&headers, H_TOKEN).unwrap_or("");
    let r: Report = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(&Error::invalid(format!("bad report: {e}"))),
    };
    let known = c
        .db()
        .peek::<Host, _>(r.host_uuid, |h| h.decode::<String>("token"))
        .await;
    match known {
        Ok(Some(t)) if t == token => {}
        Ok(_) => {
            return error(&Error::new(
                ErrorCode::Unauthorized,
                "unknown host or wrong token",
            ))
        }
        Err(e) => return error(&e.into()),
    }
    match r.event {
        ReportEvent::VmState { vm, state } => {
            let bus = c.bus().clone();
            tokio::spawn(async move {
                let m = VmStateReport {
                    vm,
                    host: r.host_uuid,
                    state: Some(state),
                    disconnected: false,
                };
                if let Err(e) = bus.send(m).await {
                    tracing::debug!(%vm, error = %e, "VM report not handled");
                }
            });
        }
        ReportEvent::HostStopping => {
            tracing::info!(host = %r.host_uuid, "host reports it is stopping");
        }
    }
    json(200, &serde_json::json!({"ok": true}))
}

/// `GET /v1/events`: with `Accept: text/event-stream`, the event log as Server-Sent Events
/// from after `Last-Event-ID` (or `?after=N`; default: from now), narrowed by `?filter=GLOBS`
/// and, for a non-admin, to its account's resources; otherwise the ordinary list of `event`.
async fn events(
    State(c): Api,
    Extension(me): Extension<Caller>,
    headers: axum::http::HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let streaming = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !streaming {
        return list(
            State(c),
            Extension(me),
            Path("events".into()),
            RawQuery(raw),
        )
        .await;
    }
    let pairs = query_pairs(&raw);
    if let Some((k, _)) = pairs.iter().find(|(k, _)| k != "filter" && k != "after") {
        return error(&Error::invalid(format!(
            "unknown query parameter {k:?}; use filter, after"
        )));
    }
    let filter = match crate::events::Filter::parse(param(&pairs, "filter").unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return error(&e),
    };
    let Some(log) = c.engine.events.clone() else {
        return error(&Error::new(
            ErrorCode::NotFound,
            "this node keeps no event log",
        ));
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| param(&pairs, "after"));
    let after = match resume {
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => {
                return error(&Error::invalid(format!(
                    "Last-Event-ID / after must be an event number (0 or more); got {v:?}"
                )))
            }
        },
        None => match log.last_seq().await {
            Ok(n) => n,
            Err(e) => return error(&e.into()),
        },
    };
    let account = (!me.admin).then_some(me.account);
    super::events::stream(log, after, account, filter).into_response()
}

/// Events are written only with the changes they describe. The body is read (and so held to
/// the size limit) like every other.
async fn events_post(RawBody(_body): RawBody) -> Response {
    error(&Error::invalid("events cannot be created through the API"))
}

async fn health(State(c): Api) -> Response {
    json(
        200,
        &serde_json::json!({"node": c.engine.node, "boot": c.engine.boot, "ok": true}),
    )
}

async fn metrics(State(c): Api) -> Response {
    (
        axum::http::StatusCode::OK,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        c.engine.metrics.encode(),
    )
        .into_response()
}

/// Count each answered request by its route (the kind's path in place of `{res}`), method
/// and status.
async fn count_requests(
    State(c): Api,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().to_string();
    let route = match req.extensions().get::<axum::extract::MatchedPath>() {
        Some(m) => {
            let res = req.uri().path().split('/').nth(2).unwrap_or("");
            let kind = if kind_of_path(res).is_some() {
                res
            } else {
                "?"
            };
            m.as_str().replacen("{res}", kind, 1)
        }
        None => "unmatched".to_string(),
    };
    let resp = next.run(req).await;
    c.engine
        .metrics
        .api_request(&route, &method, resp.status().as_u16());
    resp
}

/// A stopping node refuses new changes; reads, and agents' callbacks and reports, go on.
async fn gate(
    State(c): Api,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let stopping = c.draining.load(std::sync::atomic::Ordering::SeqCst);
    if stopping && req.uri().path().starts_with("/v1/") && req.method() != axum::http::Method::GET {
        return error(&Error::new(
            ErrorCode::NodeUnavailable,
            "the management node is stopping; send the request to another node or retry later",
        ));
    }
    next.run(req).await
}

async fn fallback(uri: axum::http::Uri) -> Response {
    not_found_path(uri.path())
}

/// The node's routes.
pub fn router(cloud: Arc<Cloud>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/auth/login", post(super::auth::login))
        .route("/v1/auth/logout", post(super::auth::logout))
        .route("/v1/auth/whoami", get(super::auth::whoami))
        .route("/v1/auth/tokens", post(super::auth::new_token))
        .route("/metrics", get(metrics))
        .route("/v1/events", get(events).post(events_post))
        .route("/v1/config", get(config_list))
        .route("/v1/config/{name}", get(config_get).put(config_set))
        .route("/v1/{res}", get(list).post(create))
        .route("/v1/{res}/{id}", get(get_one).put(update).delete(delete))
        .route("/v1/{res}/{id}/actions/{action}", post(action))
        .route("/v1/vms/{id}/console", get(vm_console))
        .route(
            "/v1/images/{id}/file",
            axum::routing::put(super::image_files::upload),
        )
        .route(
            "/agent/images/{id}",
            get(super::image_files::serve_to_agent),
        )
        .route("/agent/callback/{task}", post(callback))
        .route("/agent/report", post(report))
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(super::BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(cloud.clone(), gate))
        // Outside the gate and authentication, so refused requests are counted and audited.
        .layer(axum::middleware::from_fn_with_state(
            cloud.clone(),
            super::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            cloud.clone(),
            count_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            cloud.clone(),
            super::audit::audit,
        ))
        .with_state(cloud)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_repeated_keys() {
        let p = query_pairs(&Some("q=state%3DRunning&q=name~%3Dweb%25&limit=5&x".into()));
        assert_eq!(p[0], ("q".into(), "state=Running".into()));
        assert_eq!(p[1], ("q".into(), "name~=web%".into()));
        assert_eq!(param(&p, "limit"), Some("5"));
        assert_eq!(p[3], ("x".into(), "".into()));
        assert_eq!(query_pairs(&Some("a=a+b%2".into()))[0].1, "a b%2");
    }

    #[test]
    fn every_resource_path_names_a_kind() {
        let schema = crate::model::schema();
        for (_, k) in RESOURCE_PATHS {
            assert!(schema.kind(k).is_ok(), "{k}");
        }
    }
}
