//! `stratus serve`: one management node on a real disk — the same `ManagementNode` the
//! simulation starts, over SQLite in the data directory or over PostgreSQL.
//!
//! Settings come from flags, else their environment variables, else the `--config` file (TOML,
//! the same names with `_` for `-`, and a `[settings]` table of global configuration applied at
//! start), else the defaults. On SIGTERM or SIGINT the node takes no new work, lets running jobs
//! end for up to `--shutdown-timeout` seconds and exits; what still ran stays in the journal and
//! the next start finishes or rolls it back. A second signal exits at once.

use crate::files;
use crate::logging::{self, LogFormat};
use anyhow::Context;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use stratus_core::auth::Auth;
use stratus_core::extension::Extensions;
use stratus_core::ids::Ids;
use stratus_core::node::{ManagementNode, NodeConfig};
use stratus_core::services::audit::StoreAudit;
use stratus_store::sql::SqlStore;
use stratus_store::{Db, Store};
use uuid::Uuid;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Where the API listens [default: 127.0.0.1:8080].
    #[arg(long, env = "STRATUS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the node keeps its files: the SQLite database, its id, the admin's first password
    /// [default: ./stratus-data].
    #[arg(long, env = "STRATUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `postgres://USER:PASSWORD@HOST/DB`, or `sqlite://PATH` [default: SQLite in the data
    /// directory].
    #[arg(long, env = "STRATUS_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// The URL agents send callbacks and reports to [default: http://LISTEN].
    #[arg(long, env = "STRATUS_ADVERTISE")]
    pub advertise: Option<String>,
    /// A TOML file with any of these settings and a `[settings]` table of global configuration.
    #[arg(long, env = "STRATUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log lines as text or JSON [default: text].
    #[arg(long, env = "STRATUS_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds running jobs get to end after SIGTERM or SIGINT [default: 30].
    #[arg(long, env = "STRATUS_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// Days the audit log keeps a record [default: 90].
    #[arg(long, env = "STRATUS_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u64>,
    /// The first start's `admin` password, from this file [default: a random one, written to
    /// DATA_DIR/admin-password (mode 0600)].
    #[arg(long, env = "STRATUS_ADMIN_PASSWORD_FILE")]
    pub admin_password_file: Option<PathBuf>,
}

/// What a `--config` file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database: Option<String>,
    advertise: Option<String>,
    log_format: Option<LogFormat>,
    shutdown_timeout: Option<u64>,
    audit_retention_days: Option<u64>,
    admin_password_file: Option<PathBuf>,
    #[serde(default)]
    settings: BTreeMap<String, String>,
}

/// The settings a node runs with, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database: String,
    pub advertise: String,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    pub admin_password_file: Option<PathBuf>,
    pub audit_retention: Duration,
    /// Global configuration to set at start (name → value).
    pub config: BTreeMap<String, String>,
}

impl Settings {
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                toml::from_str::<ConfigFile>(&text)
                    .with_context(|| format!("bad configuration file {}", p.display()))?
            }
            None => ConfigFile::default(),
        };
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("stratus-data"));
        let database = match args.database.or(file.database) {
            Some(url) => url,
            None => format!("sqlite://{}", data_dir.join("stratus.db").display()),
        };
        let advertise = match args.advertise.or(file.advertise) {
            Some(a) => a.trim_end_matches('/').to_string(),
            None if listen.ip().is_unspecified() => anyhow::bail!(
                "--advertise is needed when listening on {listen}: agents must be told an \
                 address they can reach"
            ),
            None => format!("http://{listen}"),
        };
        stratus_rt::http::parse_url(&advertise)
            .map_err(|_| anyhow::anyhow!("--advertise {advertise:?} is not http://IP:PORT"))?;
        Ok(Settings {
            listen,
            data_dir,
            database,
            advertise,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            shutdown_timeout: Duration::from_secs(
                args.shutdown_timeout
                    .or(file.shutdown_timeout)
                    .unwrap_or(30),
            ),
            admin_password_file: args.admin_password_file.or(file.admin_password_file),
            audit_retention: Duration::from_secs(
                86_400
                    * args
                        .audit_retention_days
                        .or(file.audit_retention_days)
                        .unwrap_or(90),
            ),
            config: file.settings,
        })
    }
}

/// A database URL with its password hidden, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// This node's id, kept in the data directory so a restart is the same node.
fn node_id(data_dir: &Path) -> anyhow::Result<Uuid> {
    let text = files::read_or_create(&data_dir.join("node-id"), || {
        uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string()
    })?;
    Uuid::parse_str(&text).context("the node-id file does not hold a uuid")
}

