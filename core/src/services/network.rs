//! L2 and L3 networks, IP ranges and IP address management.
//!
//! Addresses of one L3 are handed out in that L3's queue (`l3-<uuid>`), so allocation needs no
//! retries between concurrent callers; the [`UsedIp`] row's uuid is derived from (L3, address),
//! which makes a duplicate impossible even across management nodes. The network service owns a
//! NIC's addressing fields (`ip`, `gateway`, `netmask`) and changes them in the same batch as the
//! address rows.

use super::cascade::SimpleParticipant;
use super::{check_name, Cloud};
use crate::bus::{Bus, Message};
use crate::cascade::CascadeParticipant;
use crate::error::{Error, ErrorCode};
use crate::ids::name_uuid;
use crate::model::*;
use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use stratus_store::ErrorClass;
use stratus_store::{Batch, Db, Expect, Json, Query, Row, Update, Value};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateL2Network {
    pub zone_uuid: Uuid,
    pub name: String,
    #[serde(default = "novlan")]
    pub kind: L2Type,
    #[serde(default = "eth0")]
    pub physical_interface: String,
    #[serde(default)]
    pub vlan: Option<i64>,
    #[serde(default)]
    pub vni: Option<i64>,
}
fn novlan() -> L2Type {
    L2Type::NoVlan
}
fn eth0() -> String {
    "eth0".into()
}
impl Message for CreateL2Network {
    type Reply = Row<L2Network>;
    const NAME: &'static str = "l2.create";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachL2ToCluster {
    pub l2_uuid: Uuid,
    pub cluster_uuid: Uuid,
}
impl Message for AttachL2ToCluster {
    type Reply = ();
    const NAME: &'static str = "l2.attach";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.l2_uuid)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateL3Network {
    pub l2_uuid: Uuid,
    pub name: String,
    #[serde(default)]
    pub dns: Vec<String>,
    /// The account it belongs to, set by the API from the caller (none: the cloud's own).
    #[serde(default)]
    pub account_uuid: Option<Uuid>,
}
impl Message for CreateL3Network {
    type Reply = Row<L3Network>;
    const NAME: &'static str = "l3.create";
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddIpRange {
    pub l3_uuid: Uuid,
    #[serde(default)]
    pub name: Option<String>,
    pub start_ip: String,
    pub end_ip: String,
    pub gateway: String,
    /// Prefix length (24) or, instead, a netmask.
    #[serde(default)]
    pub prefix_len: Option<u32>,
    #[serde(default)]
    pub netmask: Option<String>,
    #[serde(default)]
    pub excluded: Vec<String>,
}
impl Message for AddIpRange {
    type Reply = Row<IpRange>;
    const NAME: &'static str = "ip-range.add";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.l3_uuid)
    }
}

/// Hand an address of `l3` to a NIC (a given one, or any free one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllocateIp {
    pub l3_uuid: Uuid,
    pub nic_uuid: Uuid,
    #[serde(default)]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpAllocation {
    pub ip: String,
    pub gateway: String,
    pub netmask: String,
    pub range_uuid: Uuid,
}
impl Message for AllocateIp {
    type Reply = IpAllocation;
    const NAME: &'static str = "ip.allocate";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.l3_uuid)
    }
}

/// Return every address a NIC holds on `l3` (idempotent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseIps {
    pub l3_uuid: Uuid,
    pub nic_uuid: Uuid,
}
impl Message for ReleaseIps {
    type Reply = u32;
    const NAME: &'static str = "ip.release";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.l3_uuid)
    }
}

fn l3_queue(l3: Uuid) -> String {
    format!("l3-{l3}")
}

/// A parsed, validated range.
struct RangeSpec {
    start: i64,
    end: i64,
    gateway: i64,
    prefix: u32,
    excluded: Vec<String>,
}

fn parse_ip(what: &str, ip: &str) -> Result<i64, Error> {
    ip_to_int(ip).ok_or_else(|| Error::invalid(format!("{what} {ip:?} is not an IPv4 address")))
}

fn netmask_to_prefix(mask: &str) -> Result<u32, Error> {
    let m = parse_ip("netmask", mask)? as u32;
    let p = m.leading_ones();
    if m.checked_shl(p).unwrap_or(0) != 0 {
        return Err(Error::invalid(format!("netmask {mask} is not contiguous")));
    }
    Ok(p)
}

