//! A host's side of the networks: a Linux bridge per L2 network (holding the physical
//! interface, a VLAN sub-interface or a VXLAN device), a tap per NIC, the L3's gateway address
//! on the bridge, and one dnsmasq per bridge that hands out exactly the addresses Stratus
//! assigned (a `dhcp-host` MAC→IP line per NIC here, a static context per L3: no dynamic
//! range).
//!
//! The gateway is host-local: each host's bridge answers for it, so the VMs of a host reach
//! their gateway (and the host reaches them) without an external router. Every name the agent
//! makes or looks up is prefixed with the agent's `--bridge-prefix`, so that two agents on one
//! machine act as two hosts. What the agent made is recorded under `<state>/net/` and is all it
//! ever removes.
//!
//! The builders here are pure (unit-tested); [`Networks`] applies them.

use super::exec::{self, argv, run};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use stratus_agent_protocol::{AgentError, AgentErrorCode, L2Kind, NicSpec};
use uuid::Uuid;

/// Linux's limit on an interface name.
const IFNAMSIZ: usize = 15;

fn ifname(name: String) -> Result<String, AgentError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(name)
    } else {
        Err(AgentError::new(
            AgentErrorCode::InvalidArgument,
            format!(
                "{name:?} is not a usable interface name (at most {IFNAMSIZ} of [A-Za-z0-9_.-]; \
                 a shorter --bridge-prefix helps)"
            ),
        ))
    }
}

/// The bridge a NIC plugs into on this host.
pub fn bridge(prefix: &str, nic: &NicSpec) -> Result<String, AgentError> {
    ifname(format!("{prefix}{}", nic.bridge))
}

/// The tap of a NIC.
pub fn tap(prefix: &str, nic: Uuid) -> Result<String, AgentError> {
    ifname(format!("{prefix}tap{}", &nic.simple().to_string()[24..]))
}

/// The device the bridge holds besides the taps, and the commands that make it when the agent
/// must (`None` for NoVlan: the physical interface is there already).
pub fn uplink(prefix: &str, nic: &NicSpec) -> Result<(String, Option<Vec<String>>), AgentError> {
    let phys = ifname(format!("{prefix}{}", nic.physical_interface))?;
    Ok(match nic.l2 {
        L2Kind::NoVlan => (phys, None),
        L2Kind::Vlan { vlan } => {
            let dev = ifname(format!("{phys}.{vlan}"))?;
            let make = argv([
                "ip",
                "link",
                "add",
                "link",
                &phys,
                "name",
                &dev,
                "type",
                "vlan",
                "id",
                &vlan.to_string(),
            ]);
            (dev, Some(make))
        }
        L2Kind::Vxlan { vni } => {
            let dev = ifname(format!("{prefix}vx{vni}"))?;
            let make = argv([
                "ip",
                "link",
                "add",
                &dev,
                "type",
                "vxlan",
                "id",
                &vni.to_string(),
                "dstport",
                "4789",
                "dev",
                &phys,
            ]);
            (dev, Some(make))
        }
    })
}

/// Prefix length of a dotted netmask.
pub fn prefix_len(netmask: &str) -> Result<u32, AgentError> {
    let m: Ipv4Addr = netmask
        .parse()
        .map_err(|_| bad(format!("netmask {netmask:?} is not an IPv4 address")))?;
    let bits = u32::from(m);
    let len = bits.leading_ones();
    if bits.checked_shl(len).unwrap_or(0) != 0 {
        return Err(bad(format!("netmask {netmask} is not contiguous")));
    }
    Ok(len)
}

fn bad(message: String) -> AgentError {
    AgentError::new(AgentErrorCode::InvalidArgument, message)
}

/// One L3's DHCP context on a bridge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct L3Context {
    pub l3: Uuid,
    pub gateway: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub dns: Vec<String>,
}

