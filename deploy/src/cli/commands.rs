//! Every command of the CLI and what it sends.

use super::output::{self, Format};
use super::session::{Failure, Login, Session, Wait};
use super::Cli;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use stratus_core::client::encode;
use stratus_core::Error;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a management node.
    Serve(crate::serve::ServeArgs),
    /// Log in to a node and save its URL and a token in ~/.config/stratus/config.toml (0600).
    Login(LoginArgs),
    /// Forget the saved login.
    Logout,
    /// One resource: `stratus get vm web1`.
    Get { kind: String, id: String },
    /// Resources of a kind: `stratus list vm -q state=Running`.
    List(ListArgs),
    /// Delete a resource (with everything that depends on it).
    Delete {
        kind: String,
        id: String,
        #[arg(long)]
        force: bool,
    },
    #[command(subcommand)]
    Zone(ZoneCmd),
    #[command(subcommand)]
    Cluster(ClusterCmd),
    #[command(subcommand)]
    Host(HostCmd),
    #[command(subcommand, name = "backup-storage")]
    BackupStorage(BackupStorageCmd),
    #[command(subcommand, name = "primary-storage")]
    PrimaryStorage(PrimaryStorageCmd),
    #[command(subcommand)]
    Image(ImageCmd),
    /// Instance offerings (CPU and memory of a VM).
    #[command(subcommand)]
    Offering(OfferingCmd),
    #[command(subcommand, name = "disk-offering")]
    DiskOffering(DiskOfferingCmd),
    #[command(subcommand)]
    L2(L2Cmd),
    #[command(subcommand)]
    L3(L3Cmd),
    #[command(subcommand, name = "ip-range")]
    IpRange(IpRangeCmd),
    #[command(subcommand)]
    Vm(VmCmd),
    #[command(subcommand)]
    Volume(VolumeCmd),
    #[command(subcommand)]
    Job(JobCmd),
    /// Global configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The event log: the latest events, or `--follow` them as they happen.
    Events(EventsArgs),
    /// Endpoints the event log is delivered to (signed POSTs).
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Accounts (owners of resources) and their quotas.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Users of an account.
    #[command(subcommand)]
    User(UserCmd),
    /// API tokens: another token for the logged-in user (for a program), or the user's list.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the OpenAPI 3.1 document of the API (what `openapi.json` holds).
    Openapi,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The node's URL, `http://IP:PORT`.
    pub url: String,
    #[arg(long, default_value = "admin")]
    pub user: String,
    /// A file holding the password (else it is read from standard input).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    pub kind: String,
    /// A condition, `field=value` (operators = != > >= < <= ?= !?= ~= !~=); repeatable.
    #[arg(short = 'q', long = "query")]
    pub conds: Vec<String>,
    /// Sort by a field (`-field`: descending).
    #[arg(long)]
    pub sort: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Also count all matches.
    #[arg(long)]
    pub count: bool,
}

