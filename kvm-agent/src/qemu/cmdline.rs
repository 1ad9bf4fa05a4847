//! The command lines the agent runs: QEMU's for a VM, `qemu-img`'s for volumes. Pure builders.

use std::net::SocketAddr;
use std::path::Path;
use stratus_agent_protocol::VmSpec;
use uuid::Uuid;

/// How QEMU runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A disk's block node in QEMU (node names are at most 31 characters; the uuid's end, where
/// time-ordered uuids differ).
pub fn node_name(volume: Uuid) -> String {
    format!("d{}", &volume.simple().to_string()[8..])
}

/// The PCI slot of the disk of `device` index and of the `nic`th NIC: fixed, so that a
/// migration's destination lays its devices out as the source did, hot-plugged disks
/// included. NICs take slots 3 to 7, disks 8 to 31.
pub const MAX_NICS: usize = 5;
pub const MAX_DISK_DEVICE: u32 = 23;

pub fn disk_slot(device: u32) -> Option<u32> {
    (device <= MAX_DISK_DEVICE).then_some(8 + device)
}

fn nic_slot(nic: usize) -> u32 {
    3 + nic as u32
}

/// A disk's device id in QEMU.
pub fn disk_id(volume: Uuid) -> String {
    format!("disk-{volume}")
}

/// The files of a VM's QEMU.
pub struct VmFiles<'a> {
    pub qmp: &'a Path,
    pub console: &'a Path,
    pub pidfile: &'a Path,
}

/// QEMU's arguments for `spec` (the binary not included). `disk` gives a volume's file (an
/// absolute path: a migration's source reopens it), `tap` a NIC's tap. With `incoming`, QEMU
/// waits there for the running VM instead of booting it.
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    files: &VmFiles<'_>,
    disk: impl Fn(Uuid) -> String,
    taps: &[String],
    incoming: Option<SocketAddr>,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.uuid),
        "-uuid".into(),
        spec.uuid.to_string(),
        "-machine".into(),
        format!("pc,accel={}", accel.as_str()),
        "-smp".into(),
        spec.cpu.max(1).to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            files.qmp.display()
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-chardev".into(),
        format!("file,id=console,path={},append=on", files.console.display()),
        "-serial".into(),
        "chardev:console".into(),
        "-pidfile".into(),
        files.pidfile.display().to_string(),
    ];
    if accel == Accel::Kvm {
        a.extend(["-cpu".into(), "host".into()]);
    }
    for d in &spec.disks {
        let node = node_name(d.volume);
        a.push("-blockdev".into());
        a.push(format!(
            "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
            disk(d.volume)
        ));
        a.push("-device".into());
        let boot = if d.device == 0 { ",bootindex=0" } else { "" };
        let slot = disk_slot(d.device).unwrap_or(0);
        a.push(format!(
            "virtio-blk-pci,drive={node},id={},addr={slot:#x}{boot}",
            disk_id(d.volume)
        ));
    }
    for (i, (n, tap)) in spec.nics.iter().zip(taps).enumerate() {
        let id = &n.uuid.simple().to_string()[20..];
        a.push("-netdev".into());
        a.push(format!("tap,id=n{id},ifname={tap},script=no,downscript=no"));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=n{id},mac={},id=nic{id},addr={:#x},romfile=",
            n.mac,
            nic_slot(i)
        ));
    }
    if let Some(at) = incoming {
        a.push("-incoming".into());
        a.push(format!("tcp:{at}"));
    }
    a
}

/// `qemu-img` arguments to make a root volume: a qcow2 overlay on its image of `size_mib`.
pub fn overlay_args(image: &Path, image_format: &str, volume: &Path, size_mib: u64) -> Vec<String> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-b".into(),
        image.display().to_string(),
        "-F".into(),
        image_format.into(),
        volume.display().to_string(),
        format!("{size_mib}M"),
    ]
}

