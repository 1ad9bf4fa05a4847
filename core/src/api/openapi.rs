//! The OpenAPI 3.1 document of the `/v1` API, built from what the API itself is made of: the
//! kinds' metadata (every resource's fields), the request types' JSON schemas (derived with
//! `schemars` from the structs the API parses), the resource paths, the query operators and
//! the error codes. `stratus openapi` prints it; `openapi.json` at the repository's root is
//! its checked-in copy, and a test fails when the two differ.
//!
//! What the router accepts and the tables here ([`CREATES`], [`UPDATES`], [`ACTIONS`]) are
//! checked against each other by `core/tests/api_openapi.rs`, which sends every documented
//! operation to a node.

use super::auth::{LoginBody, TokenBody};
use super::routes::{ActionBody, ConfigSet, NewUser, RESOURCE_PATHS, UNDELETABLE};
use crate::error::ErrorCode;
use crate::services::host::AddHost;
use crate::services::identity::{CreateAccount, SetQuotas};
use crate::services::network::{AddIpRange, CreateL2Network, CreateL3Network};
use crate::services::offering::{CreateDiskOffering, CreateInstanceOffering};
use crate::services::storage::{AddImage, CreateBackupStorage, CreatePrimaryStorage};
use crate::services::vm::{CreateDataVolume, CreateVm};
use crate::services::webhook::CreateWebhook;
use crate::services::zone::{CreateCluster, CreateZone, UpdateCluster, UpdateZone};
use schemars::{generate::SchemaSettings, JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};
use stratus_store::{FieldType, KindMeta};

type BodySchema = fn(&mut SchemaGenerator) -> schemars::Schema;

