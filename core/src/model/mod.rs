//! The resource kinds of the cloud, each declared once (`resource!`): the struct, its storage,
//! its query fields and relations, and its CLI columns come from that one declaration.

mod audit;
mod compute;
mod identity;
mod infra;
mod network;
mod storage;
mod webhook;

pub use audit::*;
pub use compute::*;
pub use identity::*;
pub use infra::*;
pub use network::*;
pub use storage::*;
pub use webhook::*;

use stratus_store::{KindMeta, Resource, Schema};

stratus_store::text_enum! {
    /// Administrative state of resources that can be switched off.
    pub enum EnableState {
        Enabled = "Enabled",
        Disabled = "Disabled",
    }
}

/// Every kind of the cloud (not the engine's own).
pub fn kinds() -> Vec<&'static KindMeta> {
    vec![
        Zone::META,
        Cluster::META,
        Host::META,
        Reservation::META,
        PrimaryStorage::META,
        PsCluster::META,
        LocalStorage::META,
        BackupStorage::META,
        BsZone::META,
        Image::META,
        Volume::META,
        L2Network::META,
        L2Cluster::META,
        L3Network::META,
        IpRange::META,
        UsedIp::META,
        VmNic::META,
        InstanceOffering::META,
        DiskOffering::META,
        Vm::META,
        Account::META,
        User::META,
        ApiToken::META,
        Audit::META,
        Webhook::META,
    ]
}

/// The full schema: the cloud's kinds and the engine's.
pub fn schema() -> Schema {
    let mut s = Schema::new();
    for k in kinds().into_iter().chain(crate::engine::engine_kinds()) {
        s.add(k);
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_is_consistent() {
        let s = super::schema();
        s.validate().unwrap();
        assert!(s.kinds().count() >= 23);
    }
}
