//! # stratus-kvm-agent
//!
//! The host agent of Stratus. It will hold:
//! - the agent protocol types (`/host/connect`, `/host/ping`, `/vm/start`, ... with task ids and
//!   callback URLs), shared by the management side and the agent;
//! - the agent HTTP server, written once and generic over a `Hypervisor` trait;
//! - the QEMU/QMP backend (qcow2 volumes via qemu-img, bridge + tap networking, dnsmasq DHCP),
//!   std build only. The simulated backend lives in `stratus-sim-world`.