fn validate_range(m: &AddIpRange) -> Result<RangeSpec, Error> {
    let start = parse_ip("start_ip", &m.start_ip)?;
    let end = parse_ip("end_ip", &m.end_ip)?;
    let gateway = parse_ip("gateway", &m.gateway)?;
    let prefix = match (&m.prefix_len, &m.netmask) {
        (Some(p), _) => *p,
        (None, Some(mask)) => netmask_to_prefix(mask)?,
        (None, None) => return Err(Error::invalid("give prefix_len (e.g. 24) or netmask")),
    };
    if !(8..=30).contains(&prefix) {
        return Err(Error::invalid(format!(
            "prefix length must be from 8 to 30; got {prefix}"
        )));
    }
    if start > end {
        return Err(Error::invalid(format!(
            "start_ip {} is after end_ip {}",
            m.start_ip, m.end_ip
        )));
    }
    let mask: i64 = (u32::MAX << (32 - prefix)) as i64;
    let net = gateway & mask;
    let broadcast = net | (!mask & 0xffff_ffff);
    let cidr = format!("{}/{prefix}", int_to_ip(net));
    for (what, v) in [("start_ip", start), ("end_ip", end)] {
        if v & mask != net {
            return Err(Error::invalid(format!(
                "{what} {} is outside {cidr}, the network of gateway {}",
                int_to_ip(v),
                m.gateway
            )));
        }
        if v == net || v == broadcast {
            return Err(Error::invalid(format!(
                "{what} {} is the network or broadcast address of {cidr}",
                int_to_ip(v)
            )));
        }
    }
    if gateway == net || gateway == broadcast {
        return Err(Error::invalid(format!(
            "gateway {} is not a host address of {cidr}",
            m.gateway
        )));
    }
    for x in &m.excluded {
        let v = parse_ip("excluded address", x)?;
        if v < start || v > end {
            return Err(Error::invalid(format!(
                "excluded address {x} is outside the range"
            )));
        }
    }
    Ok(RangeSpec {
        start,
        end,
        gateway,
        prefix,
        excluded: m.excluded.clone(),
    })
}

/// Addresses of a range that are never handed out (excluded ones and the gateway).
fn blocked(r: &IpRange) -> BTreeSet<i64> {
    let mut b: BTreeSet<i64> = r.excluded.0.iter().filter_map(|x| ip_to_int(x)).collect();
    if let Some(g) = ip_to_int(&r.gateway) {
        if g >= r.start_int && g <= r.end_int {
            b.insert(g);
        }
    }
    b
}