fn body<T: JsonSchema>(g: &mut SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// `POST /v1/<path>` and its body.
pub const CREATES: &[(&str, BodySchema)] = &[
    ("zones", body::<CreateZone>),
    ("clusters", body::<CreateCluster>),
    ("hosts", body::<AddHost>),
    ("primary-storages", body::<CreatePrimaryStorage>),
    ("backup-storages", body::<CreateBackupStorage>),
    ("images", body::<AddImage>),
    ("instance-offerings", body::<CreateInstanceOffering>),
    ("disk-offerings", body::<CreateDiskOffering>),
    ("l2-networks", body::<CreateL2Network>),
    ("l3-networks", body::<CreateL3Network>),
    ("ip-ranges", body::<AddIpRange>),
    ("vms", body::<CreateVm>),
    ("volumes", body::<CreateDataVolume>),
    ("accounts", body::<CreateAccount>),
    ("users", body::<NewUser>),
    ("webhooks", body::<CreateWebhook>),
];

/// `PUT /v1/<path>/<uuid>` and its body (the uuid comes from the path).
pub const UPDATES: &[(&str, BodySchema)] = &[
    ("zones", body::<UpdateZone>),
    ("clusters", body::<UpdateCluster>),
    ("accounts", body::<SetQuotas>),
];

/// `POST /v1/<path>/<uuid>/actions/<action>`: what it does and the body fields it reads.
pub const ACTIONS: &[(&str, &str, &str, &[&str])] = &[
    ("vms", "start", "Start a stopped VM", &[]),
    ("vms", "stop", "Stop a VM (force: power off)", &["force"]),
    ("vms", "reboot", "Reboot a running VM", &[]),
    (
        "vms",
        "destroy",
        "Destroy a VM (it can be recovered until expunged)",
        &["force"],
    ),
    ("vms", "recover", "Recover a destroyed VM", &[]),
    (
        "vms",
        "expunge",
        "Remove a destroyed VM for good",
        &["force"],
    ),
    (
        "vms",
        "migrate",
        "Live-migrate a VM (to host_uuid, else where the allocator chooses)",
        &["host_uuid"],
    ),
    ("hosts", "reconnect", "Connect to a host's agent again", &[]),
    (
        "hosts",
        "enable",
        "Let the allocator place VMs on a host",
        &[],
    ),
    ("hosts", "disable", "Keep new VMs off a host", &[]),
    (
        "hosts",
        "maintenance",
        "Migrate a host's VMs away and keep new ones off",
        &[],
    ),
    (
        "volumes",
        "attach",
        "Attach a data volume to vm_uuid",
        &["vm_uuid"],
    ),
    ("volumes", "detach", "Detach a data volume from its VM", &[]),
    (
        "l2-networks",
        "attach-cluster",
        "Attach an L2 network to cluster_uuid",
        &["cluster_uuid"],
    ),
    (
        "primary-storages",
        "attach-cluster",
        "Attach a primary storage to cluster_uuid",
        &["cluster_uuid"],
    ),
    (
        "backup-storages",
        "attach-zone",
        "Attach a backup storage to zone_uuid",
        &["zone_uuid"],
    ),
    ("instance-offerings", "enable", "Offer it again", &[]),
    ("instance-offerings", "disable", "Stop offering it", &[]),
    ("disk-offerings", "enable", "Offer it again", &[]),
    ("disk-offerings", "disable", "Stop offering it", &[]),
    ("zones", "enable", "Enable a zone", &[]),
    ("zones", "disable", "Disable a zone", &[]),
    ("clusters", "enable", "Enable a cluster", &[]),
    ("clusters", "disable", "Disable a cluster", &[]),
];

/// The condition operators of `?q=`, longest first as the parser tries them.
const OPERATORS: &str = "= != > >= < <= ?= (in, comma-separated) !?= (not in) ~= (SQL LIKE) \
                         !~= (not LIKE); `field=null` and `field!=null` test for null; a \
                         field may be a relation path (`nics.ip=10.0.0.5`)";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// A kind's row as the API shows it (secret fields never appear).
fn kind_schema(k: &KindMeta) -> Value {
    let mut props = Map::new();
    props.insert("uuid".into(), json!({"type": "string", "format": "uuid"}));
    props.insert("version".into(), json!({"type": "integer", "minimum": 0}));
    props.insert(
        "created_ms".into(),
        json!({"type": "integer", "description": "Unix time, milliseconds"}),
    );
    props.insert(
        "updated_ms".into(),
        json!({"type": "integer", "description": "Unix time, milliseconds"}),
    );
    let mut required: Vec<&str> = vec!["uuid", "version", "created_ms", "updated_ms"];
    for f in k.fields.iter().filter(|f| !f.secret) {
        let mut t = match f.ty {
            FieldType::Uuid => json!({"type": "string", "format": "uuid"}),
            FieldType::Int => json!({"type": "integer"}),
            FieldType::Bool => json!({"type": "boolean"}),
            FieldType::Text => json!({"type": "string"}),
            FieldType::Time => json!({"type": "integer", "description": "Unix time, milliseconds"}),
            FieldType::Float => json!({"type": "number"}),
            FieldType::Json => json!({}),
        };
        if f.nullable && f.ty != FieldType::Json {
            let ty = t["type"].clone();
            t["type"] = json!([ty, "null"]);
        }
        props.insert(f.name.into(), t);
        required.push(f.name);
    }
    json!({
        "type": "object",
        "description": format!("A row of kind `{}`.", k.name),
        "properties": props,
        "required": required,
    })
}

/// The error answers every operation shares, by status.
const ERRORS: &[(u16, &str)] = &[
    (400, "Bad input (invalid_argument; too_large for a body over 1 MiB)"),
    (401, "No valid bearer token (unauthorized)"),
    (403, "An admin-only kind or operation (forbidden)"),
    (404, "No such resource, or another account's (not_found)"),
    (409, "A conflict with the resource's state (invalid_state, in_use, conflict, quota_exceeded, capacity_exhausted, ...)"),
];

fn error_responses(codes: &[u16]) -> Map<String, Value> {
    let mut m = Map::new();
    for c in codes {
        m.insert(
            c.to_string(),
            json!({"$ref": format!("#/components/responses/Error{c}")}),
        );
    }
    m
}

fn param(name: &str, at: &str, required: bool, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": at, "required": required, "schema": schema, "description": description})
}

fn wait_param() -> Value {
    param(
        "wait",
        "query",
        false,
        json!({"type": "number", "minimum": 0, "maximum": 86400}),
        "Seconds to wait for the job to end; the answer is then the job (200 when it succeeded, \
         its error's status when it failed, 202 while it still runs)",
    )
}

fn id_param() -> Value {
    param(
        "id",
        "path",
        true,
        json!({"type": "string", "format": "uuid"}),
        "The resource's uuid",
    )
}

/// The answers of an operation that runs as a job.
fn job_responses() -> Map<String, Value> {
    let mut r = error_responses(&[400, 401, 403, 404, 409]);
    r.insert(
        "202".into(),
        json!({"description": "Accepted: the job runs", "content": {"application/json": {"schema": schema_ref("JobAccepted")}}}),
    );
    r.insert(
        "200".into(),
        json!({"description": "With `wait`: the job succeeded", "content": {"application/json": {"schema": schema_ref("Job")}}}),
    );
    r
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The document.
pub fn document() -> Value {
    let schema = crate::model::schema();
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas/".into())
        .into_generator();
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let kind_name = |path: &str| -> String {
        let kind = super::kind_of_path(path).expect("a resource path");
        kind.split('_').map(capitalize).collect::<String>()
    };

    for (path, kind) in RESOURCE_PATHS {
        let k = schema.kind(kind).expect("every resource path names a kind");
        let name = kind_name(path);
        schemas.insert(name.clone(), kind_schema(k));
        let mut list_params = vec![
            param("q", "query", false, json!({"type": "array", "items": {"type": "string"}}),
                  &format!("A condition `field<op>value`, repeatable (all must hold). Operators: {OPERATORS}")),
            param("sort", "query", false, json!({"type": "string"}), "A field to sort by; `-field` descending"),
            param("limit", "query", false, json!({"type": "integer", "minimum": 0, "maximum": 100000, "default": 1000}), "At most this many rows"),
            param("offset", "query", false, json!({"type": "integer", "minimum": 0}), "Skip this many rows"),
            param("count", "query", false, json!({"type": "boolean"}), "Also answer `total`, the number of all matching rows"),
        ];
        if let Value::Object(p) = &mut list_params[0] {
            p.insert("style".into(), json!("form"));
            p.insert("explode".into(), json!(true));
        }
        let mut list_responses = error_responses(&[400, 401, 403]);
        list_responses.insert(
            "200".into(),
            ok_json(
                &format!("The {path} the caller may see"),
                json!({"type": "object", "properties": {
                    "items": {"type": "array", "items": schema_ref(&name)},
                    "total": {"type": "integer"}}, "required": ["items"]}),
            ),
        );
        let mut collection = Map::new();
        collection.insert(
            "get".into(),
            json!({"operationId": format!("list-{path}"), "summary": format!("List {path}"),
                   "tags": [path], "parameters": list_params, "responses": list_responses}),
        );
        if let Some((_, b)) = CREATES.iter().find(|(p, _)| p == path) {
            let s = b(&mut g);
            collection.insert(
                "post".into(),
                json!({"operationId": format!("create-{path}"), "summary": format!("Create one of {path} (a job)"),
                       "tags": [path], "parameters": [wait_param()],
                       "requestBody": {"required": true, "content": {"application/json": {"schema": s}}},
                       "responses": job_responses()}),
            );
        }
        let collection_path = format!("/v1/{path}");
        if *path == "events" {
            // Also the stream.
            let get = collection.get_mut("get").expect("made above");
            let params = get["parameters"].as_array_mut().expect("made above");
            params.push(param("filter", "query", false, json!({"type": "string"}),
                "With `Accept: text/event-stream`: comma-separated globs over the topic (`vm.*,job.finished`)"));
            params.push(param(
                "after",
                "query",
                false,
                json!({"type": "integer", "minimum": 0}),
                "With `Accept: text/event-stream`: start after this event (default: from now)",
            ));
            params.push(param("Last-Event-ID", "header", false, json!({"type": "integer", "minimum": 0}),
                "With `Accept: text/event-stream`: resume after this event (as an SSE client reconnects)"));
            get["description"] = json!(
                "With `Accept: text/event-stream`, the event log as Server-Sent Events: `id` is the \
                 event's `seq` (1, 2, 3, ... without gaps), `event` its topic \
                 (`<kind>.created|updated|state_changed|deleted`, `job.started|finished`), \
                 `data` the event as JSON; a non-admin gets its own account's events. \
                 Otherwise the list of stored events.");
            get["responses"]["200"]["content"]["text/event-stream"] =
                json!({"schema": {"type": "string"}});
        }
        paths.insert(collection_path, Value::Object(collection));

        let mut one = Map::new();
        let mut get_responses = error_responses(&[400, 401, 403, 404]);
        get_responses.insert("200".into(), ok_json("The resource", schema_ref(&name)));
        one.insert(
            "get".into(),
            json!({"operationId": format!("get-{path}"), "summary": format!("Read one of {path}"),
                   "tags": [path], "parameters": [id_param()], "responses": get_responses}),
        );
        if let Some((_, b)) = UPDATES.iter().find(|(p, _)| p == path) {
            let s = b(&mut g);
            one.insert(
                "put".into(),
                json!({"operationId": format!("update-{path}"), "summary": format!("Update one of {path} (a job; the uuid is the path's)"),
                       "tags": [path], "parameters": [id_param(), wait_param()],
                       "requestBody": {"required": true, "content": {"application/json": {"schema": s}}},
                       "responses": job_responses()}),
            );
        }
        if !UNDELETABLE.contains(path) {
            one.insert(
                "delete".into(),
                json!({"operationId": format!("delete-{path}"), "summary": format!("Delete one of {path} and what depends on it (a job)"),
                       "tags": [path],
                       "parameters": [id_param(), wait_param(),
                           param("force", "query", false, json!({"type": "boolean"}), "Delete even when in use")],
                       "responses": job_responses()}),
            );
        }
        paths.insert(format!("/v1/{path}/{{id}}"), Value::Object(one));
    }

    let action_body = g.subschema_for::<ActionBody>();
    for (path, action, summary, reads) in ACTIONS {
        let mut desc = summary.to_string();
        if !reads.is_empty() {
            desc.push_str(&format!(". Reads from the body: {}", reads.join(", ")));
        }
        paths.insert(
            format!("/v1/{path}/{{id}}/actions/{action}"),
            json!({"post": {"operationId": format!("{action}-{path}"), "summary": desc, "tags": [path],
                "parameters": [id_param(), wait_param()],
                "requestBody": {"required": false, "content": {"application/json": {"schema": action_body}}},
                "responses": job_responses()}}),
        );
    }

    let login = g.subschema_for::<LoginBody>();
    let token_body = g.subschema_for::<TokenBody>();
    let config_set = g.subschema_for::<ConfigSet>();
    let config_view = g.subschema_for::<crate::config::ConfigView>().to_value();
    let issued = json!({"type": "object", "properties": {
        "token": {"type": "string", "description": "The bearer token, shown once"},
        "expires_ms": {"type": "integer"}, "user_uuid": {"type": "string", "format": "uuid"},
        "account_uuid": {"type": "string", "format": "uuid"}}, "required": ["token"]});
    let mut login_responses = error_responses(&[400, 401]);
    login_responses.insert("200".into(), ok_json("A token", issued.clone()));
    paths.insert("/v1/auth/login".into(), json!({"post": {"operationId": "login", "summary": "A bearer token for a user and password",
        "tags": ["auth"], "security": [], "requestBody": {"required": true, "content": {"application/json": {"schema": login}}},
        "responses": login_responses}}));
    let mut tok_responses = error_responses(&[400, 401]);
    tok_responses.insert(
        "200".into(),
        ok_json("Another token for the caller", issued),
    );
    paths.insert("/v1/auth/tokens".into(), json!({"post": {"operationId": "new-token", "summary": "Another token for the caller (for a program)",
        "tags": ["auth"], "requestBody": {"required": false, "content": {"application/json": {"schema": token_body}}},
        "responses": tok_responses}}));
    let mut out_responses = error_responses(&[401]);
    out_responses.insert(
        "200".into(),
        ok_json("The token ended", json!({"type": "object"})),
    );
    paths.insert(
        "/v1/auth/logout".into(),
        json!({"post": {"operationId": "logout", "summary": "End the request's token",
        "tags": ["auth"], "responses": out_responses}}),
    );
    let mut who_responses = error_responses(&[401]);
    who_responses.insert("200".into(), ok_json("The caller", json!({"type": "object", "properties": {
        "user_uuid": {"type": "string", "format": "uuid"}, "account_uuid": {"type": "string", "format": "uuid"},
        "admin": {"type": "boolean"}}})));
    paths.insert(
        "/v1/auth/whoami".into(),
        json!({"get": {"operationId": "whoami", "summary": "Who the token is",
        "tags": ["auth"], "responses": who_responses}}),
    );
    paths.insert("/v1/health".into(), json!({"get": {"operationId": "health", "summary": "Whether the node is up",
        "tags": ["node"], "security": [], "responses": {"200": ok_json("Up", json!({"type": "object", "properties": {
            "node": {"type": "string", "format": "uuid"}, "boot": {"type": "string", "format": "uuid"}, "ok": {"type": "boolean"}}}))}}}));
    let mut cfg_responses = error_responses(&[401, 403]);
    cfg_responses.insert(
        "200".into(),
        ok_json(
            "Every entry",
            json!({"type": "array", "items": config_view.clone()}),
        ),
    );
    paths.insert(
        "/v1/config".into(),
        json!({"get": {"operationId": "list-config", "summary": "Global configuration (admin)",
        "tags": ["config"], "responses": cfg_responses}}),
    );
    let name_param = param(
        "name",
        "path",
        true,
        json!({"type": "string"}),
        "The entry's name",
    );
    let mut one_cfg = error_responses(&[400, 401, 403, 404]);
    one_cfg.insert("200".into(), ok_json("The entry", config_view));
    paths.insert("/v1/config/{name}".into(), json!({
        "get": {"operationId": "get-config", "summary": "One configuration entry (admin)", "tags": ["config"],
                "parameters": [name_param], "responses": one_cfg},
        "put": {"operationId": "set-config", "summary": "Set one configuration entry (admin)", "tags": ["config"],
                "parameters": [name_param], "requestBody": {"required": true, "content": {"application/json": {"schema": config_set}}},
                "responses": one_cfg}}));

    let mut console = error_responses(&[400, 401, 403, 404, 409]);
    console.insert("200".into(), ok_json("The end of the console", json!({"type": "object", "properties": {
        "vm_uuid": {"type": "string", "format": "uuid"},
        "text": {"type": "string", "description": "The console's last bytes (non-UTF-8 bytes replaced)"},
        "total_bytes": {"type": "integer", "minimum": 0, "description": "All the console has written"}},
        "required": ["vm_uuid", "text", "total_bytes"]})));
    paths.insert("/v1/vms/{id}/console".into(), json!({"get": {"operationId": "vm-console",
        "summary": "The end of a VM's serial console, from its host", "tags": ["vms"],
        "parameters": [
            id_param(),
            param("bytes", "query", false, json!({"type": "integer", "minimum": 1, "maximum": crate::services::vm::CONSOLE_MAX_BYTES, "default": 65536}), "At most this many bytes, the last ones")],
        "responses": console}}));
    let mut upload = error_responses(&[400, 401, 403, 404, 409]);
    upload.insert(
        "200".into(),
        ok_json(
            "The image, its URL now the node's and its checksum the bytes'",
            json!({"type": "object"}),
        ),
    );
    paths.insert("/v1/images/{id}/file".into(), json!({"put": {"operationId": "upload-image",
        "summary": "Send an image's bytes: kept in its (file://) backup storage, served to agents by the node", "tags": ["images"],
        "parameters": [id_param()],
        "requestBody": {"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": upload}}));
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();

    schemas.insert("Error".into(), json!({"type": "object", "properties": {
        "code": {"type": "string", "enum": codes}, "message": {"type": "string"}}, "required": ["code", "message"]}));
    schemas.insert("JobAccepted".into(), json!({"type": "object", "properties": {
        "job_uuid": {"type": "string", "format": "uuid"},
        "resource_uuid": {"type": ["string", "null"], "format": "uuid"}}, "required": ["job_uuid"]}));
    schemas.insert("Job".into(), json!({"type": "object", "description": "A job as `GET /v1/jobs/{id}` and `?wait` show it", "properties": {
        "job_uuid": {"type": "string", "format": "uuid"},
        "resource_uuid": {"type": ["string", "null"], "format": "uuid"},
        "operation": {"type": "string"},
        "state": {"type": "string", "enum": ["Running", "Succeeded", "Failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "step": {"type": "string", "description": "While it runs: the step of its workflow"},
        "result": {"description": "What the operation answered (the resource, for a create)"},
        "error": schema_ref("Error")}, "required": ["job_uuid", "operation", "state", "progress"]}));
    for (name, s) in g.take_definitions(true) {
        schemas.insert(name, s);
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Stratus API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The management API of a Stratus cloud. Every change is a job; every error is `{code, message}`.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": ERRORS.iter().map(|(c, what)| (
                format!("Error{c}"),
                json!({"description": what, "content": {"application/json": {"schema": schema_ref("Error")}}}),
            )).collect::<Map<String, Value>>(),
            "schemas": schemas,
        },
    })
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The document as `stratus openapi` prints it and `openapi.json` holds it.
pub fn document_text() -> String {
    let mut s = serde_json::to_string_pretty(&document()).expect("JSON of JSON values");
    s.push('\n');
    s
}
