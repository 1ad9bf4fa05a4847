//! Primary storage (local storage on each host), backup storage, images and volumes.

use super::EnableState;
use stratus_store::Json;
use uuid::Uuid;

stratus_store::text_enum! {
    pub enum PrimaryStorageType {
        /// Each host's own disk; volumes live on one host.
        LocalStorage = "LocalStorage",
    }
}

stratus_store::resource! {
    /// Primary storage: where volumes live. Local storage's capacity is per host
    /// ([`LocalStorage`] rows).
    pub struct PrimaryStorage: "primary_storage" {
        name: String [index, column],
        zone_uuid: Uuid [index, column],
        kind: PrimaryStorageType [column],
        /// Path on each host.
        url: String,
        state: EnableState [column],
    }
    relations {
        zone: "zone" (zone_uuid = uuid),
        clusters: "ps_cluster" (uuid = ps_uuid),
        hosts: "local_storage" (uuid = ps_uuid),
        volumes: "volume" (uuid = ps_uuid),
    }
}

stratus_store::resource! {
    /// Primary storage attached to a cluster.
    pub struct PsCluster: "ps_cluster" {
        ps_uuid: Uuid [index, column],
        cluster_uuid: Uuid [index, column],
    }
}

stratus_store::resource! {
    /// One host's share of a local primary storage. `used_mib` is the sum of the sizes of the
    /// volumes on that host, changed in the same batch as the volume rows.
    pub struct LocalStorage: "local_storage" {
        ps_uuid: Uuid [index, column],
        host_uuid: Uuid [index, column],
        total_mib: i64 [column],
        used_mib: i64 [column],
    }
    relations {
        host: "host" (host_uuid = uuid),
        primary_storage: "primary_storage" (ps_uuid = uuid),
    }
}

/// The uuid of `host`'s share of primary storage `ps`.
pub fn local_storage_uuid(ps: Uuid, host: Uuid) -> Uuid {
    crate::ids::name_uuid(&ps.to_string(), &format!("local/{host}"))
}

/// Give `mb` back to `host`'s share of primary storage `ps`: refused if it would go below zero,
/// nothing if the share is gone.
pub fn local_storage_give_back(ps: Uuid, host: Uuid, mb: i64) -> stratus_store::Update {
    stratus_store::Update::of::<LocalStorage>(local_storage_uuid(ps, host))
        .if_exists()
        .add("used_mib", -mb)
        .at_least("used_mib", 0)
}

/// Take `mb` of `host`'s share of primary storage `ps`: refused if it would pass the share's
/// total (or the share does not exist).
pub fn local_storage_take(ps: Uuid, host: Uuid, mb: i64) -> stratus_store::Update {
    stratus_store::Update::of::<LocalStorage>(local_storage_uuid(ps, host))
        .add("used_mib", mb)
        .at_most_field("used_mib", "total_mib")
}

/// Count `mb` more on `host`'s share of primary storage `ps`, with no room check: for data that
/// is already there (moved by a migration); nothing if the share is gone.
pub fn local_storage_count(ps: Uuid, host: Uuid, mb: i64) -> stratus_store::Update {
    stratus_store::Update::of::<LocalStorage>(local_storage_uuid(ps, host))
        .if_exists()
        .add("used_mib", mb)
}

stratus_store::resource! {
    /// Backup storage: where images are kept.
    pub struct BackupStorage: "backup_storage" {
        name: String [index, column],
        url: String [column],
        total_mib: i64 [column],
        state: EnableState [column],
    }
    relations {
        zones: "bs_zone" (uuid = bs_uuid),
        images: "image" (uuid = bs_uuid),
    }
}

stratus_store::resource! {
    /// Backup storage attached to a zone.
    pub struct BsZone: "bs_zone" {
        bs_uuid: Uuid [index, column],
        zone_uuid: Uuid [index, column],
    }
}

stratus_store::text_enum! {
    pub enum ImageFormat {
        Qcow2 = "qcow2",
        /// A kernel and an initrd.
        Kernel = "kernel",
    }
}

stratus_store::resource! {
    /// A VM image on backup storage.
    pub struct Image: "image" {
        name: String [index, column],
        bs_uuid: Uuid [index, column],
        format: ImageFormat [column],
        size_mib: i64 [column],
        url: String,
        checksum: Option<String>,
        state: EnableState [column],
        /// The account it belongs to (none: the cloud's own).
        account_uuid: Option<Uuid> [index, column],
    }
    relations {
        backup_storage: "backup_storage" (bs_uuid = uuid),
    }
}

stratus_store::text_enum! {
    pub enum VolumeType {
        Root = "Root",
        Data = "Data",
    }
}

stratus_store::text_enum! {
    pub enum VolumeState {
        /// Exists only in the database (a data volume not yet placed on a host).
        NotInstantiated = "NotInstantiated",
        Creating = "Creating",
        Ready = "Ready",
        Deleting = "Deleting",
        /// Gone from its host, and from every host of its cluster, while the database had it
        /// `Ready`: its data is lost. State sync decides so, with evidence, and says so (an
        /// event `/volume/lost`, an error in the log) instead of keeping it `Ready` or
        /// forgetting it. It keeps its place and its size until it is deleted; should its copy
        /// turn up, it is `Ready` again.
        Lost = "Lost",
    }
}

impl VolumeState {
    pub fn is_transitional(self) -> bool {
        matches!(self, VolumeState::Creating | VolumeState::Deleting)
    }
}

stratus_store::resource! {
    /// A root or data volume. On local storage it lives on one host (`host_uuid`); its size
    /// counts in that host's [`LocalStorage::used_mib`] from the moment the row exists with a
    /// host.
    pub struct Volume: "volume" {
        name: String [index, column],
        kind: VolumeType [index, column],
        vm_uuid: Option<Uuid> [index, column],
        ps_uuid: Option<Uuid> [index],
        host_uuid: Option<Uuid> [index, column],
        size_mib: i64 [column],
        state: VolumeState [index, column],
        device_index: Option<i64>,
        disk_offering_uuid: Option<Uuid> [index],
        image_uuid: Option<Uuid>,
        /// Extra tags, free-form.
        tags: Json<Vec<String>>,
        /// The account it belongs to (none: the cloud's own).
        account_uuid: Option<Uuid> [index, column],
    }
    relations {
        vm: "vm" (vm_uuid = uuid),
        host: "host" (host_uuid = uuid),
        primary_storage: "primary_storage" (ps_uuid = uuid),
    }
}
