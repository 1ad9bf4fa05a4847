//! A client of the REST API (the CLI, the simulation's harness and the scenarios use it).

use crate::error::{Error, ErrorCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use stratus_rt::http::{HttpClient, HttpError};
use uuid::Uuid;

/// The longest wait of one job poll (well inside [`StratusClient::get`]'s minute).
const JOB_POLL: Duration = Duration::from_secs(20);

/// Talks to one management node's API.
#[derive(Clone)]
pub struct StratusClient {
    http: HttpClient,
    addr: SocketAddr,
    /// `Bearer <token>`, sent with every request when set.
    authorization: Option<std::sync::Arc<str>>,
    /// How long mutations wait for their job (`?wait=`).
    pub wait: Duration,
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub job: Uuid,
    pub resource: Option<Uuid>,
}

/// The uuid in field `key` of an API answer.
pub fn uuid_of(v: &Value, key: &str) -> Option<Uuid> {
    v.get(key)
        .and_then(|u| u.as_str())
        .and_then(|u| Uuid::parse_str(u).ok())
}

impl StratusClient {
    pub fn new(addr: SocketAddr) -> Self {
        StratusClient {
            // Room for every request a busy driver has in flight (scenarios run 1,000 at once);
            // idle ones close after `IDLE_TIMEOUT` anyway.
            http: HttpClient::new(1024),
            addr,
            authorization: None,
            wait: Duration::from_secs(3600),
        }
    }

    /// A client for the node at `url` (`http://IP:PORT`).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (addr, path) = stratus_rt::http::parse_url(url.trim_end_matches('/'))
            .map_err(|_| Error::invalid(format!("{url:?} is not http://IP:PORT")))?;
        if path != "/" {
            return Err(Error::invalid(format!(
                "{url:?}: give the node's address without a path"
            )));
        }
        Ok(Self::new(addr))
    }

    /// Send `token` as the bearer of every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.authorization = Some(format!("Bearer {token}").into());
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One request: the answer's status and its body as it came.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), Error> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.call_raw(method, path, bytes, timeout).await
    }

    /// `PUT` a file's bytes (an image's upload): the body of a 2xx, or the coded error.
    pub async fn put_file(
        &self,
        path: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let (s, answer) = self.call_raw("PUT", path, bytes, timeout).await?;
        Self::answer(s, tree(&answer))
    }

    async fn call_raw(
        &self,
        method: &str,
        path: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), Error> {
        let auth = self.authorization.as_deref().map(|a| ("authorization", a));
        let headers: &[(&'static str, &str)] = match &auth {
            Some(h) => std::slice::from_ref(h),
            None => &[],
        };
        let r = self
            .http
            .request(method, self.addr, path, headers, bytes, timeout)
            .await
            .map_err(|e| match e {
                HttpError::Timeout(..) => Error::timeout(e.to_string()),
                other => Error::new(ErrorCode::NodeUnavailable, other.to_string()),
            })?;
        Ok((r.status, r.body))
    }

    /// A request that is not a job (a login, a configuration change, a read): the body of a
    /// 2xx, or the coded error; answered within a minute.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let (s, answer) = self
            .call(method, path, body, Duration::from_secs(60))
            .await?;
        Self::answer(s, tree(&answer))
    }

    /// The uuid of `name_or_uuid` among `resource` (a path such as `zones`): `not_found` when
    /// no row has the name, `invalid_argument` when several do.
    pub async fn resolve(&self, resource: &str, name_or_uuid: &str) -> Result<Uuid, Error> {
        if let Ok(u) = Uuid::parse_str(name_or_uuid) {
            return Ok(u);
        }
        let path = format!(
            "/v1/{resource}?q={}&limit=2",
            encode(&format!("name={name_or_uuid}"))
        );
        let v = self.get(&path).await?;
        let items = v["items"]
            .as_array()
            .ok_or_else(|| Error::internal(format!("no items in the answer: {v}")))?;
        match items.as_slice() {
            [one] => {
                uuid_of(one, "uuid").ok_or_else(|| Error::internal(format!("no uuid in {one}")))
            }
            [] => Err(Error::new(
                ErrorCode::NotFound,
                format!("no {resource} named {name_or_uuid:?}"),
            )),
            _ => Err(Error::invalid(format!(
                "more than one of {resource} is named {name_or_uuid:?}; give its uuid"
            ))),
        }
    }

    /// A plain API answer: the body of a 2xx, or its `{code, message}` as an error.
    fn answer(status: u16, v: Value) -> Result<Value, Error> {
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let e = v.get("error").filter(|e| !e.is_null()).unwrap_or(&v);
        Err(serde_json::from_value(e.clone())
            .unwrap_or_else(|_| Error::internal(format!("HTTP {status}: {v}"))))
    }

    /// A job's answer: its result as a `T`, or its error. The view is read as it is and only
    /// the result becomes a `T`: a caller that wants one field of it (or none) does not build a
    /// tree of the whole answer (a visible part of the driver's samples in `datacenter-30k`,
    /// docs/perf-log.md).
    fn job_outcome<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, Error> {
        // A job's view is an object (the derived reader would take an array too).
        let object = body.trim_ascii_start().first() == Some(&b'{');
        if (200..300).contains(&status) && object {
            if let Ok(view) = serde_json::from_slice::<JobAnswer<'_>>(body) {
                if let Some(e) = view.error {
                    return Err(e);
                }
                let result = view.result.map_or("null", RawValue::get);
                return serde_json::from_str(result)
                    .map_err(|e| Error::internal(format!("unexpected result {result}: {e}")));
            }
        }
        // Not a job's view: read it whole for its error.
        Self::outcome_of(status, tree(body))
    }

    /// [`StratusClient::job_outcome`] of an answer already read as a tree.
    fn outcome_of<T: DeserializeOwned>(status: u16, v: Value) -> Result<T, Error> {
        let mut v = Self::answer(status, v)?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(serde_json::from_value(e.clone())
                .unwrap_or_else(|_| Error::internal(e.to_string())));
        }
        let result = v.get_mut("result").map(Value::take).unwrap_or(Value::Null);
        serde_json::from_value(result)
            .map_err(|e| Error::internal(format!("unexpected result: {e}")))
    }

    fn timeout(&self) -> Duration {
        self.wait + Duration::from_secs(30)
    }

    /// `GET`, answered within a minute.
    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        self.request("GET", path, None).await
    }

    /// Items of `resource` matching `conds` (`field=value` forms).
    pub async fn list(&self, resource: &str, conds: &[&str]) -> Result<Vec<Value>, Error> {
        let mut q = String::from("limit=100000");
        for c in conds {
            q.push_str("&q=");
            q.push_str(&encode(c));
        }
        let v = self.get(&format!("/v1/{resource}?{q}")).await?;
        // An answer without its items is a broken answer, never an empty list.
        v["items"]
            .as_array()
            .cloned()
            .ok_or_else(|| Error::internal(format!("no items in the answer: {v}")))
    }

    pub async fn count(&self, resource: &str, conds: &[&str]) -> Result<u64, Error> {
        let mut q = String::from("limit=0&count=true");
        for c in conds {
            q.push_str("&q=");
            q.push_str(&encode(c));
        }
        let v = self.get(&format!("/v1/{resource}?{q}")).await?;
        v["total"]
            .as_u64()
            .ok_or_else(|| Error::internal(format!("no total in the answer: {v}")))
    }

    pub async fn one(&self, resource: &str, uuid: Uuid) -> Result<Value, Error> {
        self.get(&format!("/v1/{resource}/{uuid}")).await
    }

    async fn mutate<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, Error> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{sep}wait={}", self.wait.as_secs());
        let (s, answer) = self.call(method, &path, body, self.timeout()).await?;
        if s == 202 {
            // Still running after the wait: keep waiting for the job.
            let v = tree(&answer);
            let job =
                uuid_of(&v, "job_uuid").ok_or_else(|| Error::internal(format!("no job in {v}")))?;
            return self.wait_job_as(job).await;
        }
        Self::job_outcome(s, &answer)
    }

    /// Create and wait; returns the created resource.
    pub async fn create(&self, resource: &str, body: Value) -> Result<Value, Error> {
        self.create_as(resource, body).await
    }

    /// [`StratusClient::create`], reading only what `T` takes of the created resource.
    pub async fn create_as<T: DeserializeOwned>(
        &self,
        resource: &str,
        body: Value,
    ) -> Result<T, Error> {
        self.mutate("POST", &format!("/v1/{resource}"), Some(&body))
            .await
    }

    /// Run an action and wait; returns its result.
    pub async fn action(
        &self,
        resource: &str,
        uuid: Uuid,
        action: &str,
        body: Value,
    ) -> Result<Value, Error> {
        self.action_as(resource, uuid, action, body).await
    }

    /// [`StratusClient::action`], reading only what `T` takes of its result
    /// (`serde::de::IgnoredAny` for nothing).
    pub async fn action_as<T: DeserializeOwned>(
        &self,
        resource: &str,
        uuid: Uuid,
        action: &str,
        body: Value,
    ) -> Result<T, Error> {
        self.mutate(
            "POST",
            &format!("/v1/{resource}/{uuid}/actions/{action}"),
            Some(&body),
        )
        .await
    }

    pub async fn update(&self, resource: &str, uuid: Uuid, body: Value) -> Result<Value, Error> {
        self.mutate("PUT", &format!("/v1/{resource}/{uuid}"), Some(&body))
            .await
    }

    pub async fn delete(&self, resource: &str, uuid: Uuid, force: bool) -> Result<Value, Error> {
        self.mutate(
            "DELETE",
            &format!("/v1/{resource}/{uuid}?force={force}"),
            None,
        )
        .await
    }

    /// Submit without waiting.
    pub async fn submit(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Submitted, Error> {
        let (s, answer) = self
            .call(method, path, body, Duration::from_secs(60))
            .await?;
        let v = tree(&answer);
        if s != 202 {
            return Self::answer(s, v)
                .and_then(|v| Err(Error::internal(format!("expected 202, got {s}: {v}"))));
        }
        Ok(Submitted {
            job: uuid_of(&v, "job_uuid")
                .ok_or_else(|| Error::internal(format!("no job in {v}")))?,
            resource: uuid_of(&v, "resource_uuid"),
        })
    }

    /// Wait for a job (polling with long waits) and return its result.
    pub async fn wait_job(&self, job: Uuid) -> Result<Value, Error> {
        self.wait_job_as(job).await
    }

    async fn wait_job_as<T: DeserializeOwned>(&self, job: Uuid) -> Result<T, Error> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            // The node answers when the job ends, or after the wait as it is then.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = left.min(JOB_POLL).as_secs_f64();
            let v = self.get(&format!("/v1/jobs/{job}?wait={wait:.3}")).await?;
            match v["state"].as_str() {
                Some("Succeeded") | Some("Failed") => return Self::outcome_of(200, v),
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::timeout(format!("job {job} did not finish in time")))
                }
                _ => {}
            }
        }
    }

    pub async fn set_config(&self, name: &str, value: &str) -> Result<Value, Error> {
        let body = serde_json::json!({"value": value});
        self.request("PUT", &format!("/v1/config/{name}"), Some(&body))
            .await
    }
}