/// Try to take address `ip` of range `r` for `nic`: the address row, the range's counter and the
/// NIC's fields in one batch. `Ok(false)`: the address is taken.
async fn take(db: &Db, l3: Uuid, r: &Row<IpRange>, nic: Uuid, ip: i64) -> Result<bool, Error> {
    let text = int_to_ip(ip);
    let used = Row::new(
        used_ip_uuid(l3, &text),
        UsedIp {
            l3_uuid: l3,
            range_uuid: r.uuid,
            ip: text.clone(),
            ip_int: ip,
            nic_uuid: nic,
        },
    );
    let size = r.end_int - r.start_int + 1;
    let b = Batch::new()
        .insert(&used)
        .update(
            Update::of::<IpRange>(r.uuid)
                .add("used", 1)
                .at_most("used", size),
        )
        .update(
            Update::of::<VmNic>(nic)
                .set("ip", text)
                .set("gateway", r.gateway.clone())
                .set("netmask", r.netmask.clone()),
        );
    match db.commit(b).await {
        Ok(_) => Ok(true),
        Err(e) if e.class() == ErrorClass::AlreadyExists => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// How many consecutive addresses one probe of the allocator reads.
const IP_WINDOW: i64 = 16;

async fn allocate(c: &Cloud, m: &AllocateIp) -> Result<IpAllocation, Error> {
    let db = c.db();
    let l3 = c.get::<L3Network>(m.l3_uuid).await?;
    // Idempotent: a NIC that already holds an address on this L3 keeps it.
    if let Some(have) = db
        .select::<UsedIp>(
            &Query::of::<UsedIp>()
                .eq("nic_uuid", m.nic_uuid)
                .eq("l3_uuid", l3.uuid),
        )
        .await?
        .into_iter()
        .next()
    {
        let r = c.get::<IpRange>(have.range_uuid).await?;
        return Ok(IpAllocation {
            ip: have.ip.clone(),
            gateway: r.gateway.clone(),
            netmask: r.netmask.clone(),
            range_uuid: r.uuid,
        });
    }
    let ranges = db
        .select::<IpRange>(
            &Query::of::<IpRange>()
                .eq("l3_uuid", l3.uuid)
                .sort_asc("start_int"),
        )
        .await?;
    if ranges.is_empty() {
        return Err(Error::new(
            ErrorCode::CapacityExhausted,
            format!("L3 network {} has no IP range", l3.uuid),
        ));
    }
    let ok = |r: &Row<IpRange>, ip: String| IpAllocation {
        ip,
        gateway: r.gateway.clone(),
        netmask: r.netmask.clone(),
        range_uuid: r.uuid,
    };
    if let Some(want) = &m.ip {
        let v = parse_ip("ip", want)?;
        let r = ranges
            .iter()
            .find(|r| v >= r.start_int && v <= r.end_int)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{want} is in no IP range of L3 network {}",
                    l3.uuid
                ))
            })?;
        if blocked(r).contains(&v) {
            return Err(Error::invalid(format!(
                "{want} is excluded or the gateway of its range"
            )));
        }
        if take(db, l3.uuid, r, m.nic_uuid, v).await? {
            return Ok(ok(r, int_to_ip(v)));
        }
        return Err(Error::new(
            ErrorCode::AlreadyExists,
            format!("{want} is already in use on L3 network {}", l3.uuid),
        ));
    }
    let mut total = 0i64;
    let mut used_total = 0i64;
    for r in &ranges {
        let size = r.end_int - r.start_int + 1;
        let block = blocked(r);
        total += size - block.len() as i64;
        used_total += r.used;
        if r.used + block.len() as i64 >= size {
            continue;
        }
        // Windows of consecutive addresses from a random start, wrapping around the range: one
        // indexed query says which of a window's addresses are taken. A window is all taken only
        // when the range is nearly full, so the cost stays flat as it fills. (The former
        // fallback, after 16 random probes, read every address of the range, and creates slowed
        // as the range filled; windows measured faster on a nearly full range, docs/perf-log.md.)
        let start = c.engine.ids.with_rng(|g| g.gen_range(0..size));
        let mut offset = 0;
        while offset < size {
            let window: Vec<i64> = (offset..size.min(offset + IP_WINDOW))
                .map(|k| r.start_int + (start + k) % size)
                .collect();
            offset += IP_WINDOW;
            let used: BTreeSet<i64> = db
                .select::<UsedIp>(
                    &Query::of::<UsedIp>()
                        .eq("range_uuid", r.uuid)
                        .is_in("ip_int", window.iter().copied()),
                )
                .await?
                .iter()
                .map(|u| u.ip_int)
                .collect();
            for v in window {
                if !used.contains(&v)
                    && !block.contains(&v)
                    && take(db, l3.uuid, r, m.nic_uuid, v).await?
                {
                    return Ok(ok(r, int_to_ip(v)));
                }
            }
        }
    }
    Err(Error::new(
        ErrorCode::CapacityExhausted,
        format!(
            "no free IP address on L3 network {} ({used_total} of {total} addresses in use)",
            l3.uuid
        ),
    ))
}

/// Return the addresses `nic` holds on `l3`; clears the NIC's address fields if it still exists.
pub async fn release(db: &Db, l3: Uuid, nic: Uuid) -> Result<u32, Error> {
    let held = db
        .select::<UsedIp>(&Query::of::<UsedIp>().eq("nic_uuid", nic).eq("l3_uuid", l3))
        .await?;
    let mut n = 0;
    for u in held {
        let b = Batch::new()
            .delete::<UsedIp>(u.uuid, Expect::Exists)
            .update(
                Update::of::<IpRange>(u.range_uuid)
                    .if_exists()
                    .add("used", -1)
                    .at_least("used", 0),
            )
            .update(
                Update::of::<VmNic>(nic)
                    .if_exists()
                    .set("ip", Value::Null)
                    .set("gateway", Value::Null)
                    .set("netmask", Value::Null),
            );
        match db.commit(b).await {
            Ok(_) => n += 1,
            Err(e) if e.class() == ErrorClass::NotFound => {}
            Err(e) => {
                let what = format!("releasing {} of range {}", u.ip, u.range_uuid);
                return Err(super::give_back_err(e, what));
            }
        }
    }
    Ok(n)
}

