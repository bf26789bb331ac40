//! Names of things in the cluster. They end up in file names, tap device names, etcd keys
//! and URLs, so they are restricted to what is safe in all of them: DNS labels.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    /// The name is longer than the limit.
    #[error("{kind} name {name:?} is longer than {max} characters")]
    TooLong {
        kind: &'static str,
        name: String,
        max: usize,
    },
    /// The name has a character outside `a-z 0-9 -`, or starts or ends with `-`.
    #[error("{kind} name {name:?} is not allowed: use lowercase letters, digits and '-', starting with a letter or digit and not ending with '-'")]
    Illegal { kind: &'static str, name: String },
    /// A MAC address that is not six hex octets.
    #[error("MAC address {0:?} is not six hex octets like 52:54:00:12:34:56")]
    BadMac(String),
}

const MAX_NAME: usize = 48;

fn check_label(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong {
            kind,
            name: name.to_string(),
            max: MAX_NAME,
        });
    }
    let legal_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !legal_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Illegal {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$doc:meta])* $type:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $type(String);

        impl $type {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $type {
            type Err = NameError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                check_label($kind, text)?;
                Ok(Self(text.to_string()))
            }
        }

        impl TryFrom<String> for $type {
            type Error = NameError;
            fn try_from(text: String) -> Result<Self, Self::Error> {
                check_label($kind, &text)?;
                Ok(Self(text))
            }
        }

        impl From<$type> for String {
            fn from(name: $type) -> String {
                name.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

label_type!(
    /// A virtual machine's name, unique in the cluster.
    VmName,
    "VM"
);
label_type!(
    /// A host's name, unique in the cluster.
    HostName,
    "host"
);
label_type!(
    /// A project (a team's VMs within a quota), unique in the cluster.
    ProjectName,
    "project"
);
label_type!(
    /// A portal user's name.
    UserName,
    "user"
);

/// An Ethernet MAC address, kept in its canonical lowercase `aa:bb:cc:dd:ee:ff` form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// A locally administered address in QEMU's `52:54:00` range derived from a stable
    /// key (VM name and NIC index), so a VM keeps its MAC across restarts and migrations.
    pub fn derived_from(key: &str) -> Self {
        // FNV-1a: tiny, stable across releases (unlike std's hasher), good enough to spread names.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in key.bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        let [_, a, b, c] = hash.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, a, b, c])
    }

    /// A tap device name for a VM's NIC: short enough for Linux (15 bytes), stable, and
    /// distinct per VM name and index.
    pub fn tap_name(vm: &str, index: usize) -> String {
        let mac = MacAddr::derived_from(&format!("{vm}/{index}"));
        let [_, _, _, a, b, c] = mac.0;
        format!("fv{a:02x}{b:02x}{c:02x}{index}")
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            return Err(NameError::BadMac(text.to_string()));
        }
        let mut octets = [0u8; 6];
        for (slot, part) in octets.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(NameError::BadMac(text.to_string()));
            }
            *slot =
                u8::from_str_radix(part, 16).map_err(|_| NameError::BadMac(text.to_string()))?;
        }
        Ok(MacAddr(octets))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = NameError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_dns_labels() {
        assert!("web-1".parse::<VmName>().is_ok());
        assert!("host3".parse::<HostName>().is_ok());
    }

    #[test]
    fn rejects_names_unsafe_for_paths_and_keys() {
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a/b",
            "..",
            "a b",
            "a_b",
            &"x".repeat(49),
        ] {
            assert!(bad.parse::<VmName>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn names_deserialize_only_when_valid() {
        assert!(serde_json::from_str::<VmName>("\"ok\"").is_ok());
        let err = serde_json::from_str::<VmName>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
    }

    #[test]
    fn derived_macs_are_stable_and_local() {
        let mac = MacAddr::derived_from("web-1/0");
        assert_eq!(mac, MacAddr::derived_from("web-1/0"));
        assert_ne!(mac, MacAddr::derived_from("web-1/1"));
        assert_eq!(&mac.octets()[..3], &[0x52, 0x54, 0x00]);
    }

    proptest! {
        #[test]
        fn mac_display_round_trips(octets in any::<[u8; 6]>()) {
            let mac = MacAddr(octets);
            prop_assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        }

        #[test]
        fn every_accepted_name_is_path_safe(name in "[a-z0-9-]{1,60}") {
            if let Ok(vm) = name.parse::<VmName>() {
                prop_assert!(!vm.as_str().contains('/') && !vm.as_str().starts_with('-'));
                prop_assert!(vm.as_str().len() <= MAX_NAME);
            }
        }
    }
}