/// A job's view as the API answers it, with its result left as text.
#[derive(Deserialize)]
struct JobAnswer<'a> {
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Error>,
}

/// An answer's body as a tree (`null` when it is not JSON).
fn tree(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// Percent-encode a query value.
pub fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IgnoredAny;

    #[derive(Deserialize, Debug, PartialEq)]
    struct Created {
        uuid: Uuid,
    }

    fn outcome<T: DeserializeOwned>(status: u16, body: &Value) -> Result<T, Error> {
        StratusClient::job_outcome(status, body.to_string().as_bytes())
    }

    #[test]
    fn a_job_answer_gives_what_the_caller_reads_of_its_result() {
        let u = Uuid::from_u128(3);
        let done = serde_json::json!({
            "job_uuid": Uuid::from_u128(1), "operation": "vm.create", "state": "Succeeded",
            "progress": 100, "result": {"uuid": u, "name": "vm-1", "tags": ["a"]}
        });
        assert_eq!(outcome::<Created>(200, &done), Ok(Created { uuid: u }));
        assert!(outcome::<IgnoredAny>(200, &done).is_ok());
        assert_eq!(outcome::<Value>(200, &done).unwrap(), done["result"]);
        // No result: null, which a `Value` takes and a struct does not.
        let bare = serde_json::json!({"state": "Succeeded"});
        assert_eq!(outcome::<Value>(200, &bare), Ok(Value::Null));
        let e = outcome::<Created>(200, &bare).unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
    }

    #[test]
    fn a_failed_job_or_a_refusal_is_its_coded_error() {
        let failed = serde_json::json!({
            "state": "Failed", "result": null,
            "error": {"code": "invalid_state", "message": "vm is Stopped"}
        });
        let e = outcome::<IgnoredAny>(409, &failed).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::InvalidState, "vm is Stopped")
        );
        let e = outcome::<IgnoredAny>(200, &failed).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        let refused = serde_json::json!({"code": "not_found", "message": "vm x does not exist"});
        let e = outcome::<Created>(404, &refused).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        // Not a view: the old reading (an array has no result).
        let list = serde_json::json!([{"uuid": Uuid::from_u128(3)}]);
        assert_eq!(outcome::<Value>(200, &list), Ok(Value::Null));
        assert_eq!(
            StratusClient::job_outcome::<Value>(200, b"not json"),
            Ok(Value::Null)
        );
        // An error the client cannot read is still an error, not a success.
        let odd = serde_json::json!({"state": "Failed", "error": "boom"});
        assert!(outcome::<IgnoredAny>(200, &odd).is_err());
    }
}