impl L3Context {
    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & u32::from(self.netmask))
    }
    fn tag(&self) -> String {
        format!("l3_{}", &self.l3.simple().to_string()[20..])
    }
}

/// What one bridge must serve: built from the NICs of the VMs on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeWant {
    /// A NIC on it (how the L2 reaches the host is the same for all of them).
    pub nic: Option<NicSpec>,
    pub l3s: BTreeSet<L3Context>,
    /// MAC → IP.
    pub hosts: BTreeMap<String, Ipv4Addr>,
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`, lower case; anything else refused.
pub fn mac(m: &str) -> Result<String, AgentError> {
    let m = m.to_ascii_lowercase();
    let ok = m.len() == 17
        && m.split(':').count() == 6
        && m.split(':')
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(m)
    } else {
        Err(bad(format!("{m:?} is not a MAC address")))
    }
}

/// Group the NICs by bridge. A NIC without an address gets a tap but no DHCP line.
pub fn wants<'a>(
    prefix: &str,
    nics: impl IntoIterator<Item = &'a NicSpec>,
) -> Result<BTreeMap<String, BridgeWant>, AgentError> {
    let mut out: BTreeMap<String, BridgeWant> = BTreeMap::new();
    for n in nics {
        let w = out.entry(bridge(prefix, n)?).or_default();
        if w.nic.is_none() {
            w.nic = Some(n.clone());
        }
        if let (Some(ip), Some(gw), Some(mask)) = (&n.ip, &n.gateway, &n.netmask) {
            let parse = |s: &str| {
                s.parse::<Ipv4Addr>()
                    .map_err(|_| bad(format!("{s:?} is not an IPv4 address")))
            };
            prefix_len(mask)?;
            // Only addresses reach dnsmasq's files (a newline would be a line of its own).
            let dns = n
                .dns
                .iter()
                .map(|d| parse(d).map(|a| a.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            w.l3s.insert(L3Context {
                l3: n.l3,
                gateway: parse(gw)?,
                netmask: parse(mask)?,
                dns,
            });
            w.hosts.insert(mac(&n.mac)?, parse(ip)?);
        }
    }
    Ok(out)
}

/// dnsmasq's configuration for a bridge: DHCP only (no DNS: `port=0`), bound to the bridge,
/// one static context per L3, hosts from `hosts_file`.
pub fn dnsmasq_conf(bridge: &str, want: &BridgeWant, dir: &Path) -> String {
    let mut c = format!(
        "interface={bridge}\nbind-interfaces\nexcept-interface=lo\nport=0\nno-resolv\nno-hosts\n\
         leasefile-ro\ndhcp-hostsfile={}\npid-file={}\nlog-facility={}\nlog-dhcp\n",
        dir.join("hosts").display(),
        dir.join("dnsmasq.pid").display(),
        dir.join("dnsmasq.log").display(),
    );
    for l3 in &want.l3s {
        let tag = l3.tag();
        c.push_str(&format!(
            "dhcp-range=set:{tag},{},static,{},1h\ndhcp-option=tag:{tag},option:router,{}\n",
            l3.network(),
            l3.netmask,
            l3.gateway
        ));
        if !l3.dns.is_empty() {
            c.push_str(&format!(
                "dhcp-option=tag:{tag},option:dns-server,{}\n",
                l3.dns.join(",")
            ));
        }
    }
    c
}

/// dnsmasq's hosts file: `MAC,IP` per NIC.
pub fn dnsmasq_hosts(want: &BridgeWant) -> String {
    want.hosts
        .iter()
        .map(|(mac, ip)| format!("{mac},{ip}\n"))
        .collect()
}

/// What the agent made for a bridge, kept so that it removes exactly that.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Made {
    /// The bridge itself was made here (not there before).
    bridge: bool,
    /// A VLAN or VXLAN device made here.
    device: Option<String>,
    /// Gateway addresses put on the bridge (`a.b.c.d/len`).
    addresses: BTreeSet<String>,
    conf: String,
    hosts: String,
}

/// The bridges, taps and dnsmasqs of this host.
pub struct Networks {
    prefix: String,
    dir: PathBuf,
    dnsmasq: String,
}

/// A link as `ip -d -j link show` says.
#[derive(Debug, Deserialize)]
struct Link {
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}
#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
}

async fn link(name: &str) -> Option<Link> {
    let out = run(&argv(["ip", "-d", "-j", "link", "show", "dev", name]))
        .await
        .ok()?;
    serde_json::from_str::<Vec<Link>>(&out)
        .ok()?
        .into_iter()
        .next()
}

/// The IPv4 addresses on an interface (an answer `ip` cannot give is an error, never "none").
async fn addresses(name: &str) -> Result<Vec<String>, AgentError> {
    #[derive(Deserialize)]
    struct Addr {
        #[serde(default)]
        family: String,
        #[serde(default)]
        local: String,
    }
    #[derive(Deserialize)]
    struct Iface {
        #[serde(default)]
        addr_info: Vec<Addr>,
    }
    let out = run(&argv(["ip", "-j", "addr", "show", "dev", name])).await?;
    let ifaces: Vec<Iface> = serde_json::from_str(&out)
        .map_err(|e| AgentError::failed(format!("ip -j addr show dev {name}: {e}")))?;
    Ok(ifaces
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter(|a| a.family == "inet")
        .map(|a| a.local)
        .collect())
}

fn conflict(message: String) -> AgentError {
    AgentError::new(AgentErrorCode::AlreadyExists, message)
}

impl Networks {
    pub fn new(prefix: &str, state_dir: &Path, dnsmasq: &str) -> std::io::Result<Networks> {
        let dir = state_dir.join("net");
        std::fs::create_dir_all(&dir)?;
        Ok(Networks {
            prefix: prefix.to_string(),
            dir,
            dnsmasq: dnsmasq.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn made_path(&self, bridge: &str) -> PathBuf {
        self.dir.join(bridge).join("made.json")
    }

    fn made(&self, bridge: &str) -> Option<Made> {
        serde_json::from_slice(&std::fs::read(self.made_path(bridge)).ok()?).ok()
    }

    fn record(&self, bridge: &str, m: &Made) -> Result<(), AgentError> {
        let p = self.made_path(bridge);
        super::write_atomic(&p, &serde_json::to_vec_pretty(m).unwrap_or_default())
    }

    /// The bridges the agent made and still has.
    pub fn bridges(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("made.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Make the host's networks what `wants` says: bridges (with their uplinks and gateway
    /// addresses) and dnsmasqs for each, and nothing of what the agent made for others.
    /// Returns the bridges that could not be set up, with why (the others are).
    pub async fn apply(
        &self,
        wants: &BTreeMap<String, BridgeWant>,
    ) -> BTreeMap<String, AgentError> {
        let mut failed = BTreeMap::new();
        for (br, want) in wants {
            if let Err(e) = self.ensure(br, want).await {
                tracing::warn!(bridge = %br, error = %e, "cannot set up a bridge");
                failed.insert(br.clone(), e);
            }
        }
        for br in self.bridges() {
            if !wants.contains_key(&br) {
                self.teardown(&br).await;
            }
        }
        failed
    }

    async fn ensure(&self, br: &str, want: &BridgeWant) -> Result<(), AgentError> {
        let Some(nic) = &want.nic else {
            return Ok(());
        };
        // Checked against the links on every pass, not only the record: a host that rebooted
        // has the record and none of the links.
        let mut made = self.made(br).unwrap_or_default();
        // Refuse what is in the way before changing anything.
        match link(br).await {
            Some(l)
                if l.linkinfo.as_ref().and_then(|i| i.info_kind.as_deref()) != Some("bridge") =>
            {
                return Err(conflict(format!(
                    "bridge conflict: {br} exists and is not a bridge"
                )))
            }
            Some(_) => {}
            None => {
                run(&argv(["ip", "link", "add", br, "type", "bridge"])).await?;
                made.bridge = true;
                // Its addresses went with it.
                made.addresses.clear();
            }
        }
        std::fs::create_dir_all(self.dir.join(br)).map_err(io)?;
        self.record(br, &made)?;
        let (dev, make) = uplink(&self.prefix, nic)?;
        if let Some(make) = make {
            if link(&dev).await.is_none() {
                let phys = ifname(format!("{}{}", self.prefix, nic.physical_interface))?;
                if link(&phys).await.is_none() {
                    return Err(AgentError::not_found(format!(
                        "physical interface {phys} is not on this host"
                    )));
                }
                run(&make).await?;
                made.device = Some(dev.clone());
                self.record(br, &made)?;
            }
        }
        match link(&dev).await {
            None => {
                return Err(AgentError::not_found(format!(
                    "interface {dev} is not on this host"
                )))
            }
            Some(l) if l.master.as_deref().is_some_and(|m| m != br) => {
                return Err(conflict(format!(
                    "bridge conflict: {dev} is held by bridge {}",
                    l.master.unwrap_or_default()
                )))
            }
            Some(l) if l.master.is_none() => {
                // An interface with addresses serves the host itself: in a bridge it would
                // lose them (and the host, say, its management network).
                let held = addresses(&dev).await?;
                if !held.is_empty() {
                    return Err(conflict(format!(
                        "{dev} carries the host's addresses ({}): moving it into bridge {br} would \
                         cut them off; give the L2 an interface of its own",
                        held.join(", ")
                    )));
                }
                run(&argv(["ip", "link", "set", &dev, "master", br])).await?;
                run(&argv(["ip", "link", "set", &dev, "up"])).await?;
            }
            Some(_) => {}
        }
        run(&argv(["ip", "link", "set", br, "up"])).await?;
        // Gateway addresses.
        let mut addresses = BTreeSet::new();
        for l3 in &want.l3s {
            let len = prefix_len(&l3.netmask.to_string())?;
            addresses.insert(format!("{}/{len}", l3.gateway));
        }
        for a in addresses.difference(&made.addresses) {
            run(&argv(["ip", "addr", "replace", a, "dev", br])).await?;
        }
        for a in made.addresses.difference(&addresses) {
            let _ = run(&argv(["ip", "addr", "del", a, "dev", br])).await;
        }
        made.addresses = addresses;
        self.record(br, &made)?;
        // dnsmasq.
        let dir = self.dir.join(br);
        let conf = dnsmasq_conf(br, want, &dir);
        let hosts = dnsmasq_hosts(want);
        let running = self.dnsmasq_pid(br);
        if want.l3s.is_empty() {
            self.stop_dnsmasq(br).await;
        } else if running.is_none() || conf != made.conf {
            self.stop_dnsmasq(br).await;
            super::write_atomic(&dir.join("hosts"), hosts.as_bytes())?;
            super::write_atomic(&dir.join("dnsmasq.conf"), conf.as_bytes())?;
            self.start_dnsmasq(br).await?;
        } else if hosts != made.hosts {
            super::write_atomic(&dir.join("hosts"), hosts.as_bytes())?;
            if let Some(pid) = running {
                exec::kill(pid, libc::SIGHUP);
            }
        }
        made.conf = conf;
        made.hosts = hosts;
        self.record(br, &made)
    }

    fn dnsmasq_pid(&self, br: &str) -> Option<u32> {
        let dir = self.dir.join(br);
        let pid = exec::read_pid(&dir.join("dnsmasq.pid"))?;
        let marker = dir.join("dnsmasq.conf").display().to_string();
        exec::alive_with(pid, &marker).then_some(pid)
    }

    async fn start_dnsmasq(&self, br: &str) -> Result<(), AgentError> {
        let dir = self.dir.join(br);
        let conf = dir.join("dnsmasq.conf");
        let log = std::fs::File::create(dir.join("dnsmasq.out")).map_err(io)?;
        let mut child = tokio::process::Command::new(&self.dnsmasq)
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| AgentError::failed(format!("cannot run {}: {e}", self.dnsmasq)))?;
        let pid = child.id().unwrap_or(0);
        let mut started = false;
        for _ in 0..250 {
            if self.dnsmasq_pid(br) == Some(pid) {
                started = true;
                break;
            }
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if !started {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let out = std::fs::read_to_string(dir.join("dnsmasq.out")).unwrap_or_default();
            let log = std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default();
            return Err(AgentError::failed(format!(
                "dnsmasq on {br} did not start: {} {}",
                out.trim(),
                log.trim()
            )));
        }
        // Reaped by its own task; a restarted agent finds it by its pid file instead.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    async fn stop_dnsmasq(&self, br: &str) {
        if let Some(pid) = self.dnsmasq_pid(br) {
            exec::kill(pid, libc::SIGTERM);
            let marker = self.dir.join(br).join("dnsmasq.conf").display().to_string();
            if !exec::wait_gone(pid, &marker, std::time::Duration::from_secs(5)).await {
                exec::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Remove what the agent made for `br`.
    async fn teardown(&self, br: &str) {
        let made = self.made(br).unwrap_or_default();
        self.stop_dnsmasq(br).await;
        for a in &made.addresses {
            let _ = run(&argv(["ip", "addr", "del", a, "dev", br])).await;
        }
        if let Some(dev) = &made.device {
            let _ = run(&argv(["ip", "link", "del", dev])).await;
        }
        if made.bridge {
            let _ = run(&argv(["ip", "link", "del", br])).await;
        }
        let _ = std::fs::remove_dir_all(self.dir.join(br));
    }

    /// Make `nic`'s tap (owned by nobody, so QEMU opens it) and plug it into its bridge.
    pub async fn add_tap(&self, nic: &NicSpec) -> Result<String, AgentError> {
        let t = tap(&self.prefix, nic.uuid)?;
        let br = bridge(&self.prefix, nic)?;
        if link(&t).await.is_none() {
            run(&argv(["ip", "tuntap", "add", "dev", &t, "mode", "tap"])).await?;
        }
        run(&argv(["ip", "link", "set", &t, "master", &br])).await?;
        run(&argv(["ip", "link", "set", &t, "up"])).await?;
        Ok(t)
    }

    /// Remove `nic`'s tap (absent is fine).
    pub async fn remove_tap(&self, nic: Uuid) {
        if let Ok(t) = tap(&self.prefix, nic) {
            if link(&t).await.is_some() {
                let _ = run(&argv(["ip", "link", "del", &t])).await;
            }
        }
    }
}

fn io(e: std::io::Error) -> AgentError {
    AgentError::failed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(n: u128, l2: L2Kind, ip: &str) -> NicSpec {
        NicSpec {
            uuid: Uuid::from_u128(n),
            mac: format!("02:00:00:00:00:{n:02X}"),
            ip: Some(ip.into()),
            gateway: Some("10.77.0.1".into()),
            netmask: Some("255.255.255.0".into()),
            bridge: "br_up0".into(),
            l2,
            physical_interface: "up0".into(),
            l3: Uuid::from_u128(0xabc),
            dns: vec!["10.77.0.1".into(), "1.1.1.1".into()],
        }
    }

    #[test]
    fn names_take_the_prefix_and_stay_within_the_kernel_limit() {
        let n = nic(1, L2Kind::NoVlan, "10.77.0.5");
        assert_eq!(bridge("a", &n).unwrap(), "abr_up0");
        assert_eq!(tap("a", n.uuid).unwrap(), "atap00000001");
        assert_eq!(uplink("a", &n).unwrap(), ("aup0".to_string(), None));
        let long = bridge("a-much-longer-", &n).unwrap_err();
        assert_eq!(long.code, AgentErrorCode::InvalidArgument);
        assert!(bridge("bad name", &n).is_err());
    }

    #[test]
    fn vlan_and_vxlan_devices_are_made_on_the_physical_interface() {
        let v = nic(1, L2Kind::Vlan { vlan: 42 }, "10.77.0.5");
        let (dev, make) = uplink("", &v).unwrap();
        assert_eq!(dev, "up0.42");
        assert_eq!(
            make.unwrap().join(" "),
            "ip link add link up0 name up0.42 type vlan id 42"
        );
        let x = nic(1, L2Kind::Vxlan { vni: 5000 }, "10.77.0.5");
        let (dev, make) = uplink("b", &x).unwrap();
        assert_eq!(dev, "bvx5000");
        assert_eq!(
            make.unwrap().join(" "),
            "ip link add bvx5000 type vxlan id 5000 dstport 4789 dev bup0"
        );
    }

    #[test]
    fn netmasks_become_prefix_lengths_and_bad_ones_are_refused() {
        assert_eq!(prefix_len("255.255.255.0").unwrap(), 24);
        assert_eq!(prefix_len("255.255.252.0").unwrap(), 22);
        assert_eq!(prefix_len("0.0.0.0").unwrap(), 0);
        assert!(prefix_len("255.0.255.0").is_err());
        assert!(prefix_len("nope").is_err());
    }

    #[test]
    fn dnsmasq_serves_exactly_the_assigned_addresses_with_the_l3s_gateway_and_dns() {
        let mut a = nic(1, L2Kind::NoVlan, "10.77.0.5");
        a.mac = "02:AA:00:00:00:01".into();
        let b = nic(2, L2Kind::NoVlan, "10.77.0.6");
        let mut bare = nic(3, L2Kind::NoVlan, "x");
        bare.ip = None;
        let w = wants("k", [&a, &b, &bare]).unwrap();
        assert_eq!(w.len(), 1);
        let want = &w["kbr_up0"];
        assert_eq!(
            dnsmasq_hosts(want),
            "02:00:00:00:00:02,10.77.0.6\n02:aa:00:00:00:01,10.77.0.5\n"
        );
        let conf = dnsmasq_conf("kbr_up0", want, Path::new("/s/net/kbr_up0"));
        assert!(
            conf.contains("interface=kbr_up0\nbind-interfaces\n"),
            "{conf}"
        );
        assert!(conf.contains("port=0\n"), "no DNS service: {conf}");
        assert!(conf.contains("dhcp-hostsfile=/s/net/kbr_up0/hosts\n"));
        assert!(
            conf.contains("dhcp-range=set:l3_000000000abc,10.77.0.0,static,255.255.255.0,1h\n"),
            "a static context, no dynamic range: {conf}"
        );
        assert!(conf.contains("dhcp-option=tag:l3_000000000abc,option:router,10.77.0.1\n"));
        assert!(conf.contains("option:dns-server,10.77.0.1,1.1.1.1\n"));
        // A bad address, DNS server or MAC in a spec is refused, not served.
        let broken = nic(4, L2Kind::NoVlan, "10.77.0.300");
        assert!(wants("k", [&broken]).is_err());
        let mut injected = nic(5, L2Kind::NoVlan, "10.77.0.7");
        injected.dns = vec!["1.1.1.1\ndhcp-range=0.0.0.0".into()];
        assert!(wants("k", [&injected]).is_err());
        let mut bad_mac = nic(6, L2Kind::NoVlan, "10.77.0.8");
        bad_mac.mac = "02:00:00:00:00:0g".into();
        assert!(wants("k", [&bad_mac]).is_err());
        assert_eq!(mac("02:AA:00:00:00:01").unwrap(), "02:aa:00:00:00:01");
    }
}
