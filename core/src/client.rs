//! A client of the REST API (the CLI, the simulation's harness and the scenarios use it).

use crate::error::{Error, ErrorCode};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use stratus_kvm_agent::http::{HttpClient, HttpError};
use uuid::Uuid;

/// Talks to one management node's API.
#[derive(Clone)]
pub struct StratusClient {
    http: HttpClient,
    addr: SocketAddr,
    /// How long mutations wait for their job (`?wait=`).
    pub wait: Duration,
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub job: Uuid,
    pub resource: Option<Uuid>,
}

fn uuid_of(v: &Value, key: &str) -> Option<Uuid> {
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
            wait: Duration::from_secs(3600),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), Error> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let r = self
            .http
            .request(method, self.addr, path, &[], bytes, timeout)
            .await
            .map_err(|e| match e {
                HttpError::Timeout(..) => Error::timeout(e.to_string()),
                other => Error::new(ErrorCode::NodeUnavailable, other.to_string()),
            })?;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        Ok((r.status, v))
    }

    /// A plain API answer: the body of a 2xx, or its `{code, message}` as an error.
    fn body(status: u16, v: Value) -> Result<Value, Error> {
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let e = v.get("error").filter(|e| !e.is_null()).unwrap_or(&v);
        Err(serde_json::from_value(e.clone())
            .unwrap_or_else(|_| Error::internal(format!("HTTP {status}: {v}"))))
    }

    /// A job's answer: its result, or its error.
    fn job_outcome(status: u16, v: Value) -> Result<Value, Error> {
        let mut v = Self::body(status, v)?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(serde_json::from_value(e.clone())
                .unwrap_or_else(|_| Error::internal(e.to_string())));
        }
        Ok(v.get_mut("result").map(Value::take).unwrap_or(Value::Null))
    }

    fn timeout(&self) -> Duration {
        self.wait + Duration::from_secs(30)
    }

    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        let (s, v) = self
            .call("GET", path, None, Duration::from_secs(60))
            .await?;
        Self::body(s, v)
    }

    /// Items of `resource` matching `conds` (`field=value` forms).
    pub async fn list(&self, resource: &str, conds: &[&str]) -> Result<Vec<Value>, Error> {
        let mut q = String::from("limit=100000");
        for c in conds {
            q.push_str("&q=");
            q.push_str(&encode(c));
        }
        let v = self.get(&format!("/v1/{resource}?{q}")).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    pub async fn count(&self, resource: &str, conds: &[&str]) -> Result<u64, Error> {
        let mut q = String::from("limit=0&count=true");
        for c in conds {
            q.push_str("&q=");
            q.push_str(&encode(c));
        }
        let v = self.get(&format!("/v1/{resource}?{q}")).await?;
        Ok(v["total"].as_u64().unwrap_or(0))
    }

    pub async fn one(&self, resource: &str, uuid: Uuid) -> Result<Value, Error> {
        self.get(&format!("/v1/{resource}/{uuid}")).await
    }

    async fn mutate(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Error> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{sep}wait={}", self.wait.as_secs());
        let (s, v) = self.call(method, &path, body, self.timeout()).await?;
        if s == 202 {
            // Still running after the wait: keep waiting for the job.
            let job =
                uuid_of(&v, "job_uuid").ok_or_else(|| Error::internal(format!("no job in {v}")))?;
            return self.wait_job(job).await;
        }
        Self::job_outcome(s, v)
    }

    /// Create and wait; returns the created resource.
    pub async fn create(&self, resource: &str, body: Value) -> Result<Value, Error> {
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
        let (s, v) = self
            .call(method, path, body, Duration::from_secs(60))
            .await?;
        if s != 202 {
            return Self::body(s, v)
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
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let v = self.get(&format!("/v1/jobs/{job}")).await?;
            match v["state"].as_str() {
                Some("Succeeded") | Some("Failed") => return Self::job_outcome(200, v),
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::timeout(format!("job {job} did not finish in time")))
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    pub async fn set_config(&self, name: &str, value: &str) -> Result<Value, Error> {
        let (s, v) = self
            .call(
                "PUT",
                &format!("/v1/config/{name}"),
                Some(&serde_json::json!({"value": value})),
                Duration::from_secs(60),
            )
            .await?;
        Self::body(s, v)
    }
}

/// Percent-encode a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
