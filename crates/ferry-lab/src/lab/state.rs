//! `lab.json`: the lab's record of everything it made, written after each thing is made
//! (never before, so `down` never removes what someone else owns) and read by `down`,
//! `status`, `fault` and `heal`. It holds the admin token, so it is readable by root only.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ferry_qemu::Accel;
use serde::{Deserialize, Serialize};

use super::spec::LabSpec;

pub const STATE_VERSION: u32 = 1;

/// A process the lab started, and how to recognise it again: `marker` is a run of
/// consecutive arguments in its `/proc/PID/cmdline`, so a recycled pid is never signalled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    pub pid: i32,
    pub marker: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    pub spec: LabSpec,
    /// The blackhole route for the lab's /16, once added.
    pub route: Option<String>,
    pub bridges: Vec<String>,
    pub namespaces: Vec<String>,
    /// Root-namespace ends of the hosts' veth pairs.
    pub veths: Vec<String>,
    /// Directories the lab created, removed whole by `down`.
    pub directories: Vec<PathBuf>,
    pub etcd: Option<Spawned>,
    /// Running agents by host number.
    pub agents: BTreeMap<u32, Spawned>,
    /// The hosts' watchdogs, by host number.
    #[serde(default)]
    pub watchdogs: BTreeMap<u32, Spawned>,
    pub accel: Option<Accel>,
    pub token: Option<String>,
    /// The client config the lab wrote (removed by `down` if it still holds our token).
    pub client_config: Option<PathBuf>,
}

impl LabState {
    pub fn new(spec: LabSpec) -> LabState {
        LabState {
            version: STATE_VERSION,
            spec,
            route: None,
            bridges: Vec::new(),
            namespaces: Vec::new(),
            veths: Vec::new(),
            directories: Vec::new(),
            etcd: None,
            agents: BTreeMap::new(),
            watchdogs: BTreeMap::new(),
            accel: None,
            token: None,
            client_config: None,
        }
    }

    pub fn load(path: &Path) -> Result<LabState, String> {
        let bytes = std::fs::read(path).map_err(|error| error.to_string())?;
        let state: LabState =
            serde_json::from_slice(&bytes).map_err(|error| format!("unreadable: {error}"))?;
        if state.version > STATE_VERSION {
            return Err(format!(
                "written by a newer Ferry (version {}, this one reads {STATE_VERSION})",
                state.version
            ));
        }
        Ok(state)
    }

    /// Writes the file whole or not at all (temporary file, then rename).
    pub fn save(&self) -> Result<(), String> {
        let path = self.spec.state_file();
        let temporary = path.with_extension("json.new");
        let text = serde_json::to_vec_pretty(self).map_err(|error| error.to_string())?;
        write_private(&temporary, &text)?;
        std::fs::rename(&temporary, &path).map_err(|error| error.to_string())
    }
}

/// Writes a file only root can read (it holds the admin token). `mode` applies only to
/// a file it creates: an existing one is set to 0600 too, before anything is written.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(bytes))
        .map_err(|error| format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_private_also_closes_an_existing_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host1.toml");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"token = \"t0k\"").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "token = \"t0k\"");
    }
}