/// Addresses in use refuse the deletion of their range unless forced; forced, they are returned.
struct UsedIpParticipant {
    db: Db,
}

#[async_trait]
impl CascadeParticipant for UsedIpParticipant {
    fn kind(&self) -> &'static str {
        "used_ip"
    }
    fn parents(&self) -> &'static [&'static str] {
        &["ip_range"]
    }
    async fn children(&self, _pk: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
        crate::cascade::children_by_field(&self.db, "used_ip", "range_uuid", parent).await
    }
    async fn check(&self, uuid: Uuid) -> Result<(), Error> {
        let u = self.db.must_get::<UsedIp>(uuid).await?;
        Err(Error::new(
            ErrorCode::InUse,
            format!("{} is held by NIC {}", u.ip, u.nic_uuid),
        ))
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
        if let Some(u) = self.db.get::<UsedIp>(uuid).await? {
            release(&self.db, u.l3_uuid, u.nic_uuid).await?;
        }
        Ok(())
    }
}

pub fn participants(db: &Db, _bus: &Bus) -> Vec<Arc<dyn CascadeParticipant>> {
    vec![
        SimpleParticipant::new(db, "l2_network", &["zone"], &[("zone", "zone_uuid")]).arc(),
        SimpleParticipant::new(
            db,
            "l2_cluster",
            &["l2_network", "cluster"],
            &[("l2_network", "l2_uuid"), ("cluster", "cluster_uuid")],
        )
        .arc(),
        SimpleParticipant::new(
            db,
            "l3_network",
            &["l2_network"],
            &[("l2_network", "l2_uuid")],
        )
        .arc(),
        SimpleParticipant::new(
            db,
            "ip_range",
            &["l3_network"],
            &[("l3_network", "l3_uuid")],
        )
        .arc(),
        Arc::new(UsedIpParticipant { db: db.clone() }),
    ]
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: CreateL2Network| async move {
        check_name("L2 network", &m.name)?;
        let zone = c.get::<Zone>(m.zone_uuid).await?;
        match m.kind {
            L2Type::NoVlan if m.vlan.is_some() || m.vni.is_some() => {
                return Err(Error::invalid(
                    "a NoVlan L2 network takes neither vlan nor vni",
                ))
            }
            L2Type::Vlan if !m.vlan.is_some_and(|v| (1..=4094).contains(&v)) => {
                return Err(Error::invalid(format!(
                    "a Vlan L2 network needs vlan from 1 to 4094; got {:?}",
                    m.vlan
                )))
            }
            L2Type::Vxlan if !m.vni.is_some_and(|v| (1..=16_777_214).contains(&v)) => {
                return Err(Error::invalid(format!(
                    "a Vxlan L2 network needs vni from 1 to 16777214; got {:?}",
                    m.vni
                )))
            }
            _ => {}
        }
        if m.physical_interface.trim().is_empty() {
            return Err(Error::invalid("physical_interface must not be empty"));
        }
        let row = Row::new(
            c.engine.ids.uuid(),
            L2Network {
                name: m.name,
                zone_uuid: zone.uuid,
                kind: m.kind,
                physical_interface: m.physical_interface,
                vlan: m.vlan,
                vni: m.vni,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: AttachL2ToCluster| async move {
        let l2 = c.get::<L2Network>(m.l2_uuid).await?;
        let cluster = c.get::<Cluster>(m.cluster_uuid).await?;
        if l2.zone_uuid != cluster.zone_uuid {
            return Err(Error::invalid(format!(
                "L2 network {} is in zone {}, cluster {} in zone {}",
                l2.uuid, l2.zone_uuid, cluster.uuid, cluster.zone_uuid
            )));
        }
        let link = Row::new(
            name_uuid(&l2.uuid.to_string(), &format!("cluster/{}", cluster.uuid)),
            L2Cluster {
                l2_uuid: l2.uuid,
                cluster_uuid: cluster.uuid,
            },
        );
        match c.db().insert(link).await {
            Ok(_) => Ok(()),
            Err(e) if e.class() == ErrorClass::AlreadyExists => Err(Error::new(
                ErrorCode::AlreadyExists,
                format!(
                    "L2 network {} is already attached to cluster {}",
                    l2.uuid, cluster.uuid
                ),
            )),
            Err(e) => Err(e.into()),
        }
    })?;
    cloud.handle(|c: Arc<Cloud>, m: CreateL3Network| async move {
        check_name("L3 network", &m.name)?;
        let l2 = c.get::<L2Network>(m.l2_uuid).await?;
        for d in &m.dns {
            parse_ip("dns server", d)?;
        }
        let row = Row::new(
            c.engine.ids.uuid(),
            L3Network {
                name: m.name,
                l2_uuid: l2.uuid,
                zone_uuid: l2.zone_uuid,
                dns: Json(m.dns),
                state: EnableState::Enabled,
                account_uuid: m.account_uuid,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: AddIpRange| async move {
        let l3 = c.get::<L3Network>(m.l3_uuid).await?;
        let spec = validate_range(&m)?;
        let queue = l3_queue(l3.uuid);
        c.engine
            .queues
            .run(&queue, 1, async {
                let others = c
                    .db()
                    .select::<IpRange>(&Query::of::<IpRange>().eq("l3_uuid", l3.uuid))
                    .await?;
                if let Some(o) = others
                    .iter()
                    .find(|o| spec.start <= o.end_int && o.start_int <= spec.end)
                {
                    return Err(Error::invalid(format!(
                        "range {}-{} overlaps range {} ({}-{}) of L3 network {}",
                        m.start_ip, m.end_ip, o.uuid, o.start_ip, o.end_ip, l3.uuid
                    )));
                }
                let row = Row::new(
                    c.engine.ids.uuid(),
                    IpRange {
                        l3_uuid: l3.uuid,
                        name: m
                            .name
                            .clone()
                            .unwrap_or_else(|| format!("{}-{}", m.start_ip, m.end_ip)),
                        start_ip: int_to_ip(spec.start),
                        end_ip: int_to_ip(spec.end),
                        start_int: spec.start,
                        end_int: spec.end,
                        prefix_len: spec.prefix as i64,
                        netmask: prefix_to_netmask(spec.prefix),
                        gateway: int_to_ip(spec.gateway),
                        excluded: Json(spec.excluded.clone()),
                        used: 0,
                    },
                );
                Ok(c.db().insert(row).await?)
            })
            .await
    })?;
    cloud.handle(|c: Arc<Cloud>, m: AllocateIp| async move {
        let queue = l3_queue(m.l3_uuid);
        c.engine.queues.run(&queue, 1, allocate(&c, &m)).await
    })?;
    cloud.handle(|c: Arc<Cloud>, m: ReleaseIps| async move {
        let queue = l3_queue(m.l3_uuid);
        c.engine
            .queues
            .run(&queue, 1, release(c.db(), m.l3_uuid, m.nic_uuid))
            .await
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &str, end: &str, gw: &str, prefix: u32) -> AddIpRange {
        AddIpRange {
            l3_uuid: Uuid::nil(),
            name: None,
            start_ip: start.into(),
            end_ip: end.into(),
            gateway: gw.into(),
            prefix_len: Some(prefix),
            netmask: None,
            excluded: vec![],
        }
    }

    #[test]
    fn ranges_are_validated_against_the_gateway_cidr() {
        assert!(validate_range(&range("10.0.0.10", "10.0.0.200", "10.0.0.1", 24)).is_ok());
        let e = validate_range(&range("10.0.1.10", "10.0.1.20", "10.0.0.1", 24))
            .err()
            .unwrap();
        assert!(e.message.contains("outside 10.0.0.0/24"), "{}", e.message);
        let e = validate_range(&range("10.0.0.20", "10.0.0.10", "10.0.0.1", 24))
            .err()
            .unwrap();
        assert!(e.message.contains("after"), "{}", e.message);
        let e = validate_range(&range("10.0.0.0", "10.0.0.10", "10.0.0.1", 24))
            .err()
            .unwrap();
        assert!(e.message.contains("network or broadcast"), "{}", e.message);
        let e = validate_range(&range("10.0.0.10", "10.0.0.20", "10.0.0.255", 24))
            .err()
            .unwrap();
        assert!(e.message.contains("not a host address"), "{}", e.message);
        let e = validate_range(&range("10.0.0.10", "10.0.0.20", "x", 24))
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let mut m = range("10.0.0.10", "10.0.0.20", "10.0.0.1", 24);
        m.prefix_len = None;
        m.netmask = Some("255.255.0.0".into());
        assert_eq!(validate_range(&m).unwrap().prefix, 16);
        m.netmask = Some("255.0.255.0".into());
        assert!(validate_range(&m).is_err());
    }
}
