//! The lab: what it takes to run Ferry for real on one machine: the test appliance (a
//! bootable kernel + initramfs built from Debian packages), network namespaces that
//! stand in for hosts, single-VM sandboxes for driver tests, the whole cluster (`lab`:
//! switches, hosts, etcd, agents, fault injection), and the harness the benchmarks
//! and the tour share (`harness`).

pub mod appliance;
mod cpio;
pub mod debian;
pub mod defaults;
pub mod disk_boot;
pub mod flows;
pub mod harness;
pub mod lab;
pub mod netns;
pub mod sandbox;
pub mod workload;
