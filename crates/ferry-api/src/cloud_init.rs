//! cloud-init personalisation (the NoCloud data source): the three files of a seed —
//! `meta-data` (instance id, hostname), `user-data` (a `#cloud-config` document) and
//! `network-config` (version 2: the address from the network's pool, or DHCP) — and
//! the `cidata` ISO they go on, made with Debian's `xorriso`.
//!
//! The files are built by a pure function. The documents Ferry writes itself are JSON,
//! which every YAML parser (cloud-init's included) reads as YAML. A user's own
//! user-data must start with `#cloud-config` and be valid YAML: checked before
//! anything is created. A clone gets a new seed with a new instance id, so cloud-init
//! runs again in it.

use std::net::Ipv4Addr;
use std::path::Path;

use ferry_model::MacAddr;
use serde_json::json;

use crate::types::CloudInitRequest;

/// A NIC as the guest should configure it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNic {
    pub mac: MacAddr,
    /// A static address with its prefix and gateway; `None`: DHCP.
    pub address: Option<(Ipv4Addr, u8, Option<Ipv4Addr>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// The longest user-data accepted (cloud-init's own limit for NoCloud is larger, but a
/// seed is not the place for payloads).
const MAX_USER_DATA: usize = 256 * 1024;

/// Checks a user's own user-data: `#cloud-config` first, then valid YAML.
pub fn check_user_data(text: &str) -> Result<(), String> {
    if text.len() > MAX_USER_DATA {
        return Err(format!(
            "user-data is {} bytes; at most {MAX_USER_DATA}",
            text.len()
        ));
    }
    let first = text.lines().next().unwrap_or("").trim_end();
    if first != "#cloud-config" {
        return Err(format!(
            "user-data must start with a #cloud-config line (it starts with {first:?})"
        ));
    }
    refuse_aliases(text)?;
    let documents = yaml_rust2::YamlLoader::load_from_str(text)
        .map_err(|error| format!("user-data is not valid YAML: {error}"))?;
    match documents.first() {
        None | Some(yaml_rust2::Yaml::Hash(_)) | Some(yaml_rust2::Yaml::Null) => Ok(()),
        Some(_) => Err("user-data must be a YAML mapping (keys such as users:, runcmd:)".into()),
    }
}

/// YAML aliases are refused before the document is loaded: the loader copies the
/// anchored node for each alias, so a few hundred bytes of nested aliases would expand
/// to gigabytes inside the agent ("billion laughs").
fn refuse_aliases(text: &str) -> Result<(), String> {
    let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((yaml_rust2::parser::Event::StreamEnd, _)) => return Ok(()),
            Ok((yaml_rust2::parser::Event::Alias(_), mark)) => {
                return Err(format!(
                    "user-data uses a YAML alias (line {}); write the value out instead",
                    mark.line()
                ))
            }
            Ok(_) => {}
            Err(error) => return Err(format!("user-data is not valid YAML: {error}")),
        }
    }
}

/// A hostname cloud-init can set: 1-63 of a-z 0-9 - , not starting or ending with -.
fn check_hostname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "hostname {name:?} must be 1-63 of a-z 0-9 - (not at either end)"
        ))
    }
}

fn check_user(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok && name != "root" {
        Ok(())
    } else {
        Err(format!(
            "user {name:?} must be 1-32 of a-z 0-9 - _, start with a letter, and not be root"
        ))
    }
}

