//! Block jobs and NBD: what moving a disk under a running guest needs. A disk is found
//! by its device (`vdisk-{id}`), never by node name, because a finished mirror leaves
//! the device on a new node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Machine, QemuError};

/// One disk as QEMU has it open now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenDisk {
    /// The format node the device reads from.
    pub node: String,
    pub file: PathBuf,
    pub virtual_size: u64,
}

/// A block job's state (`query-block-jobs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockJob {
    pub id: String,
    /// `running`, `ready`, `concluded`…
    pub status: String,
    pub offset: u64,
    pub length: u64,
    pub error: Option<String>,
}

impl BlockJob {
    /// Source and target are in sync (a mirror may now pivot or stop).
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

impl Machine {
    /// `query-block`'s entry of device `vdisk-{disk}`.
    pub(crate) async fn block_entry(&self, disk: &str) -> Result<serde_json::Value, QemuError> {
        let reply = self.command("query-block", None).await?;
        let device = format!("/machine/peripheral/vdisk-{disk}/");
        reply
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| {
                entry["qdev"].as_str().is_some_and(|qdev| {
                    qdev.starts_with(&device) || qdev == &device[..device.len() - 1]
                })
            })
            .cloned()
            .ok_or_else(|| QemuError::Other(format!("VM {}: no disk {disk}", self.spec().name)))
    }

