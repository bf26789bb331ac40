//! The lab: what it takes to run Ferry for real on one machine. For now the test
//! appliance (a bootable kernel + initramfs built from Debian packages) and the
//! network namespaces that stand in for hosts; later the whole cluster.

pub mod appliance;
mod cpio;
pub mod defaults;
pub mod netns;
pub mod sandbox;
