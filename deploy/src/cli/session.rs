//! What every CLI command stands on: the saved login, the client, names resolved to uuids,
//! mutations run as jobs and waited for, and exit codes.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use stratus_core::client::StratusClient;
use stratus_core::{Error, ErrorCode};
use uuid::Uuid;

/// Exit codes, distinct per kind of failure.
pub mod exit {
    /// Anything not listed below.
    pub const ERROR: i32 = 1;
    /// A wrong command line, or input the node refused as invalid.
    pub const USAGE: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    /// The resource is not in a state that allows it, or already exists, or a quota is used up.
    pub const CONFLICT: i32 = 4;
    /// The job ran and failed.
    pub const JOB_FAILED: i32 = 5;
    /// The node cannot be reached or is stopping.
    pub const UNREACHABLE: i32 = 6;
    /// Not logged in, or not allowed.
    pub const UNAUTHORIZED: i32 = 7;
}

/// A CLI failure: a coded error from the node, and whether a job had started.
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    pub job: Option<Uuid>,
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        let status = self.error.code.http_status();
        match self.error.code {
            ErrorCode::NodeUnavailable => exit::UNREACHABLE,
            ErrorCode::InvalidArgument => exit::USAGE,
            _ if status == 401 || status == 403 => exit::UNAUTHORIZED,
            _ if status == 404 => exit::NOT_FOUND,
            _ if status == 409 => exit::CONFLICT,
            _ if self.job.is_some() => exit::JOB_FAILED,
            _ => exit::ERROR,
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure { error, job: None }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.job {
            Some(j) => write!(
                f,
                "error: {} (job {j} failed): {}",
                self.error.code.as_str(),
                self.error.message
            ),
            None => write!(
                f,
                "error: {}: {}",
                self.error.code.as_str(),
                self.error.message
            ),
        }
    }
}

/// The saved login: `~/.config/stratus/config.toml` (or `$STRATUS_CLI_CONFIG`), mode 0600.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Login {
    pub url: String,
    pub token: String,
    #[serde(default)]
    pub user: String,
}

impl Login {
    /// The node's URL and token: from `server` and `token` when given, else from the saved
    /// login.
    pub fn resolve(
        server: Option<String>,
        token: Option<String>,
    ) -> anyhow::Result<(String, Option<String>)> {
        let saved = Login::load()?;
        let url = server
            .or_else(|| saved.as_ref().map(|l| l.url.clone()))
            .ok_or_else(|| {
                anyhow::anyhow!("not logged in: run `stratus login URL` or give --server")
            })?;
        let token = token.or_else(|| saved.map(|l| l.token).filter(|t| !t.is_empty()));
        Ok((url, token))
    }

    pub fn path() -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os("STRATUS_CLI_CONFIG") {
            return Ok(PathBuf::from(p));
        }
        let base = match std::env::var_os("XDG_CONFIG_HOME") {
            Some(x) if !x.is_empty() => PathBuf::from(x),
            _ => {
                PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".config")
            }
        };
        Ok(base.join("stratus").join("config.toml"))
    }

    pub fn load() -> anyhow::Result<Option<Login>> {
        let p = Self::path()?;
        if !p.exists() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(Some(toml::from_str(&text).with_context(|| {
            format!("bad login file {}", p.display())
        })?))
    }

    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let p = Self::path()?;
        if let Some(dir) = p.parent() {
            crate::files::private_dir(dir)?;
        }
        crate::files::write_private(&p, &toml::to_string(self)?)?;
        Ok(p)
    }
}

/// How a mutation waits for its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Submit and print the job.
    No,
    /// Wait quietly.
    Quiet,
    /// Wait with a progress bar naming the job's step.
    Progress,
}

/// A connected CLI.
pub struct Session {
    pub client: StratusClient,
    pub wait: Wait,
}

impl Session {
    pub fn new(url: &str, token: Option<&str>, wait: Wait) -> Result<Session, Failure> {
        let mut client = StratusClient::from_url(url)?;
        if let Some(t) = token {
            client = client.with_token(t);
        }
        Ok(Session { client, wait })
    }

    /// A read: the body of a 2xx, or the coded error.
    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        Ok(self.client.get(path).await?)
    }

    /// A request that is not a job (a login, a configuration change).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        Ok(self.client.request(method, path, body).await?)
    }

    /// The uuid of `name_or_uuid` among `kind` (a resource path such as `zones`).
    pub async fn resolve(&self, kind: &str, name_or_uuid: &str) -> Result<Uuid, Failure> {
        Ok(self.client.resolve(kind, name_or_uuid).await?)
    }

    /// A change: submitted as a job and, unless told not to, waited for. Returns the job's
    /// result, or with [`Wait::No`] the job's ids.
    pub async fn mutate(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let job = self.client.submit(method, path, body).await?;
        match self.wait {
            Wait::No => Ok(serde_json::json!({"job_uuid": job.job, "resource_uuid": job.resource})),
            _ => self.wait_job(job.job).await,
        }
    }

    /// Wait for `job` to end; its result, or its error.
    pub async fn wait_job(&self, job: Uuid) -> Result<Value, Failure> {
        let bar = (self.wait == Wait::Progress).then(super::progress::JobBar::new);
        loop {
            let v = self
                .get(&format!("/v1/jobs/{job}?wait=5"))
                .await
                .map_err(|f| Failure {
                    job: Some(job),
                    ..f
                })?;
            if let Some(b) = &bar {
                b.show(&v);
            }
            match v["state"].as_str() {
                Some("Succeeded") => {
                    if let Some(b) = &bar {
                        b.finish("done");
                    }
                    return Ok(v["result"].clone());
                }
                Some("Failed") => {
                    if let Some(b) = &bar {
                        b.finish("failed");
                    }
                    let error = serde_json::from_value(v["error"].clone()).unwrap_or_else(|_| {
                        Error::internal(format!("job {job} failed without a readable error"))
                    });
                    return Err(Failure {
                        error,
                        job: Some(job),
                    });
                }
                _ => {}
            }
        }
    }
}