    /// The disk behind device `vdisk-{disk}`.
    pub async fn open_disk(&self, disk: &str) -> Result<OpenDisk, QemuError> {
        let entry = self.block_entry(disk).await?;
        let inserted = &entry["inserted"];
        let node = inserted["node-name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let file = inserted["image"]["filename"]
            .as_str()
            .unwrap_or_default()
            .into();
        let virtual_size = inserted["image"]["virtual-size"].as_u64().unwrap_or(0);
        Ok(OpenDisk {
            node,
            file,
            virtual_size,
        })
    }

    /// Opens `path` (qcow2) as a new pair of nodes, `{name}-file` and `{name}`.
    pub async fn add_qcow2_node(
        &self,
        name: &str,
        path: &Path,
        direct: bool,
    ) -> Result<(), QemuError> {
        self.command(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": name,
                "file": {
                    "driver": "file",
                    "node-name": format!("{name}-file"),
                    "filename": path,
                    "cache": {"direct": direct},
                },
            })),
        )
        .await
        .map(drop)
    }

    /// Opens an NBD export as a raw node (the remote end of a disk copy); with `tls`
    /// (credentials id, the server's host name as its certificate names it) over TLS.
    pub async fn add_nbd_node(
        &self,
        name: &str,
        host: &str,
        port: u16,
        export: &str,
        tls: Option<(&str, &str)>,
    ) -> Result<(), QemuError> {
        let mut nbd = json!({
            "driver": "nbd",
            "node-name": format!("{name}-nbd"),
            "server": {"type": "inet", "host": host, "port": port.to_string()},
            "export": export,
        });
        if let Some((creds, hostname)) = tls {
            nbd["tls-creds"] = json!(creds);
            nbd["tls-hostname"] = json!(hostname);
        }
        self.command(
            "blockdev-add",
            Some(json!({
                "driver": "raw",
                "node-name": name,
                "file": nbd,
            })),
        )
        .await
        .map(drop)
    }

    /// Removes a node and, for our pairs, its file node.
    pub async fn delete_node(&self, name: &str) -> Result<(), QemuError> {
        self.command("blockdev-del", Some(json!({"node-name": name})))
            .await
            .map(drop)
    }

    /// Copies everything the guest sees on `source` to `target` and keeps mirroring
    /// its writes; the job becomes `ready` when both match.
    pub async fn start_mirror(
        &self,
        job: &str,
        source: &str,
        target: &str,
    ) -> Result<(), QemuError> {
        self.command(
            "blockdev-mirror",
            Some(json!({
                "job-id": job,
                "device": source,
                "target": target,
                "sync": "full",
                "auto-finalize": true,
                "auto-dismiss": true,
            })),
        )
        .await
        .map(drop)
    }

    pub async fn block_jobs(&self) -> Result<Vec<BlockJob>, QemuError> {
        let reply = self.command("query-block-jobs", None).await?;
        Ok(reply
            .as_array()
            .into_iter()
            .flatten()
            .map(|job| BlockJob {
                id: job["device"].as_str().unwrap_or_default().to_string(),
                status: job["status"].as_str().unwrap_or_default().to_string(),
                offset: job["offset"].as_u64().unwrap_or(0),
                length: job["len"].as_u64().unwrap_or(0),
                error: job["error"].as_str().map(str::to_string),
            })
            .collect())
    }

    /// Where job `id` stands; an error if it ended (it was meant to wait for a pivot or
    /// a cancel) or failed.
    pub async fn block_job(&self, id: &str) -> Result<BlockJob, QemuError> {
        let job = self
            .block_jobs()
            .await?
            .into_iter()
            .find(|job| job.id == id)
            .ok_or_else(|| QemuError::Other(format!("block job {id} ended before it was ready")))?;
        match &job.error {
            Some(error) => Err(QemuError::Other(format!("block job {id}: {error}"))),
            None => Ok(job),
        }
    }

    /// Waits until job `id` is ready (source and target in sync). Fails if the job ends
    /// or errs first, or `timeout` passes.
    pub async fn wait_job_ready(&self, id: &str, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.block_job(id).await?;
            if job.is_ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Other(format!(
                    "block job {id} not ready after {timeout:?} ({} of {} bytes)",
                    job.offset, job.length
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends a ready mirror by switching the device to the target (pivot).
    pub async fn complete_job(&self, id: &str) -> Result<(), QemuError> {
        self.command("job-complete", Some(json!({"id": id})))
            .await
            .map(drop)
    }

    /// Ends a job without switching (a ready mirror stops with the target in sync).
    pub async fn cancel_job(&self, id: &str) -> Result<(), QemuError> {
        self.command(
            "block-job-cancel",
            Some(json!({"device": id, "force": false})),
        )
        .await
        .map(drop)
    }

    /// Waits until no job named `id` is left.
    pub async fn wait_job_gone(&self, id: &str, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        while self.block_jobs().await?.iter().any(|job| job.id == id) {
            if Instant::now() >= deadline {
                return Err(QemuError::Other(format!(
                    "block job {id} still there after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Serves NBD exports on `host:port`; with `tls` (credentials, authz ids) only to
    /// the peer the authz object names, over TLS.
    pub async fn nbd_server_start(
        &self,
        host: &str,
        port: u16,
        tls: Option<(&str, &str)>,
    ) -> Result<(), QemuError> {
        let mut arguments =
            json!({"addr": {"type": "inet", "data": {"host": host, "port": port.to_string()}}});
        if let Some((creds, authz)) = tls {
            arguments["tls-creds"] = json!(creds);
            arguments["tls-authz"] = json!(authz);
        }
        self.command("nbd-server-start", Some(arguments))
            .await
            .map(drop)
    }

    /// Exports a node for writing under `name`.
    pub async fn nbd_export(&self, node: &str, name: &str) -> Result<(), QemuError> {
        self.command(
            "block-export-add",
            Some(json!({"type": "nbd", "id": name, "node-name": node, "name": name, "writable": true})),
        )
        .await
        .map(drop)
    }

    pub async fn nbd_server_stop(&self) -> Result<(), QemuError> {
        self.command("nbd-server-stop", None).await.map(drop)
    }
}

/// Which side of a TLS stream a QEMU is (QEMU's `tls-creds-x509` `endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsEndpoint {
    Server,
    Client,
}

impl TlsEndpoint {
    fn as_str(self) -> &'static str {
        match self {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        }
    }

    /// The id Ferry gives the credentials object of this side.
    pub fn creds_id(self) -> &'static str {
        match self {
            TlsEndpoint::Server => "ferry-tls-server",
            TlsEndpoint::Client => "ferry-tls-client",
        }
    }
}

/// The id of the object that lets `peer`'s certificate in.
pub fn authz_id(peer: &str) -> String {
    format!("ferry-authz-{peer}")
}

impl Machine {
    /// The ids of the user-created objects (`object-add`) of this QEMU.
    async fn object_ids(&self) -> Result<Vec<String>, QemuError> {
        let listed = self
            .command("qom-list", Some(json!({"path": "/objects"})))
            .await?;
        Ok(listed
            .as_array()
            .map(|objects| {
                objects
                    .iter()
                    .filter_map(|object| object["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Loads the host's certificate from `dir` (`ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`, `client-cert.pem`, `client-key.pem`) for `endpoint`, once per
    /// QEMU. The peer must present a certificate of the same CA.
    pub async fn ensure_tls_creds(
        &self,
        dir: &Path,
        endpoint: TlsEndpoint,
    ) -> Result<&'static str, QemuError> {
        let id = endpoint.creds_id();
        if !self.object_ids().await?.iter().any(|known| known == id) {
            self.command(
                "object-add",
                Some(json!({
                    "qom-type": "tls-creds-x509",
                    "id": id,
                    "dir": dir,
                    "endpoint": endpoint.as_str(),
                    "verify-peer": true,
                })),
            )
            .await?;
        }
        Ok(id)
    }

    /// Destination: migration streams over TLS with the host's certificate in `dir`,
    /// from `peer`'s QEMU only. Returns the credentials and authz ids, which the NBD
    /// server of a disk copy takes too.
    pub async fn accept_migration_over_tls(
        &self,
        dir: &Path,
        peer: &str,
    ) -> Result<(&'static str, String), QemuError> {
        let creds = self.ensure_tls_creds(dir, TlsEndpoint::Server).await?;
        let authz = self.ensure_authz(peer).await?;
        self.set_migration_parameters(json!({"tls-creds": creds, "tls-authz": authz}))
            .await?;
        Ok((creds, authz))
    }

    /// Source: the migration stream to `peer` over TLS, whose certificate must name
    /// `peer`. Returns the credentials id, which an NBD client of a disk copy takes too.
    pub async fn send_migration_over_tls(
        &self,
        dir: &Path,
        peer: &str,
    ) -> Result<&'static str, QemuError> {
        let creds = self.ensure_tls_creds(dir, TlsEndpoint::Client).await?;
        self.set_migration_parameters(json!({"tls-creds": creds, "tls-hostname": peer}))
            .await?;
        Ok(creds)
    }

    /// Lets in only the peer whose certificate's distinguished name is `CN={peer}`.
    pub async fn ensure_authz(&self, peer: &str) -> Result<String, QemuError> {
        let id = authz_id(peer);
        if !self.object_ids().await?.contains(&id) {
            self.command(
                "object-add",
                Some(json!({
                    "qom-type": "authz-simple",
                    "id": id,
                    "identity": format!("CN={peer}"),
                })),
            )
            .await?;
        }
        Ok(id)
    }
}
