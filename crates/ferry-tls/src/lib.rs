//! The cluster's certificates and the TLS configurations built from them.
//!
//! One cluster CA (`ca.pem`, its key `ca-key.pem` kept only where certificates are
//! issued) signs every certificate of the cluster:
//! - each host gets one certificate (`host.pem`, `host-key.pem`) whose common name is the
//!   host's name, with the host's name and addresses as subject alternative names and
//!   both server and client use: it serves the REST API, authenticates the agent to
//!   the other agents (mutual TLS), to etcd (whose user is the common name) and to the
//!   other hosts' QEMUs (migration and NBD streams, where `tls-authz` names the peer);
//! - etcd's server certificate, and client certificates for tools (`root` for etcd's
//!   set-up) are issued the same way.
//!
//! Every client trusts the cluster CA alone, never the system's roots: a certificate
//! from any other CA is refused.
//!
//! Rotation: issue new host certificates from the same CA (`ferry cert issue`)
//! and restart each agent; a new CA is rolled out by putting both CAs in `ca.pem` on
//! every host first, then replacing the host certificates, then removing the old CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("certificate for {subject}: {detail}")]
    Issue { subject: String, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The files of the cluster CA in a directory.
pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Certificates are valid this long; the CA ten times as long.
const CERT_DAYS: i64 = 2 * 365;
const CA_DAYS: i64 = 20 * 365;

/// The crypto every TLS configuration of Ferry uses (one provider in the process, so
/// no process-wide default is needed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The cluster CA, able to issue certificates.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// What a certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The common name: a host's name, `etcd`, or a tool's user (`root`).
    pub name: String,
    /// DNS names besides the common name.
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Subject {
    /// A host (or a server) reached by these addresses; its name is also a DNS name.
    pub fn host(name: &str, ips: &[IpAddr]) -> Subject {
        Subject {
            name: name.to_string(),
            dns: vec![name.to_string()],
            ips: ips.to_vec(),
        }
    }

    /// A client identity only (no addresses).
    pub fn client(name: &str) -> Subject {
        Subject {
            name: name.to_string(),
            dns: Vec::new(),
            ips: Vec::new(),
        }
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

impl Issued {
    /// Writes `{stem}.pem` and `{stem}-key.pem` (the key readable by root only).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<TlsFiles, TlsError> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        write_file(&cert, &self.cert_pem, 0o644)?;
        write_file(&key, &self.key_pem, 0o600)?;
        Ok(TlsFiles {
            ca: dir.join(CA_FILE),
            cert,
            key,
        })
    }
}

impl ClusterCa {
    /// A new CA for the cluster `cluster`.
    pub fn create(cluster: &str) -> Result<ClusterCa, TlsError> {
        let issue_error = |detail: rcgen::Error| TlsError::Issue {
            subject: format!("the CA of cluster {cluster}"),
            detail: detail.to_string(),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Ferry cluster CA {cluster}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        let key = KeyPair::generate().map_err(issue_error)?;
        let cert = params.self_signed(&key).map_err(issue_error)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Writes `ca.pem` and `ca-key.pem` into `dir` (made if missing, mode 0700).
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        make_private_dir(dir)?;
        write_file(&dir.join(CA_FILE), &self.cert_pem, 0o644)?;
        write_file(&dir.join(CA_KEY_FILE), &self.key.serialize_pem(), 0o600)
    }

    /// The CA written by `write`.
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        let cert_pem = read_file(&dir.join(CA_FILE))?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = KeyPair::from_pem(&read_file(&key_path)?).map_err(|error| TlsError::File {
            path: key_path,
            detail: error.to_string(),
        })?;
        Ok(ClusterCa { cert_pem, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `subject`, for both server and client use.
    pub fn issue(&self, subject: &Subject) -> Result<Issued, TlsError> {
        let issue_error = |detail: String| TlsError::Issue {
            subject: subject.name.clone(),
            detail,
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|error| issue_error(error.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, subject.name.clone());
        for name in &subject.dns {
            let name = name
                .clone()
                .try_into()
                .map_err(|error: rcgen::Error| issue_error(format!("DNS name {name}: {error}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &subject.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CERT_DAYS);
        let key = KeyPair::generate().map_err(|error| issue_error(error.to_string()))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|error| issue_error(error.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Where one identity's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster CA alone, as a client trusts it.
#[derive(Clone)]
pub struct Trust {
    pem: String,
    roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

impl Trust {
    pub fn from_pem(pem: &str, source: &Path) -> Result<Trust, TlsError> {
        let bad = |detail: String| TlsError::File {
            path: source.to_path_buf(),
            detail,
        };
        let mut roots = RootCertStore::empty();
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|error| bad(format!("not a PEM certificate: {error}")))?;
            roots
                .add(cert)
                .map_err(|error| bad(format!("not a CA certificate: {error}")))?;
            count += 1;
        }
        if count == 0 {
            return Err(bad("holds no certificate".into()));
        }
        Ok(Trust {
            pem: pem.to_string(),
            roots: Arc::new(roots),
        })
    }

    pub fn load(path: &Path) -> Result<Trust, TlsError> {
        Trust::from_pem(&read_file(path)?, path)
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A client trusting the cluster CA alone, presenting `identity` if given.
    pub fn client_config(
        &self,
        identity: Option<&Identity>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_root_certificates(self.roots.clone());
        match identity {
            None => Ok(builder.with_no_client_auth()),
            Some(identity) => builder
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .map_err(|error| TlsError::Config(error.to_string())),
        }
    }
}

/// A certificate with its key, and the CA that issued it.
pub struct Identity {
    pub trust: Trust,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The certificate's common name.
    pub name: String,
    pub files: TlsFiles,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn load(files: &TlsFiles) -> Result<Identity, TlsError> {
        let trust = Trust::load(&files.ca)?;
        let bad = |path: &Path, detail: String| TlsError::File {
            path: path.to_path_buf(),
            detail,
        };
        let cert_pem = read_file(&files.cert)?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| bad(&files.cert, format!("not a PEM certificate: {error}")))?;
        let first = chain
            .first()
            .ok_or_else(|| bad(&files.cert, "holds no certificate".into()))?;
        let name = common_name(first)
            .ok_or_else(|| bad(&files.cert, "the certificate has no common name".into()))?;
        let key = PrivateKeyDer::from_pem_slice(read_file(&files.key)?.as_bytes())
            .map_err(|error| bad(&files.key, format!("not a PEM private key: {error}")))?;
        let identity = Identity {
            trust,
            chain,
            key,
            name,
            files: files.clone(),
        };
        // A key that does not match the certificate is found now, not at the first
        // handshake.
        identity.server_config()?;
        Ok(identity)
    }

    /// A server presenting this identity. Clients may present a certificate of the
    /// cluster CA (agents do) or none (the CLI, with a token); any other is refused.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.trust.roots.clone(), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|error| TlsError::Config(error.to_string()))?;
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|error| TlsError::Config(format!("{}: {error}", self.files.key.display())))
    }

    /// A client trusting the cluster CA and presenting this identity.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        self.trust.client_config(Some(self))
    }

    pub fn cert_pem(&self) -> Result<String, TlsError> {
        read_file(&self.files.cert)
    }

    pub fn key_pem(&self) -> Result<String, TlsError> {
        read_file(&self.files.key)
    }
}

/// The common name of a certificate (a peer's host name).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::File {
        path: path.to_path_buf(),
        detail: error.to_string(),
    })
}

fn make_private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |error: std::io::Error| TlsError::File {
        path: dir.to_path_buf(),
        detail: error.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)
}

/// Writes a file with `mode`, also fixing the mode of a file that was there.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |error: std::io::Error| TlsError::File {
        path: path.to_path_buf(),
        detail: error.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    // Created with the mode, so a key is never readable by others, not even briefly.
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(failed)?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(failed)
}

/// Issues a host's certificate into `dir` next to a copy of the CA: what an agent needs.
pub fn install_host(ca: &ClusterCa, dir: &Path, subject: &Subject) -> Result<TlsFiles, TlsError> {
    make_private_dir(dir)?;
    write_file(&dir.join(CA_FILE), ca.cert_pem(), 0o644)?;
    ca.issue(subject)?.write(dir, "host")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly by design

    use super::*;

    #[test]
    fn a_host_certificate_carries_its_name_and_the_ca_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create("test").unwrap();
        ca.write(&dir.path().join("ca")).unwrap();
        let loaded = ClusterCa::load(&dir.path().join("ca")).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let files = install_host(
            &loaded,
            &dir.path().join("host1"),
            &Subject::host("host1", &["10.0.0.11".parse().unwrap()]),
        )
        .unwrap();
        let identity = Identity::load(&files).unwrap();
        assert_eq!(identity.name, "host1");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_certificate_from_another_ca_or_a_mismatched_key_is_refused_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let ours = ClusterCa::create("ours").unwrap();
        let theirs = ClusterCa::create("theirs").unwrap();
        let files = install_host(&ours, dir.path(), &Subject::client("host1")).unwrap();
        let other = theirs.issue(&Subject::client("host1")).unwrap();
        std::fs::write(&files.key, &other.key_pem).unwrap();
        let error = Identity::load(&files).unwrap_err().to_string();
        assert!(error.contains("host-key.pem"), "{error}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let error = Trust::load(&garbage).unwrap_err().to_string();
        assert!(
            error.contains("garbage.pem: holds no certificate"),
            "{error}"
        );
    }
}