/// `qemu-img` arguments to make a blank qcow2 volume of `size_mib`.
pub fn blank_args(volume: &Path, size_mib: u64) -> Vec<String> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        volume.display().to_string(),
        format!("{size_mib}M"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_agent_protocol::{DiskSpec, L2Kind, NicSpec};

    fn spec() -> VmSpec {
        VmSpec {
            uuid: Uuid::from_u128(1),
            name: "web".into(),
            cpu: 2,
            memory_mib: 256,
            disks: vec![
                DiskSpec {
                    volume: Uuid::from_u128(0x10),
                    device: 0,
                    size_mib: 16,
                },
                DiskSpec {
                    volume: Uuid::from_u128(0x11),
                    device: 1,
                    size_mib: 64,
                },
            ],
            nics: vec![NicSpec {
                uuid: Uuid::from_u128(0x20),
                mac: "02:00:00:00:00:20".into(),
                ip: Some("10.77.0.5".into()),
                gateway: Some("10.77.0.1".into()),
                netmask: Some("255.255.255.0".into()),
                bridge: "br_up0".into(),
                l2: L2Kind::NoVlan,
                physical_interface: "up0".into(),
                l3: Uuid::from_u128(3),
                dns: vec![],
            }],
        }
    }

    fn files() -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        (
            "/s/vms/1/qmp.sock".into(),
            "/s/vms/1/console.log".into(),
            "/s/vms/1/qemu.pid".into(),
        )
    }

    #[test]
    fn a_vm_boots_from_its_first_disk_with_its_nics_and_a_monitor() {
        let (q, c, p) = files();
        let f = VmFiles {
            qmp: &q,
            console: &c,
            pidfile: &p,
        };
        let a = qemu_args(
            &spec(),
            Accel::Tcg,
            &f,
            |v| format!("/s/volumes/{v}.qcow2"),
            &["ktap00000000".into()],
            None,
        )
        .join(" ");
        assert!(
            a.contains("-machine pc,accel=tcg -smp 2 -m 256M -nodefaults"),
            "{a}"
        );
        assert!(!a.contains("-cpu host"), "host CPU only under KVM: {a}");
        assert!(a.contains(
            "-chardev socket,id=qmp,path=/s/vms/1/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control"
        ));
        assert!(a.contains("-serial chardev:console"));
        let root = Uuid::from_u128(0x10);
        assert!(a.contains(&format!(
            "-blockdev driver=qcow2,node-name={},file.driver=file,file.filename=/s/volumes/{root}.qcow2 \
             -device virtio-blk-pci,drive={},id=disk-{root},addr=0x8,bootindex=0",
            node_name(root),
            node_name(root)
        )));
        assert_eq!(
            a.matches("bootindex").count(),
            1,
            "only the root disk boots"
        );
        assert!(
            a.contains(
                "-netdev tap,id=n000000000020,ifname=ktap00000000,script=no,downscript=no \
                 -device virtio-net-pci,netdev=n000000000020,mac=02:00:00:00:00:20,id=nic000000000020,addr=0x3,romfile="
            ),
            "{a}"
        );
        assert!(
            a.contains("id=disk-00000000-0000-0000-0000-000000000011,addr=0x9 "),
            "{a}"
        );
        assert_eq!(disk_slot(MAX_DISK_DEVICE), Some(31));
        assert_eq!(disk_slot(MAX_DISK_DEVICE + 1), None);
        assert!(!a.contains("-incoming"));
        let kvm = qemu_args(&spec(), Accel::Kvm, &f, |v| v.to_string(), &[], None).join(" ");
        assert!(kvm.contains("accel=kvm") && kvm.contains("-cpu host"));
        let inc = qemu_args(
            &spec(),
            Accel::Tcg,
            &f,
            |v| v.to_string(),
            &[],
            Some("127.0.0.1:4444".parse().unwrap()),
        );
        assert_eq!(inc[inc.len() - 2..], ["-incoming", "tcp:127.0.0.1:4444"]);
    }

    #[test]
    fn node_names_fit_qemus_limit() {
        assert!(node_name(Uuid::max()).len() <= 31);
    }

    #[test]
    fn volumes_are_qcow2_overlays_on_their_image_or_blank() {
        assert_eq!(
            overlay_args(
                Path::new("/s/images/i.qcow2"),
                "qcow2",
                Path::new("/s/volumes/v.qcow2"),
                16
            )
            .join(" "),
            "create -q -f qcow2 -b /s/images/i.qcow2 -F qcow2 /s/volumes/v.qcow2 16M"
        );
        assert_eq!(
            blank_args(Path::new("/s/volumes/v.qcow2"), 64).join(" "),
            "create -q -f qcow2 /s/volumes/v.qcow2 64M"
        );
    }
}
