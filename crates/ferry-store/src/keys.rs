//! The key layout (DESIGN.md, "Cluster state"), in one place.

use ferry_model::{HostName, VmName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` like `/ferry/`; a missing trailing slash is added.
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// API tokens (`ferry_model::access::TokenRecord`), by id.
    pub fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }

    pub fn token(&self, id: &str) -> String {
        format!("{}tokens/{id}", self.prefix)
    }

    /// Portal users (`ferry_model::access::UserRecord`).
    pub fn users(&self) -> String {
        format!("{}users/", self.prefix)
    }

    pub fn user(&self, name: &ferry_model::UserName) -> String {
        format!("{}users/{name}", self.prefix)
    }

    /// Projects (`ferry_model::access::ProjectRecord`).
    pub fn projects(&self) -> String {
        format!("{}projects/", self.prefix)
    }

    pub fn project(&self, name: &ferry_model::ProjectName) -> String {
        format!("{}projects/{name}", self.prefix)
    }

    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }

    pub fn host(&self, host: &HostName) -> String {
        format!("{}hosts/{host}", self.prefix)
    }

    pub fn vms(&self) -> String {
        format!("{}vms/", self.prefix)
    }

    pub fn vm_spec(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/spec", self.prefix)
    }

    pub fn vm_placement(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/placement", self.prefix)
    }

    pub fn vm_status(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/status", self.prefix)
    }

    /// The VM's checkpoints (`ferry_model::checkpoint::CheckpointSet`).
    pub fn vm_checkpoints(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/checkpoints", self.prefix)
    }

    /// Templates (`ferry_model::checkpoint::TemplateRecord`).
    pub fn templates(&self) -> String {
        format!("{}templates/", self.prefix)
    }

    pub fn template(&self, name: &str) -> String {
        format!("{}templates/{name}", self.prefix)
    }

    /// The VM's recent failures and restarts (`ferry_model::ha::RestartLog`).
    pub fn vm_restarts(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/restarts", self.prefix)
    }

    /// The op that holds the VM (`ferry_model::ops::OpLock`).
    pub fn vm_op(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/op", self.prefix)
    }

    /// The monitors the user added to the VM (`ferry_model::monitor::MonitorSet`).
    pub fn vm_monitors(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/monitors", self.prefix)
    }

    /// The VM's monitors as its host last saw them (`ferry_model::monitor::VmHealth`).
    pub fn vm_health(&self, vm: &VmName) -> String {
        format!("{}vms/{vm}/health", self.prefix)
    }

    /// A host's monitors as its agent last saw them (`ferry_model::monitor::HostHealth`).
    pub fn host_health(&self, host: &HostName) -> String {
        format!("{}host-health/{host}", self.prefix)
    }

    pub fn host_healths(&self) -> String {
        format!("{}host-health/", self.prefix)
    }

    /// A host's request to be fenced (`ferry_model::ha::FenceRequest`).
    pub fn fence_request(&self, host: &HostName) -> String {
        format!("{}fence-requests/{host}", self.prefix)
    }

    pub fn fence_requests(&self) -> String {
        format!("{}fence-requests/", self.prefix)
    }

    /// How to power a host off from elsewhere (`ferry_model::ha::FenceDevice`).
    pub fn fence_device(&self, host: &HostName) -> String {
        format!("{}fence/{host}", self.prefix)
    }

    pub fn fence_device_prefix(&self) -> String {
        format!("{}fence/", self.prefix)
    }

    pub fn images(&self) -> String {
        format!("{}images/", self.prefix)
    }

    pub fn image(&self, name: &str) -> String {
        format!("{}images/{name}", self.prefix)
    }

    pub fn network(&self, name: &str) -> String {
        format!("{}networks/{name}", self.prefix)
    }

    /// An address taken on a network (`ipam/business/10.0.0.5`).
    pub fn address(&self, network: &str, address: &str) -> String {
        format!("{}ipam/{network}/{address}", self.prefix)
    }

    pub fn addresses(&self, network: &str) -> String {
        format!("{}ipam/{network}/", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}events/", self.prefix)
    }

    /// Events sort by time: zero-padded milliseconds, then a sequence number.
    pub fn event(&self, at_ms: u64, sequence: u64) -> String {
        format!("{}events/{at_ms:015}-{sequence:06}", self.prefix)
    }

    pub fn ops(&self) -> String {
        format!("{}ops/", self.prefix)
    }

    pub fn op(&self, id: &str) -> String {
        format!("{}ops/{id}", self.prefix)
    }

    pub fn incomings(&self) -> String {
        format!("{}incoming/", self.prefix)
    }

    /// The destination's answer to a migration being prepared.
    pub fn incoming(&self, op: &str) -> String {
        format!("{}incoming/{op}", self.prefix)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// Which VM a key under `vms/` belongs to, and which of its records it is.
    pub fn parse_vm_key<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("vms/")?;
        rest.split_once('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_design_layout() {
        let keys = Keys::new("/ferry");
        let vm: VmName = "web-1".parse().unwrap();
        assert_eq!(keys.vm_spec(&vm), "/ferry/vms/web-1/spec");
        assert_eq!(keys.vm_placement(&vm), "/ferry/vms/web-1/placement");
        assert_eq!(keys.host(&"host1".parse().unwrap()), "/ferry/hosts/host1");
        assert_eq!(keys.event(42, 7), "/ferry/events/000000000000042-000007");
        assert_eq!(
            keys.parse_vm_key("/ferry/vms/web-1/status"),
            Some(("web-1", "status"))
        );
        assert_eq!(keys.parse_vm_key("/ferry/hosts/x"), None);
    }
}