fn check_ssh_key(key: &str) -> Result<(), String> {
    let key = key.trim();
    let kind = key.split_whitespace().next().unwrap_or("");
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    if !known || key.split_whitespace().count() < 2 || key.contains('\n') {
        return Err(format!(
            "SSH key {:?} is not one OpenSSH public key line (ssh-ed25519 AAAA… comment)",
            key.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

/// The seed's files for VM `vm` with instance id `instance_id`.
pub fn seed_files(
    vm: &str,
    instance_id: &str,
    request: &CloudInitRequest,
    nics: &[GuestNic],
) -> Result<SeedFiles, String> {
    let hostname = request.hostname.clone().unwrap_or_else(|| vm.to_string());
    check_hostname(&hostname)?;
    let meta_data = json!({
        "instance-id": instance_id,
        "local-hostname": hostname,
    });
    let user_data = match &request.user_data {
        Some(own) => {
            if request.user.is_some() || !request.ssh_keys.is_empty() {
                return Err(
                    "give either your own user-data or --user/--ssh-key, not both (put the \
                     user in your user-data)"
                        .into(),
                );
            }
            check_user_data(own)?;
            own.clone()
        }
        None => {
            for key in &request.ssh_keys {
                check_ssh_key(key)?;
            }
            let mut config = json!({
                "hostname": hostname,
                "preserve_hostname": false,
                "ssh_pwauth": false,
            });
            if let Some(user) = &request.user {
                check_user(user)?;
                config["users"] = json!([{
                    "name": user,
                    "groups": ["sudo"],
                    "sudo": "ALL=(ALL) NOPASSWD:ALL",
                    "shell": "/bin/bash",
                    "lock_passwd": true,
                    "ssh_authorized_keys": request.ssh_keys.iter().map(|key| key.trim()).collect::<Vec<_>>(),
                }]);
            } else if !request.ssh_keys.is_empty() {
                config["ssh_authorized_keys"] = json!(request
                    .ssh_keys
                    .iter()
                    .map(|key| key.trim())
                    .collect::<Vec<_>>());
            }
            format!("#cloud-config\n{config:#}\n")
        }
    };
    let mut ethernets = serde_json::Map::new();
    for (index, nic) in nics.iter().enumerate() {
        // Matched by MAC and named eth0, eth1 … as Proxmox names them: renderers other
        // than netplan (Debian's ifupdown among them) need the name set. Routes use
        // 0.0.0.0/0, which cloud-init before 23.x reads where it does not read "default".
        let name = format!("eth{index}");
        let mut entry = json!({
            "match": {"macaddress": nic.mac.to_string()},
            "set-name": name,
        });
        match nic.address {
            Some((address, prefix, gateway)) => {
                entry["addresses"] = json!([format!("{address}/{prefix}")]);
                if let Some(gateway) = gateway {
                    entry["routes"] = json!([{"to": "0.0.0.0/0", "via": gateway.to_string()}]);
                }
            }
            None => entry["dhcp4"] = json!(true),
        }
        ethernets.insert(name, entry);
    }
    let network_config = json!({"version": 2, "ethernets": ethernets});
    Ok(SeedFiles {
        meta_data: format!("{meta_data:#}\n"),
        user_data,
        network_config: format!("{network_config:#}\n"),
    })
}

/// Writes the seed ISO (volume id `cidata`) at `path`.
pub fn write_seed(path: &Path, files: &SeedFiles) -> Result<(), String> {
    let dir = path.parent().ok_or("seed path has no directory")?;
    std::fs::create_dir_all(dir)
        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let staging = tempfile::tempdir_in(dir)
        .map_err(|error| format!("cannot make a directory in {}: {error}", dir.display()))?;
    for (name, text) in [
        ("meta-data", &files.meta_data),
        ("user-data", &files.user_data),
        ("network-config", &files.network_config),
    ] {
        std::fs::write(staging.path().join(name), text)
            .map_err(|error| format!("cannot write the seed's {name}: {error}"))?;
    }
    let output = std::process::Command::new("xorriso")
        .args([
            "-as",
            "genisoimage",
            "-quiet",
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
        ])
        .arg("-output")
        .arg(path)
        .arg(staging.path())
        .output()
        .map_err(|error| format!("cannot run xorriso (package xorriso): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "xorriso {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> GuestNic {
        GuestNic {
            mac: "52:54:00:12:34:56".parse().unwrap(),
            address: Some((
                "10.0.0.5".parse().unwrap(),
                24,
                Some("10.0.0.1".parse().unwrap()),
            )),
        }
    }

    #[test]
    fn the_hostname_defaults_to_the_vm_name_and_the_user_gets_sudo_and_keys() {
        let request = CloudInitRequest {
            user: Some("ops".into()),
            ssh_keys: vec!["ssh-ed25519 AAAAC3Nza ops@desk\n".into()],
            ..CloudInitRequest::default()
        };
        let files = seed_files("web-1", "i-1", &request, &[nic()]).unwrap();
        assert!(files.meta_data.contains("\"local-hostname\": \"web-1\""));
        assert!(files.meta_data.contains("\"instance-id\": \"i-1\""));
        assert!(files.user_data.starts_with("#cloud-config\n"));
        check_user_data(&files.user_data).unwrap();
        assert!(files.user_data.contains("\"name\": \"ops\""));
        assert!(files
            .user_data
            .contains("\"ssh-ed25519 AAAAC3Nza ops@desk\""));
        assert!(files
            .network_config
            .contains("\"macaddress\": \"52:54:00:12:34:56\""));
        assert!(files.network_config.contains("\"10.0.0.5/24\""));
        assert!(files.network_config.contains("\"via\": \"10.0.0.1\""));
        assert!(files.network_config.contains("\"set-name\": \"eth0\""));
    }

    #[test]
    fn without_a_pool_address_the_nic_uses_dhcp() {
        let mut dhcp = nic();
        dhcp.address = None;
        let files = seed_files("a", "i", &CloudInitRequest::default(), &[dhcp]).unwrap();
        assert!(files.network_config.contains("\"dhcp4\": true"));
    }

    #[test]
    fn user_data_must_be_cloud_config_and_yaml() {
        check_user_data("#cloud-config\nruncmd:\n  - [touch, /tmp/x]\n").unwrap();
        let error = check_user_data("#!/bin/sh\necho hi\n").unwrap_err();
        assert!(error.contains("#cloud-config"), "{error}");
        let error = check_user_data("#cloud-config\nusers: [a, b\n").unwrap_err();
        assert!(error.starts_with("user-data is not valid YAML"), "{error}");
        let error = check_user_data("#cloud-config\n- a list\n").unwrap_err();
        assert!(error.contains("mapping"), "{error}");
        let laughs = "#cloud-config\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n";
        let error = check_user_data(laughs).unwrap_err();
        assert!(
            error.starts_with("user-data uses a YAML alias (line 3)"),
            "{error}"
        );
    }

    #[test]
    fn own_user_data_is_used_as_given_and_not_mixed_with_generated_users() {
        let own = "#cloud-config\nhostname: mine\n".to_string();
        let request = CloudInitRequest {
            user_data: Some(own.clone()),
            ..CloudInitRequest::default()
        };
        assert_eq!(seed_files("a", "i", &request, &[]).unwrap().user_data, own);
        let mixed = CloudInitRequest {
            user: Some("ops".into()),
            ..request
        };
        assert!(seed_files("a", "i", &mixed, &[])
            .unwrap_err()
            .contains("not both"));
    }

    #[test]
    fn bad_names_and_keys_are_refused_by_name() {
        let bad_user = CloudInitRequest {
            user: Some("Root Admin".into()),
            ..CloudInitRequest::default()
        };
        assert!(seed_files("a", "i", &bad_user, &[])
            .unwrap_err()
            .starts_with("user \"Root Admin\""));
        let bad_key = CloudInitRequest {
            ssh_keys: vec!["not a key".into()],
            ..CloudInitRequest::default()
        };
        assert!(seed_files("a", "i", &bad_key, &[])
            .unwrap_err()
            .starts_with("SSH key"));
        let bad_host = CloudInitRequest {
            hostname: Some("-x".into()),
            ..CloudInitRequest::default()
        };
        assert!(seed_files("a", "i", &bad_host, &[])
            .unwrap_err()
            .starts_with("hostname"));
    }

    #[test]
    fn the_seed_is_an_iso_labelled_cidata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        let files = seed_files("a", "i", &CloudInitRequest::default(), &[nic()]).unwrap();
        write_seed(&path, &files).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[32769..32774], b"CD001");
        // The volume id is at offset 40 of the primary volume descriptor.
        assert!(
            bytes[32808..32840].starts_with(b"CIDATA")
                || bytes[32808..32840].starts_with(b"cidata")
        );
    }
}