/// On the first start, the `admin` user: its password from `--admin-password-file`, or a
/// random one written to `DATA_DIR/admin-password` (0600) before the user is made (so a crash
/// between the two loses nothing), and never logged. Done before the API listens, so a login
/// as soon as it answers finds the user.
async fn first_admin(store: &Arc<dyn Store>, s: &Settings) -> anyhow::Result<()> {
    let auth = &Auth::new(Db::new(store.clone()), Arc::new(Ids::new()));
    let fail = |e: stratus_core::Error| anyhow::anyhow!("cannot create the admin user: {e}");
    if auth
        .has_user(stratus_core::auth::ADMIN)
        .await
        .map_err(fail)?
    {
        return Ok(());
    }
    let (password, from) = match &s.admin_password_file {
        Some(p) => (files::read_line(p)?, p.clone()),
        None => {
            let written = s.data_dir.join("admin-password");
            let p = files::read_or_create(&written, || files::random_secret()[..24].to_string())?;
            (p, written)
        }
    };
    if auth.bootstrap_admin(Some(&password)).await.map_err(fail)? {
        tracing::info!(password_file = %from.display(), "created user admin");
    }
    Ok(())
}

/// Run a node until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let s = Settings::resolve(args)?;
    logging::init(s.log_format);
    files::private_dir(&s.data_dir)?;
    let node_id = node_id(&s.data_dir)?;
    let sql = SqlStore::open(&s.database, stratus_core::model::schema())
        .await
        .with_context(|| format!("cannot open the database {}", redact_url(&s.database)))?;
    let sql = Arc::new(sql);
    let store: Arc<dyn Store> = sql.clone();
    let mut cfg = NodeConfig::new(node_id, s.listen);
    cfg.advertise = Some(s.advertise.clone());
    // Every change asked of the API goes to the audit log in the store.
    let audit = StoreAudit::new(Db::new(store.clone()), s.audit_retention);
    cfg.extensions = Extensions::builder().audit(audit).build();
    first_admin(&store, &s).await?;
    let node = ManagementNode::start(store, cfg)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the management node: {e}"))?;
    for (name, value) in &s.config {
        node.cloud
            .engine
            .config
            .set(name, value)
            .await
            .map_err(|e| anyhow::anyhow!("setting {name} from the configuration file: {e}"))?;
    }
    tracing::info!(
        listen = %node.addr,
        advertise = %s.advertise,
        database = %redact_url(&s.database),
        data_dir = %s.data_dir.display(),
        recovered = ?node.recovery,
        "stratus serve: ready"
    );
    let signal = crate::signal::stop().await?;
    tracing::info!(
        signal,
        grace_s = s.shutdown_timeout.as_secs(),
        "stopping: no new work; waiting for running jobs"
    );
    let left = tokio::select! {
        left = node.drain(s.shutdown_timeout) => left,
        _ = crate::signal::stop() => {
            tracing::warn!("second signal: stopping now; the journal keeps what ran");
            node.cloud.engine.jobs.in_flight()
        }
    };
    if left > 0 {
        tracing::warn!(
            jobs = left,
            "jobs still running are left in the journal for the next start"
        );
    }
    sql.close().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("stratus-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("serve.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/srv/s\"\nshutdown_timeout = 5\n\
             [settings]\n\"host.ping.interval\" = \"30s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(args).unwrap();
        assert_eq!(s.listen.port(), 9100);
        assert_eq!(s.data_dir, PathBuf::from("/srv/s"));
        assert_eq!(s.database, "sqlite:///srv/s/stratus.db");
        assert_eq!(s.advertise, "http://127.0.0.1:9100");
        assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(s.config["host.ping.interval"], "30s");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nlisten_port = 1\n").unwrap();
        let e = Settings::resolve(ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("listen_port"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listening_everywhere_needs_an_advertised_url() {
        let args = ServeArgs {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..ServeArgs::default()
        };
        assert!(Settings::resolve(args.clone()).is_err());
        let s = Settings::resolve(ServeArgs {
            advertise: Some("http://10.0.0.5:8080/".into()),
            ..args
        })
        .unwrap();
        assert_eq!(s.advertise, "http://10.0.0.5:8080");
    }

    #[test]
    fn a_database_password_never_reaches_the_log() {
        assert_eq!(
            redact_url("postgres://stratus:s3cret@127.0.0.1:5432/stratus"),
            "postgres://stratus:***@127.0.0.1:5432/stratus"
        );
        assert_eq!(redact_url("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }
}
