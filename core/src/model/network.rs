//! L2 and L3 networks, IP ranges, allocated addresses and VM NICs.

use super::EnableState;
use stratus_store::Json;
use uuid::Uuid;

stratus_store::text_enum! {
    pub enum L2Type {
        /// A plain bridge on a physical interface.
        NoVlan = "NoVlan",
        Vlan = "Vlan",
        Vxlan = "Vxlan",
    }
}

stratus_store::resource! {
    /// A layer-2 network. Hosts of the clusters it is attached to can carry its VMs.
    pub struct L2Network: "l2_network" {
        name: String [index, column],
        zone_uuid: Uuid [index, column],
        kind: L2Type [column],
        physical_interface: String [column],
        vlan: Option<i64> [column],
        vni: Option<i64> [column],
    }
    relations {
        zone: "zone" (zone_uuid = uuid),
        clusters: "l2_cluster" (uuid = l2_uuid),
        l3_networks: "l3_network" (uuid = l2_uuid),
    }
}

stratus_store::resource! {
    /// An L2 network attached to a cluster.
    pub struct L2Cluster: "l2_cluster" {
        l2_uuid: Uuid [index, column],
        cluster_uuid: Uuid [index, column],
    }
}

stratus_store::resource! {
    /// A layer-3 network over an L2: ranges of IPv4 addresses handed to NICs.
    pub struct L3Network: "l3_network" {
        name: String [index, column],
        l2_uuid: Uuid [index, column],
        zone_uuid: Uuid [index],
        dns: Json<Vec<String>>,
        state: EnableState [column],
        /// The account it belongs to (none: the cloud's own).
        account_uuid: Option<Uuid> [index, column],
    }
    relations {
        l2: "l2_network" (l2_uuid = uuid),
        ip_ranges: "ip_range" (uuid = l3_uuid),
        nics: "vm_nic" (uuid = l3_uuid),
        used_ips: "used_ip" (uuid = l3_uuid),
    }
}

stratus_store::resource! {
    /// A range of IPv4 addresses of an L3 network, inside one CIDR with its gateway.
    pub struct IpRange: "ip_range" {
        l3_uuid: Uuid [index, column],
        name: String [column],
        start_ip: String [column],
        end_ip: String [column],
        start_int: i64 [index],
        end_int: i64 [index],
        /// e.g. 24.
        prefix_len: i64 [column],
        netmask: String,
        gateway: String [column],
        /// Addresses never handed out.
        excluded: Json<Vec<String>>,
        /// Addresses handed out (changed in the same batch as the [`UsedIp`] rows).
        used: i64 [column],
    }
    relations {
        l3: "l3_network" (l3_uuid = uuid),
        used_ips: "used_ip" (uuid = range_uuid),
    }
}

stratus_store::resource! {
    /// An address handed to a NIC. The uuid is derived from (L3, address), so one address can be
    /// handed out only once per L3.
    pub struct UsedIp: "used_ip" {
        l3_uuid: Uuid [index, column],
        range_uuid: Uuid [index],
        ip: String [column],
        ip_int: i64 [index],
        nic_uuid: Uuid [index, column],
    }
    relations {
        nic: "vm_nic" (nic_uuid = uuid),
        l3: "l3_network" (l3_uuid = uuid),
    }
}

/// The uuid of the row for address `ip` on `l3`.
pub fn used_ip_uuid(l3: Uuid, ip: &str) -> Uuid {
    crate::ids::name_uuid(&l3.to_string(), &format!("ip/{ip}"))
}

stratus_store::resource! {
    /// A VM's network interface on an L3 network.
    pub struct VmNic: "vm_nic" {
        vm_uuid: Uuid [index, column],
        l3_uuid: Uuid [index, column],
        mac: String [unique, column],
        ip: Option<String> [index, column],
        gateway: Option<String>,
        netmask: Option<String>,
        device_index: i64,
    }
    relations {
        vm: "vm" (vm_uuid = uuid),
        l3: "l3_network" (l3_uuid = uuid),
        used_ips: "used_ip" (uuid = nic_uuid),
    }
}

/// IPv4 text ⇄ integer.
pub fn ip_to_int(ip: &str) -> Option<i64> {
    let addr: std::net::Ipv4Addr = ip.trim().parse().ok()?;
    Some(u32::from(addr) as i64)
}

pub fn int_to_ip(i: i64) -> String {
    std::net::Ipv4Addr::from(i as u32).to_string()
}

/// The netmask of a prefix length (24 → 255.255.255.0).
pub fn prefix_to_netmask(prefix: u32) -> String {
    let mask: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    std::net::Ipv4Addr::from(mask).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_conversions() {
        assert_eq!(ip_to_int("10.0.0.1"), Some(0x0a00_0001));
        assert_eq!(int_to_ip(0x0a00_0001), "10.0.0.1");
        assert_eq!(ip_to_int("10.0.0.256"), None);
        assert_eq!(prefix_to_netmask(24), "255.255.255.0");
        assert_eq!(prefix_to_netmask(0), "0.0.0.0");
        assert_eq!(prefix_to_netmask(32), "255.255.255.255");
    }
}