#[derive(Debug, Subcommand)]
pub enum ZoneCmd {
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    Enable {
        zone: String,
    },
    Disable {
        zone: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    Create {
        name: String,
        #[arg(long)]
        zone: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Add a host: its agent's URL and token.
    Add {
        /// The host's name [default: its URL].
        name: Option<String>,
        #[arg(long)]
        cluster: String,
        /// `http://IP:PORT[/PATH]` of the host's agent.
        #[arg(long)]
        url: String,
        /// A file holding the agent's token.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        #[arg(long, env = "STRATUS_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    Reconnect {
        host: String,
    },
    Enable {
        host: String,
    },
    Disable {
        host: String,
    },
    /// Move its VMs away and take it out of service.
    Maintenance {
        host: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum BackupStorageCmd {
    Create {
        name: String,
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 0)]
        total_mib: i64,
        /// Attach it to these zones.
        #[arg(long)]
        zone: Vec<String>,
    },
    Attach {
        bs: String,
        #[arg(long)]
        zone: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum PrimaryStorageCmd {
    /// Local storage of each host of the clusters it is attached to.
    Create {
        name: String,
        #[arg(long)]
        zone: String,
        /// The path on each host.
        #[arg(long)]
        url: Option<String>,
        /// Attach it to these clusters.
        #[arg(long)]
        cluster: Vec<String>,
    },
    Attach {
        ps: String,
        #[arg(long)]
        cluster: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    Add {
        name: String,
        #[arg(long)]
        url: String,
        /// The backup storage that keeps it [default: the only one].
        #[arg(long)]
        bs: Option<String>,
        #[arg(long, default_value_t = 10)]
        size_mib: i64,
        #[arg(long, default_value = "qcow2")]
        format: String,
        #[arg(long)]
        checksum: Option<String>,
    },
    /// Add an image from a file here: its bytes go to the node (into a `file://` backup
    /// storage) and agents fetch them from there.
    Upload {
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// The backup storage that keeps it [default: the only one].
        #[arg(long)]
        bs: Option<String>,
        /// The size a root volume from it takes at least [default: the file's, in MiB].
        #[arg(long)]
        size_mib: Option<i64>,
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum OfferingCmd {
    Create {
        name: String,
        #[arg(long)]
        cpu: i64,
        #[arg(long)]
        memory_mib: i64,
    },
    Enable {
        offering: String,
    },
    Disable {
        offering: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum DiskOfferingCmd {
    Create {
        name: String,
        #[arg(long)]
        size_mib: i64,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum L2Cmd {
    Create {
        name: String,
        #[arg(long)]
        zone: String,
        /// NoVlan, Vlan or Vxlan.
        #[arg(long, default_value = "NoVlan")]
        kind: String,
        #[arg(long, default_value = "eth0")]
        interface: String,
        #[arg(long)]
        vlan: Option<i64>,
        #[arg(long)]
        vni: Option<i64>,
        /// Attach it to these clusters.
        #[arg(long)]
        cluster: Vec<String>,
    },
    Attach {
        l2: String,
        #[arg(long)]
        cluster: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum L3Cmd {
    Create {
        name: String,
        #[arg(long)]
        l2: String,
        #[arg(long)]
        dns: Vec<String>,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum IpRangeCmd {
    Add {
        #[arg(long)]
        l3: String,
        #[arg(long)]
        start: String,
        #[arg(long)]
        end: String,
        #[arg(long)]
        gateway: String,
        /// Prefix length (24).
        #[arg(long, conflicts_with = "netmask")]
        prefix: Option<u32>,
        #[arg(long)]
        netmask: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    Create {
        name: String,
        #[arg(long)]
        offering: String,
        #[arg(long)]
        image: String,
        /// L3 networks, the first the default; repeatable.
        #[arg(long = "l3", required = true)]
        l3: Vec<String>,
        /// Disk offerings of data volumes to create with it; repeatable.
        #[arg(long = "data-disk")]
        data_disks: Vec<String>,
    },
    Start {
        vm: String,
    },
    Stop {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    Reboot {
        vm: String,
    },
    /// Stop and release it (recoverable until expunged).
    Destroy {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    Recover {
        vm: String,
    },
    Expunge {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    Migrate {
        vm: String,
        /// The destination [default: chosen by the allocator].
        #[arg(long)]
        host: Option<String>,
    },
    /// The end of its serial console, from its host (the text itself; `-o json` for the view).
    Console {
        vm: String,
        /// At most this many bytes, the last ones.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    Get {
        vm: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    Create {
        name: String,
        #[arg(long, required_unless_present = "size_mib")]
        disk_offering: Option<String>,
        #[arg(long)]
        size_mib: Option<i64>,
        /// Attach it to this VM at once.
        #[arg(long)]
        vm: Option<String>,
    },
    Attach {
        volume: String,
        #[arg(long)]
        vm: String,
    },
    Detach {
        volume: String,
    },
    Delete {
        volume: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    Get {
        job: String,
    },
    /// Wait for a job to end; its result.
    Wait {
        job: String,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    List,
    Get { name: String },
    Set { name: String, value: String },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing events as they happen (connecting again after a drop).
    #[arg(long)]
    pub follow: bool,
    /// Comma-separated globs over the topic (`vm.*,job.finished`).
    #[arg(long, default_value = "")]
    pub filter: String,
    /// With `--follow`: start after this event number (default: from now).
    #[arg(long)]
    pub after: Option<i64>,
    /// Without `--follow`: how many of the latest events to read (`--filter` narrows those).
    #[arg(long, default_value_t = 50)]
    pub last: u64,
}

#[derive(Debug, Subcommand)]
pub enum WebhookCmd {
    Create {
        /// `http://IP:PORT/PATH`.
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "")]
        filter: String,
        /// A file holding the HMAC secret (16 to 256 characters).
        #[arg(long)]
        secret_file: PathBuf,
    },
    List(Filter),
}

/// The quota limits of an account (left out: unlimited).
#[derive(Debug, Args)]
pub struct Limits {
    #[arg(long)]
    pub vm_limit: Option<i64>,
    #[arg(long)]
    pub vcpu_limit: Option<i64>,
    #[arg(long)]
    pub memory_mib_limit: Option<i64>,
    #[arg(long)]
    pub volume_limit: Option<i64>,
    #[arg(long)]
    pub volume_mib_limit: Option<i64>,
}

impl Limits {
    fn json(&self) -> Value {
        json!({
            "vm_limit": self.vm_limit,
            "vcpu_limit": self.vcpu_limit,
            "memory_mib_limit": self.memory_mib_limit,
            "volume_limit": self.volume_limit,
            "volume_mib_limit": self.volume_mib_limit,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    Create {
        name: String,
        /// Its users run the cloud.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        limits: Limits,
    },
    /// Set an account's quota limits (all of them; one left out is unlimited).
    Quota {
        account: String,
        #[command(flatten)]
        limits: Limits,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    Create {
        name: String,
        #[arg(long)]
        account: String,
        /// A file holding the password.
        #[arg(long)]
        password_file: PathBuf,
    },
    List(Filter),
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// A new token; printed once (only its hash is kept).
    Create {
        /// What it is for.
        #[arg(long)]
        note: Option<String>,
        /// Seconds it stays valid (default: the node's `auth.token.ttl`).
        #[arg(long)]
        ttl_s: Option<u64>,
    },
    List(Filter),
}

/// `-q COND` filters of a noun's `list`.
#[derive(Debug, Args)]
pub struct Filter {
    #[arg(short = 'q', long = "query")]
    pub conds: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,
}

/// How a command failed: at the node (coded) or here.
pub enum Outcome {
    Failed(Failure),
    Local(anyhow::Error),
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        Outcome::Failed(f)
    }
}
impl From<Error> for Outcome {
    fn from(e: Error) -> Self {
        Outcome::Failed(e.into())
    }
}
impl From<anyhow::Error> for Outcome {
    fn from(e: anyhow::Error) -> Self {
        Outcome::Local(e)
    }
}

/// A kind's API path from what a person types: `vm`, `vms`, `ip-range`, `l3`, ...
pub fn kind_path(kind: &str) -> Result<&'static str, Error> {
    let k = kind.trim().to_ascii_lowercase().replace('_', "-");
    let alias = match k.as_str() {
        "l2" | "l2s" | "l2-network" => "l2-networks",
        "l3" | "l3s" | "l3-network" => "l3-networks",
        "offering" | "offerings" => "instance-offerings",
        "nic" | "nics" => "vm-nics",
        other => other,
    };
    stratus_core::api::RESOURCE_PATHS
        .iter()
        .map(|(p, _)| *p)
        .find(|p| *p == alias || p.strip_suffix('s') == Some(alias))
        .ok_or_else(|| Error::invalid(format!("no kind {kind:?}")))
}

fn session(cli: &Cli) -> Result<Session, Outcome> {
    let (url, token) = Login::resolve(cli.server.clone(), cli.token.clone())?;
    let wait = if cli.async_ {
        Wait::No
    } else if cli.wait {
        Wait::Progress
    } else {
        Wait::Quiet
    };
    Ok(Session::new(&url, token.as_deref(), wait)?)
}

fn print(format: Format, kind: &str, v: &Value) {
    println!("{}", output::render(format, kind, v));
}

/// Run the command.
pub async fn run(cli: Cli) -> Result<(), Outcome> {
    match &cli.command {
        Command::Serve(args) => return Ok(crate::serve::run(args.clone()).await?),
        Command::Completions { shell } => {
            let mut cmd = super::command_for_completions();
            clap_complete::generate(*shell, &mut cmd, "stratus", &mut std::io::stdout());
            return Ok(());
        }
        Command::Openapi => {
            print!("{}", stratus_core::api::openapi::document_text());
            return Ok(());
        }
        Command::Logout => {
            // The token ends at the node too; a node that cannot be reached is said, and the
            // saved login goes anyway (the token still expires there).
            if let Some(l) = Login::load()? {
                let s = Session::new(&l.url, Some(&l.token), Wait::Quiet)?;
                if let Err(e) = s.send("POST", "/v1/auth/logout", None).await {
                    eprintln!("the token could not be ended at {}: {e}", l.url);
                }
            }
            let p = Login::path()?;
            if p.exists() {
                std::fs::remove_file(&p).map_err(anyhow::Error::from)?;
            }
            return Ok(());
        }
        Command::Login(a) => return login(a).await,
        Command::Events(a) if a.follow => return follow(&cli, a).await,
        _ => {}
    }
    let s = session(&cli)?;
    let f = cli.output;
    match cli.command {
        Command::Serve(_)
        | Command::Completions { .. }
        | Command::Openapi
        | Command::Logout
        | Command::Login(_) => {
            unreachable!("handled above")
        }
        Command::Get { kind, id } => {
            let path = kind_path(&kind)?;
            let uuid = s.resolve(path, &id).await?;
            print(f, path, &s.get(&format!("/v1/{path}/{uuid}")).await?);
        }
        Command::List(a) => {
            let path = kind_path(&a.kind)?;
            let mut q = format!("/v1/{path}?limit={}&offset={}", a.limit, a.offset);
            for c in &a.conds {
                q.push_str(&format!("&q={}", encode(c)));
            }
            if let Some(sort) = &a.sort {
                q.push_str(&format!("&sort={}", encode(sort)));
            }
            if a.count {
                q.push_str("&count=true");
            }
            print(f, path, &s.get(&q).await?);
        }
        Command::Delete { kind, id, force } => {
            let path = kind_path(&kind)?;
            let uuid = s.resolve(path, &id).await?;
            let v = s
                .mutate("DELETE", &format!("/v1/{path}/{uuid}?force={force}"), None)
                .await?;
            print(f, path, &v);
        }
        Command::Zone(c) => zone(&s, f, c).await?,
        Command::Cluster(c) => cluster(&s, f, c).await?,
        Command::Host(c) => host(&s, f, c).await?,
        Command::BackupStorage(c) => backup_storage(&s, f, c).await?,
        Command::PrimaryStorage(c) => primary_storage(&s, f, c).await?,
        Command::Image(c) => image(&s, f, c).await?,
        Command::Offering(c) => offering(&s, f, c).await?,
        Command::DiskOffering(c) => match c {
            DiskOfferingCmd::Create { name, size_mib } => {
                let body = json!({"name": name, "size_mib": size_mib});
                create(&s, f, "disk-offerings", body).await?;
            }
            DiskOfferingCmd::List(q) => list(&s, f, "disk-offerings", q).await?,
        },
        Command::L2(c) => l2(&s, f, c).await?,
        Command::L3(c) => match c {
            L3Cmd::Create { name, l2, dns } => {
                let l2 = s.resolve("l2-networks", &l2).await?;
                let body = json!({"name": name, "l2_uuid": l2, "dns": dns});
                create(&s, f, "l3-networks", body).await?;
            }
            L3Cmd::List(q) => list(&s, f, "l3-networks", q).await?,
        },
        Command::IpRange(c) => match c {
            IpRangeCmd::Add {
                l3,
                start,
                end,
                gateway,
                prefix,
                netmask,
                name,
            } => {
                let l3 = s.resolve("l3-networks", &l3).await?;
                let body = json!({"l3_uuid": l3, "start_ip": start, "end_ip": end,
                    "gateway": gateway, "prefix_len": prefix, "netmask": netmask, "name": name});
                create(&s, f, "ip-ranges", body).await?;
            }
            IpRangeCmd::List(q) => list(&s, f, "ip-ranges", q).await?,
        },
        Command::Vm(c) => vm(&s, f, c).await?,
        Command::Volume(c) => volume(&s, f, c).await?,
        Command::Job(c) => match c {
            JobCmd::Get { job } => {
                let u = s.resolve("jobs", &job).await?;
                print(f, "jobs", &s.get(&format!("/v1/jobs/{u}")).await?);
            }
            JobCmd::Wait { job } => {
                let u = s.resolve("jobs", &job).await?;
                print(f, "jobs", &s.wait_job(u).await?);
            }
            JobCmd::List(q) => list(&s, f, "jobs", q).await?,
        },
        Command::Events(a) => {
            let url = format!("/v1/events?sort=-seq&limit={}", a.last);
            let mut v = s.get(&url).await?;
            let filter = stratus_core::events::Filter::parse(&a.filter)?;
            if let Some(items) = v["items"].as_array_mut() {
                items.retain(|e| filter.matches(e["topic"].as_str().unwrap_or("")));
                items.reverse();
            }
            print(f, "events", &v);
        }
        Command::Webhook(c) => match c {
            WebhookCmd::Create {
                url,
                filter,
                secret_file,
            } => {
                let secret = crate::files::read_line(&secret_file)?;
                let body = json!({"url": url, "filter": filter, "secret": secret});
                create(&s, f, "webhooks", body).await?;
            }
            WebhookCmd::List(q) => list(&s, f, "webhooks", q).await?,
        },
        Command::Account(c) => match c {
            AccountCmd::Create {
                name,
                admin,
                limits,
            } => {
                let mut body = limits.json();
                body["name"] = json!(name);
                body["admin"] = json!(admin);
                create(&s, f, "accounts", body).await?;
            }
            AccountCmd::Quota { account, limits } => {
                let uuid = s.resolve("accounts", &account).await?;
                let v = s
                    .mutate("PUT", &format!("/v1/accounts/{uuid}"), Some(&limits.json()))
                    .await?;
                print(f, "accounts", &v);
            }
            AccountCmd::List(q) => list(&s, f, "accounts", q).await?,
        },
        Command::User(c) => match c {
            UserCmd::Create {
                name,
                account,
                password_file,
            } => {
                let password = crate::files::read_line(&password_file)?;
                let account = s.resolve("accounts", &account).await?;
                let body = json!({"name": name, "account_uuid": account, "password": password});
                create(&s, f, "users", body).await?;
            }
            UserCmd::List(q) => list(&s, f, "users", q).await?,
        },
        Command::Token(c) => match c {
            TokenCmd::Create { note, ttl_s } => {
                let body = json!({"note": note, "ttl_s": ttl_s});
                print(
                    f,
                    "api-tokens",
                    &s.send("POST", "/v1/auth/tokens", Some(&body)).await?,
                );
            }
            TokenCmd::List(q) => list(&s, f, "api-tokens", q).await?,
        },
        Command::Config(c) => match c {
            ConfigCmd::List => {
                let v = s.get("/v1/config").await?;
                let items = v.get("items").cloned().unwrap_or(v);
                print(f, "config", &json!({ "items": items }));
            }
            ConfigCmd::Get { name } => {
                print(f, "config", &s.get(&format!("/v1/config/{name}")).await?)
            }
            ConfigCmd::Set { name, value } => {
                let path = format!("/v1/config/{name}");
                let v = s
                    .send("PUT", &path, Some(&json!({ "value": value })))
                    .await?;
                print(f, "config", &v);
            }
        },
    }
    Ok(())
}

/// `stratus events --follow`: one line per event (a JSON object per line with `-o json`).
async fn follow(cli: &Cli, a: &EventsArgs) -> Result<(), Outcome> {
    let (url, token) = Login::resolve(cli.server.clone(), cli.token.clone())?;
    let (addr, _) = stratus_rt::http::parse_url(&url)
        .map_err(|e| Error::invalid(format!("bad server URL {url:?}: {e}")))?;
    let follow = crate::sse::Follow {
        addr,
        token: token.unwrap_or_default(),
        filter: a.filter.clone(),
        after: a.after,
        reconnect_for: std::time::Duration::from_secs(60),
    };
    let json_lines = cli.output != Format::Table;
    crate::sse::follow(&follow, |m| {
        if json_lines {
            println!("{}", m.data);
        } else {
            println!(
                "{:>8}  {:<28} {}",
                m.seq,
                m.topic,
                m.data["resource_uuid"].as_str().unwrap_or("")
            );
        }
        true
    })
    .await?;
    Ok(())
}

async fn login(a: &LoginArgs) -> Result<(), Outcome> {
    let password = match &a.password_file {
        Some(p) => crate::files::read_line(p)?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(anyhow::Error::from)?;
            line.trim().to_string()
        }
    };
    let s = Session::new(&a.url, None, Wait::Quiet)?;
    let body = json!({"user": a.user, "password": password});
    let v = s.send("POST", "/v1/auth/login", Some(&body)).await?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| Error::internal(format!("no token in the answer: {v}")))?;
    let login = Login {
        url: a.url.trim_end_matches('/').to_string(),
        token: token.to_string(),
        user: a.user.clone(),
    };
    let p = login.save()?;
    eprintln!(
        "logged in to {} as {}; saved in {}",
        login.url,
        a.user,
        p.display()
    );
    Ok(())
}

async fn create(s: &Session, f: Format, path: &str, body: Value) -> Result<Value, Failure> {
    let v = s
        .mutate("POST", &format!("/v1/{path}"), Some(&body))
        .await?;
    print(f, path, &v);
    Ok(v)
}

/// Run `action` on a resource and print its result.
async fn act(
    s: &Session,
    f: Format,
    path: &str,
    id: &str,
    action: &str,
    body: Value,
) -> Result<(), Failure> {
    let uuid = s.resolve(path, id).await?;
    let v = s
        .mutate(
            "POST",
            &format!("/v1/{path}/{uuid}/actions/{action}"),
            Some(&body),
        )
        .await?;
    if !v.is_null() {
        print(f, path, &v);
    }
    Ok(())
}

async fn list(s: &Session, f: Format, path: &str, q: Filter) -> Result<(), Failure> {
    let mut url = format!("/v1/{path}?limit={}", q.limit);
    for c in &q.conds {
        url.push_str(&format!("&q={}", encode(c)));
    }
    print(f, path, &s.get(&url).await?);
    Ok(())
}

/// How a resource attaches to another: the action, the body's key, the other's kind.
struct Link {
    action: &'static str,
    key: &'static str,
    kind: &'static str,
}

const TO_CLUSTER: Link = Link {
    action: "attach-cluster",
    key: "cluster_uuid",
    kind: "clusters",
};
const TO_ZONE: Link = Link {
    action: "attach-zone",
    key: "zone_uuid",
    kind: "zones",
};

/// Attach `id` (of `path`) to `target` (a name or uuid) by `link`.
async fn attach(
    s: &Session,
    f: Format,
    path: &str,
    id: &str,
    link: &Link,
    target: &str,
) -> Result<(), Failure> {
    let t = s.resolve(link.kind, target).await?;
    act(s, f, path, id, link.action, json!({ link.key: t })).await
}

/// Create a resource, attach it to each of `targets`, print it as it is then. The create is
/// waited for even under `--async` (an attach needs the resource); the attaches follow the
/// session's waiting.
async fn create_attached(
    s: &Session,
    f: Format,
    path: &str,
    body: Value,
    link: &Link,
    targets: &[String],
) -> Result<(), Failure> {
    let job = s
        .client
        .submit("POST", &format!("/v1/{path}"), Some(&body))
        .await?;
    let id = created(&s.wait_job(job.job).await?)?;
    for t in targets {
        let t = s.resolve(link.kind, t).await?;
        let act = format!("/v1/{path}/{id}/actions/{}", link.action);
        s.mutate("POST", &act, Some(&json!({ link.key: t })))
            .await?;
    }
    print(f, path, &s.get(&format!("/v1/{path}/{id}")).await?);
    Ok(())
}

/// The uuid of a created resource, from a job's result.
fn created(v: &Value) -> Result<String, Failure> {
    v["uuid"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::internal(format!("no uuid in {v}")).into())
}

async fn zone(s: &Session, f: Format, c: ZoneCmd) -> Result<(), Failure> {
    match c {
        ZoneCmd::Create { name, description } => {
            let body = json!({"name": name, "description": description});
            create(s, f, "zones", body).await?;
        }
        ZoneCmd::Enable { zone } => act(s, f, "zones", &zone, "enable", json!({})).await?,
        ZoneCmd::Disable { zone } => act(s, f, "zones", &zone, "disable", json!({})).await?,
        ZoneCmd::List(q) => list(s, f, "zones", q).await?,
    }
    Ok(())
}

async fn cluster(s: &Session, f: Format, c: ClusterCmd) -> Result<(), Failure> {
    match c {
        ClusterCmd::Create { name, zone } => {
            let zone = s.resolve("zones", &zone).await?;
            create(s, f, "clusters", json!({"name": name, "zone_uuid": zone})).await?;
        }
        ClusterCmd::List(q) => list(s, f, "clusters", q).await?,
    }
    Ok(())
}

async fn host(s: &Session, f: Format, c: HostCmd) -> Result<(), Failure> {
    let simple = |h: String, a: &'static str| (h, a);
    let (h, action) = match c {
        HostCmd::Add {
            name,
            cluster,
            url,
            token_file,
            token,
        } => {
            let token = match (token_file, token) {
                (Some(p), _) => {
                    crate::files::read_line(&p).map_err(|e| Error::invalid(format!("{e:#}")))?
                }
                (None, Some(t)) => t,
                (None, None) => {
                    return Err(Error::invalid("give the agent's --token-file or --token").into())
                }
            };
            let cluster = s.resolve("clusters", &cluster).await?;
            let name = name.unwrap_or_else(|| url.clone());
            let body =
                json!({"name": name, "cluster_uuid": cluster, "address": url, "token": token});
            create(s, f, "hosts", body).await?;
            return Ok(());
        }
        HostCmd::List(q) => return list(s, f, "hosts", q).await,
        HostCmd::Reconnect { host } => simple(host, "reconnect"),
        HostCmd::Enable { host } => simple(host, "enable"),
        HostCmd::Disable { host } => simple(host, "disable"),
        HostCmd::Maintenance { host } => simple(host, "maintenance"),
    };
    act(s, f, "hosts", &h, action, json!({})).await
}

async fn backup_storage(s: &Session, f: Format, c: BackupStorageCmd) -> Result<(), Failure> {
    let p = "backup-storages";
    match c {
        BackupStorageCmd::Create {
            name,
            url,
            total_mib,
            zone,
        } => {
            let body = json!({"name": name, "url": url, "total_mib": total_mib});
            create_attached(s, f, p, body, &TO_ZONE, &zone).await
        }
        BackupStorageCmd::Attach { bs, zone } => attach(s, f, p, &bs, &TO_ZONE, &zone).await,
        BackupStorageCmd::List(q) => list(s, f, p, q).await,
    }
}

async fn primary_storage(s: &Session, f: Format, c: PrimaryStorageCmd) -> Result<(), Failure> {
    let p = "primary-storages";
    match c {
        PrimaryStorageCmd::Create {
            name,
            zone,
            url,
            cluster,
        } => {
            let zone = s.resolve("zones", &zone).await?;
            let mut body = json!({"name": name, "zone_uuid": zone});
            if let Some(u) = url {
                body["url"] = u.into();
            }
            create_attached(s, f, p, body, &TO_CLUSTER, &cluster).await
        }
        PrimaryStorageCmd::Attach { ps, cluster } => {
            attach(s, f, p, &ps, &TO_CLUSTER, &cluster).await
        }
        PrimaryStorageCmd::List(q) => list(s, f, p, q).await,
    }
}

async fn image(s: &Session, f: Format, c: ImageCmd) -> Result<(), Failure> {
    match c {
        ImageCmd::Add {
            name,
            url,
            bs,
            size_mib,
            format,
            checksum,
        } => {
            let bs = match bs {
                Some(b) => s.resolve("backup-storages", &b).await?,
                None => only(s, "backup-storages").await?,
            };
            let body = json!({"name": name, "url": url, "bs_uuid": bs, "size_mib": size_mib,
                "format": format, "checksum": checksum});
            create(s, f, "images", body).await?;
        }
        ImageCmd::Upload {
            name,
            file,
            bs,
            size_mib,
            format,
        } => {
            // Read whole: the CLI holds the image in memory while it sends it.
            let bytes = std::fs::read(&file)
                .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?;
            let bs = match bs {
                Some(b) => s.resolve("backup-storages", &b).await?,
                None => only(s, "backup-storages").await?,
            };
            let size_mib = size_mib.unwrap_or((bytes.len() as u64).div_ceil(1 << 20).max(1) as i64);
            let body = json!({"name": name, "url": "upload://pending", "bs_uuid": bs,
                "size_mib": size_mib, "format": format});
            // The image is made first (waited for, also under --async), then its bytes sent.
            let job = s.client.submit("POST", "/v1/images", Some(&body)).await?;
            let image = s.wait_job(job.job).await?;
            let uuid = image["uuid"]
                .as_str()
                .ok_or_else(|| Error::internal(format!("no uuid in {image}")))?
                .to_string();
            let timeout = std::time::Duration::from_secs(60 + bytes.len() as u64 / (1 << 20));
            let v = s
                .client
                .put_file(&format!("/v1/images/{uuid}/file"), bytes, timeout)
                .await?;
            print(f, "images", &v);
        }
        ImageCmd::List(q) => list(s, f, "images", q).await?,
    }
    Ok(())
}

/// The one resource of a kind (for a flag that may be left out when there is one).
async fn only(s: &Session, path: &str) -> Result<uuid::Uuid, Failure> {
    let v = s.get(&format!("/v1/{path}?limit=2")).await?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    match items.as_slice() {
        [one] => one["uuid"]
            .as_str()
            .and_then(|u| uuid::Uuid::parse_str(u).ok())
            .ok_or_else(|| Error::internal(format!("no uuid in {one}")).into()),
        _ => Err(Error::invalid(format!(
            "there are {} {path}; name one",
            if items.is_empty() { "no" } else { "several" }
        ))
        .into()),
    }
}

async fn offering(s: &Session, f: Format, c: OfferingCmd) -> Result<(), Failure> {
    let p = "instance-offerings";
    match c {
        OfferingCmd::Create {
            name,
            cpu,
            memory_mib,
        } => {
            let body = json!({"name": name, "cpu": cpu, "memory_mib": memory_mib});
            create(s, f, p, body).await?;
        }
        OfferingCmd::Enable { offering } => act(s, f, p, &offering, "enable", json!({})).await?,
        OfferingCmd::Disable { offering } => act(s, f, p, &offering, "disable", json!({})).await?,
        OfferingCmd::List(q) => list(s, f, p, q).await?,
    }
    Ok(())
}

async fn l2(s: &Session, f: Format, c: L2Cmd) -> Result<(), Failure> {
    let p = "l2-networks";
    match c {
        L2Cmd::Create {
            name,
            zone,
            kind,
            interface,
            vlan,
            vni,
            cluster,
        } => {
            let zone = s.resolve("zones", &zone).await?;
            let body = json!({"name": name, "zone_uuid": zone, "kind": kind,
                "physical_interface": interface, "vlan": vlan, "vni": vni});
            create_attached(s, f, p, body, &TO_CLUSTER, &cluster).await
        }
        L2Cmd::Attach { l2, cluster } => attach(s, f, p, &l2, &TO_CLUSTER, &cluster).await,
        L2Cmd::List(q) => list(s, f, p, q).await,
    }
}

async fn vm(s: &Session, f: Format, c: VmCmd) -> Result<(), Failure> {
    let p = "vms";
    match c {
        VmCmd::Create {
            name,
            offering,
            image,
            l3,
            data_disks,
        } => {
            let offering = s.resolve("instance-offerings", &offering).await?;
            let image = s.resolve("images", &image).await?;
            let mut l3s = Vec::new();
            for n in &l3 {
                l3s.push(s.resolve("l3-networks", n).await?);
            }
            let mut disks = Vec::new();
            for d in &data_disks {
                disks.push(s.resolve("disk-offerings", d).await?);
            }
            let body = json!({"name": name, "instance_offering_uuid": offering,
                "image_uuid": image, "l3_network_uuids": l3s,
                "data_disk_offering_uuids": disks});
            create(s, f, p, body).await?;
        }
        VmCmd::Start { vm } => act(s, f, p, &vm, "start", json!({})).await?,
        VmCmd::Stop { vm, force } => act(s, f, p, &vm, "stop", json!({"force": force})).await?,
        VmCmd::Reboot { vm } => act(s, f, p, &vm, "reboot", json!({})).await?,
        VmCmd::Destroy { vm, force } => {
            act(s, f, p, &vm, "destroy", json!({"force": force})).await?
        }
        VmCmd::Recover { vm } => act(s, f, p, &vm, "recover", json!({})).await?,
        VmCmd::Expunge { vm, force } => {
            act(s, f, p, &vm, "expunge", json!({"force": force})).await?
        }
        VmCmd::Migrate { vm, host } => {
            let host = match host {
                Some(h) => Some(s.resolve("hosts", &h).await?),
                None => None,
            };
            act(s, f, p, &vm, "migrate", json!({"host_uuid": host})).await?
        }
        VmCmd::Console { vm, bytes } => {
            let u = s.resolve(p, &vm).await?;
            let v = s.get(&format!("/v1/vms/{u}/console?bytes={bytes}")).await?;
            match (f, v.get("text").and_then(Value::as_str)) {
                (Format::Table, Some(text)) => print!("{text}"),
                _ => print(f, p, &v),
            }
        }
        VmCmd::Get { vm } => {
            let u = s.resolve(p, &vm).await?;
            print(f, p, &s.get(&format!("/v1/vms/{u}")).await?);
        }
        VmCmd::List(q) => list(s, f, p, q).await?,
    }
    Ok(())
}

async fn volume(s: &Session, f: Format, c: VolumeCmd) -> Result<(), Failure> {
    let p = "volumes";
    match c {
        VolumeCmd::Create {
            name,
            disk_offering,
            size_mib,
            vm,
        } => {
            let offering = match disk_offering {
                Some(d) => Some(s.resolve("disk-offerings", &d).await?),
                None => None,
            };
            let vm = match vm {
                Some(v) => Some(s.resolve("vms", &v).await?),
                None => None,
            };
            let body = json!({"name": name, "disk_offering_uuid": offering,
                "size_mib": size_mib, "vm_uuid": vm});
            create(s, f, p, body).await?;
        }
        VolumeCmd::Attach { volume, vm } => {
            let vm = s.resolve("vms", &vm).await?;
            act(s, f, p, &volume, "attach", json!({"vm_uuid": vm})).await?
        }
        VolumeCmd::Detach { volume } => act(s, f, p, &volume, "detach", json!({})).await?,
        VolumeCmd::Delete { volume } => {
            let u = s.resolve(p, &volume).await?;
            let v = s
                .mutate("DELETE", &format!("/v1/volumes/{u}"), None)
                .await?;
            print(f, p, &v);
        }
        VolumeCmd::List(q) => list(s, f, p, q).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_read_as_people_write_them() {
        for (typed, path) in [
            ("vm", "vms"),
            ("VMs", "vms"),
            ("l3", "l3-networks"),
            ("ip_range", "ip-ranges"),
            ("offering", "instance-offerings"),
            ("disk-offering", "disk-offerings"),
            ("job", "jobs"),
        ] {
            assert_eq!(kind_path(typed).unwrap(), path, "{typed}");
        }
        assert!(kind_path("vmz").is_err());
    }
}
