//! The lab's cluster CA and certificates, made at `up` in the state directory (`tls/`):
//! the CA, etcd's server certificate for the management switch's address, `root` (the
//! lab's own client of etcd), and each host's certificate for its three addresses.

use std::net::IpAddr;
use std::path::PathBuf;

use ferry_store::etcd_server::EtcdTls;
use ferry_store::StoreTls;
use ferry_tls::{install_host, ClusterCa, Subject, TlsError, TlsFiles};

use super::spec::{LabNet, LabSpec};

impl LabSpec {
    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }

    /// The CA's certificate, as clients pin it.
    pub fn ca_file(&self) -> PathBuf {
        self.tls_dir().join("ca").join(ferry_tls::CA_FILE)
    }

    /// A host's `[tls] dir`.
    pub fn host_tls_dir(&self, host: u32) -> PathBuf {
        self.tls_dir().join(self.host_name(host))
    }

    fn identity_files(&self, name: &str) -> TlsFiles {
        let dir = self.tls_dir().join(name);
        TlsFiles {
            ca: dir.join(ferry_tls::CA_FILE),
            cert: dir.join("host.pem"),
            key: dir.join("host-key.pem"),
        }
    }
}

/// Makes the CA and every certificate of the lab.
pub fn create(spec: &LabSpec) -> Result<(), TlsError> {
    let ca = ClusterCa::create(&spec.name)?;
    ca.write(&spec.tls_dir().join("ca"))?;
    let switch = IpAddr::V4(spec.switch_address(LabNet::Management));
    install_host(
        &ca,
        &spec.tls_dir().join("etcd"),
        &Subject::host("etcd", &[switch]),
    )?;
    install_host(&ca, &spec.tls_dir().join("root"), &Subject::client("root"))?;
    for host in spec.host_numbers() {
        let addresses: Vec<IpAddr> = LabNet::ALL
            .into_iter()
            .map(|net| IpAddr::V4(spec.host_address(host, net)))
            .collect();
        install_host(
            &ca,
            &spec.host_tls_dir(host),
            &Subject::host(&spec.host_name(host), &addresses),
        )?;
    }
    Ok(())
}

fn read(path: &std::path::Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::File {
        path: path.to_path_buf(),
        detail: error.to_string(),
    })
}

/// The etcd identity made for `name` (`root`, a host).
fn store_tls(spec: &LabSpec, name: &str) -> Result<StoreTls, TlsError> {
    let files = spec.identity_files(name);
    Ok(StoreTls {
        ca_pem: read(&files.ca)?,
        cert_pem: read(&files.cert)?,
        key_pem: read(&files.key)?,
    })
}

/// The lab's own etcd client: `root`.
pub fn root(spec: &LabSpec) -> Result<StoreTls, TlsError> {
    store_tls(spec, "root")
}

/// etcd's server side.
pub fn etcd(spec: &LabSpec) -> Result<EtcdTls, TlsError> {
    let files = spec.identity_files("etcd");
    Ok(EtcdTls {
        ca_file: files.ca,
        cert_file: files.cert,
        key_file: files.key,
        root: root(spec)?,
    })
}

/// A lab host's etcd identity, as its agent connects.
pub fn host_store_tls(spec: &LabSpec, host: u32) -> Result<StoreTls, TlsError> {
    store_tls(spec, &spec.host_name(host))
}
