//! A local etcd process, for the lab and for tests: one member, its own data directory,
//! client URL on an address the caller chooses. Killed by pid when dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{StoreError, StoreTls};

pub struct EtcdServer {
    child: Option<Child>,
    pub client_url: String,
    pub data_dir: PathBuf,
    /// The `root` identity of a TLS etcd.
    pub root: Option<StoreTls>,
}

/// etcd's own TLS: its server certificate (files), and the `root` client identity the
/// start-up probe and the set-up of users use.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub root: StoreTls,
}

impl EtcdServer {
    /// Starts etcd listening for clients on `client_host:client_port` (peers on
    /// 127.0.0.1:`peer_port`), waits until it serves requests. Plain HTTP: for the
    /// store's own tests only; a cluster's etcd is started by [`EtcdServer::start_tls`].
    pub async fn start(
        data_dir: &Path,
        client_host: &str,
        client_port: u16,
        peer_port: u16,
    ) -> Result<EtcdServer, StoreError> {
        EtcdServer::start_with(data_dir, client_host, client_port, peer_port, None).await
    }

    /// Starts etcd serving clients over TLS only, and only clients with a certificate of
    /// the cluster CA (`--client-cert-auth`: the certificate's common name is the user
    /// once authentication is enabled, see [`crate::auth`]).
    pub async fn start_tls(
        data_dir: &Path,
        client_host: &str,
        client_port: u16,
        peer_port: u16,
        tls: &EtcdTls,
    ) -> Result<EtcdServer, StoreError> {
        EtcdServer::start_with(data_dir, client_host, client_port, peer_port, Some(tls)).await
    }

    async fn start_with(
        data_dir: &Path,
        client_host: &str,
        client_port: u16,
        peer_port: u16,
        tls: Option<&EtcdTls>,
    ) -> Result<EtcdServer, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            StoreError::Server(format!("cannot create {}: {error}", data_dir.display()))
        })?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{client_host}:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = data_dir.join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|error| {
            StoreError::Server(format!("cannot create {}: {error}", log_path.display()))
        })?;
        let log_err = log
            .try_clone()
            .map_err(|error| StoreError::Server(error.to_string()))?;
        let mut command = Command::new("etcd");
        if let Some(tls) = tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert_file)
                .arg("--key-file")
                .arg(&tls.key_file)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_file)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg("ferry")
            .arg("--data-dir")
            .arg(data_dir.join("member-data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("ferry={peer_url}"))
            // Small and quick: a lab cluster, not a production one.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--auto-compaction-retention")
            .arg("1000")
            .arg("--auto-compaction-mode")
            .arg("revision")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|error| {
                StoreError::Server(format!(
                    "cannot run etcd (is etcd-server installed?): {error}"
                ))
            })?;
        let mut server = EtcdServer {
            child: Some(child),
            client_url,
            data_dir: data_dir.to_path_buf(),
            root: tls.map(|tls| tls.root.clone()),
        };
        server.wait_serving(Duration::from_secs(20)).await?;
        Ok(server)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn wait_serving(&mut self, timeout: Duration) -> Result<(), StoreError> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.data_dir.join("etcd.log")).unwrap_or_default();
                    let last = log
                        .lines()
                        .rev()
                        .find(|line| !line.trim().is_empty())
                        .unwrap_or("no output");
                    return Err(StoreError::Server(format!(
                        "etcd exited ({status}): {last}"
                    )));
                }
            }
            let mut connect = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_secs(1));
            if let Some(root) = &self.root {
                connect = connect.with_tls(root.options());
            }
            if let Ok(mut client) =
                etcd_client::Client::connect([self.client_url.as_str()], Some(connect)).await
            {
                if client.get("ferry-health-probe", None).await.is_ok() {
                    return Ok(());
                }
            }
            if started.elapsed() > timeout {
                return Err(StoreError::Server(format!(
                    "etcd at {} did not serve within {timeout:?}",
                    self.client_url
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops etcd now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An etcd that already exited cannot be killed; reaping it is what matters.
            if let Err(error) = child.kill() {
                tracing::debug!("etcd (pid {}) was not killed: {error}", child.id());
            }
            if let Err(error) = child.wait() {
                tracing::warn!("etcd (pid {}) could not be reaped: {error}", child.id());
            }
        }
    }

    /// Leaves etcd running past this handle (the lab keeps it, and records its pid).
    pub fn detach(mut self) -> u32 {
        self.child.take().map(|child| child.id()).unwrap_or(0)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1, for tests that run side by side.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or(0)
}
