//! Where the CLI finds the API: `--api`/`--token`, then `FERRY_API`/`FERRY_TOKEN`, then
//! the client config file (`FERRY_CLIENT_CONFIG`, default `/etc/ferry/client.toml`),
//! which `ferry lab up` writes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Base URL of any agent's API, e.g. `https://10.213.0.11:8700`.
    pub api: String,
    pub token: String,
    /// The cluster CA's certificate: the only one the CLI trusts.
    pub ca: PathBuf,
    /// Other agents' API URLs, tried in order when `api` cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
}

pub fn default_path() -> PathBuf {
    std::env::var_os("FERRY_CLIENT_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ferry/client.toml"))
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<ClientConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        toml::from_str(&text).map_err(|error| format!("{}: {}", path.display(), error.message()))
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        }
        let text = toml::to_string(self).map_err(|error| error.to_string())?;
        std::fs::write(path, text).map_err(|error| format!("{}: {error}", path.display()))
    }
}
