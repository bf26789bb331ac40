//! Fence-device secrets sealed in etcd. A fence option whose key names a secret
//! (`password`, `passwd`, anything with `password` or `secret` in it) is encrypted with
//! the cluster key before this host's device record is written, and opened again by the
//! leader just before it runs the fence agent. The key (32 random bytes) is in a file
//! only root reads (`cluster.secret_key_file`, mode 0600), the same on every host; etcd
//! never sees it. A sealed value is `enc:v1:<base64 of nonce ‖ ciphertext ‖ tag>`:
//! ChaCha20-Poly1305 with a random 96-bit nonce per value and the host and option key as
//! associated data, so a value copied into another record or option does not open.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The prefix of a sealed option value.
pub const SEALED_PREFIX: &str = "enc:v1:";
pub const KEY_LEN: usize = 32;

/// A fence option whose value must not sit in etcd in clear.
pub fn is_secret(option: &str) -> bool {
    let option = option.to_ascii_lowercase();
    option == "passwd" || option.contains("password") || option.contains("secret")
}

/// The cluster key. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_LEN]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Result<ClusterKey, String> {
        let mut bytes = [0; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| "the system's random source failed".to_string())?;
        Ok(ClusterKey(bytes))
    }

    /// Reads the key file: exactly 32 bytes, readable by its owner only.
    pub fn load(path: &Path) -> Result<ClusterKey, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let metadata = std::fs::metadata(path).map_err(|error| format!("{shown}: {error}"))?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown}: mode {mode:04o} lets others read the cluster key; chmod 600 it"
            ));
        }
        let bytes = std::fs::read(path).map_err(|error| format!("{shown}: {error}"))?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            format!(
                "{shown}: {} bytes; the cluster key is {KEY_LEN} random bytes (head -c {KEY_LEN} /dev/urandom)",
                bytes.len()
            )
        })?;
        Ok(ClusterKey(bytes))
    }

    /// Writes the key to a new or existing file, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let shown = path.display();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|error| format!("{shown}: {error}"))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(&self.0))
            .map_err(|error| format!("{shown}: {error}"))
    }

    fn aead(&self) -> LessSafeKey {
        // 32 bytes is CHACHA20_POLY1305's key length: this cannot fail.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &self.0)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key"));
        LessSafeKey::new(unbound)
    }

    /// Seals `plain`, bound to `context` (which must be given again to open it).
    pub fn seal(&self, context: &str, plain: &str) -> Result<String, String> {
        let mut nonce = [0; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the system's random source failed".to_string())?;
        let mut data = plain.as_bytes().to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| "cannot encrypt".to_string())?;
        let mut sealed = nonce.to_vec();
        sealed.extend(data);
        Ok(format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(sealed)
        ))
    }

    /// Opens a value `seal` made with the same key and context.
    pub fn open(&self, context: &str, sealed: &str) -> Result<String, String> {
        let encoded = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or_else(|| format!("not a sealed value (no {SEALED_PREFIX} prefix)"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|error| format!("not base64: {error}"))?;
        if bytes.len() < NONCE_LEN {
            return Err("too short to hold a nonce".into());
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| "too short to hold a nonce".to_string())?;
        let mut data = data.to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| {
                "does not open with this host's cluster key (another cluster's key, or altered)"
                    .to_string()
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "opens to something not UTF-8".into())
    }
}

/// What binds a sealed option to its record: host and option key.
fn context(host: &str, option: &str) -> String {
    format!("ferry fence {host} {option}")
}

/// The options as they go to etcd: each secret sealed. A secret without a key is an
/// error (the config check refuses that at start-up).
pub fn seal_options(
    key: Option<&ClusterKey>,
    host: &str,
    options: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    options
        .iter()
        .map(|(option, value)| {
            if !is_secret(option) || value.starts_with(SEALED_PREFIX) {
                return Ok((option.clone(), value.clone()));
            }
            let key = key.ok_or_else(|| {
                format!("fence.options.{option}: a secret needs cluster.secret_key_file to be sealed in etcd")
            })?;
            Ok((option.clone(), key.seal(&context(host, option), value)?))
        })
        .collect()
}

/// The options as the fence agent gets them: each sealed value opened. One that does not
/// open is an error naming the host and the option, never passed on as it is.
pub fn open_options(
    key: Option<&ClusterKey>,
    host: &str,
    options: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    options
        .iter()
        .map(|(option, value)| {
            if !value.starts_with(SEALED_PREFIX) {
                return Ok((option.clone(), value.clone()));
            }
            let problem = |why: String| {
                format!("fence device of {host}: option {option} cannot be decrypted: {why}")
            };
            let key = key.ok_or_else(|| {
                problem("this agent has no cluster key (cluster.secret_key_file)".into())
            })?;
            let plain = key.open(&context(host, option), value).map_err(problem)?;
            Ok((option.clone(), plain))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn secrets_are_named_by_their_key() {
        for secret in [
            "password",
            "passwd",
            "ipmi_password",
            "api_secret",
            "Password",
        ] {
            assert!(is_secret(secret), "{secret}");
        }
        for plain in ["ip", "username", "plug", "lanplus", "pass"] {
            assert!(!is_secret(plain), "{plain}");
        }
    }

    #[test]
    fn secret_fence_options_are_sealed_for_etcd_and_open_with_the_cluster_key() {
        let key = ClusterKey::generate().unwrap();
        let plain = options(&[("ip", "10.0.9.11"), ("password", "hunter2")]);
        let sealed = seal_options(Some(&key), "host2", &plain).unwrap();
        assert_eq!(sealed["ip"], "10.0.9.11");
        assert!(sealed["password"].starts_with("enc:v1:"), "{sealed:?}");
        assert!(!sealed["password"].contains("hunter2"));
        // A fresh nonce per value: the same secret never seals the same way twice.
        let again = seal_options(Some(&key), "host2", &plain).unwrap();
        assert_ne!(again["password"], sealed["password"]);
        assert_eq!(open_options(Some(&key), "host2", &sealed).unwrap(), plain);
    }

    #[test]
    fn a_secret_that_does_not_open_is_an_error_never_the_ciphertext() {
        let key = ClusterKey::generate().unwrap();
        let sealed = seal_options(Some(&key), "host2", &options(&[("password", "x")])).unwrap();
        let other = ClusterKey::generate().unwrap();
        let wrong_key = open_options(Some(&other), "host2", &sealed).unwrap_err();
        assert!(
            wrong_key.starts_with("fence device of host2: option password cannot be decrypted"),
            "{wrong_key}"
        );
        let no_key = open_options(None, "host2", &sealed).unwrap_err();
        assert!(no_key.contains("no cluster key"), "{no_key}");
        // Moved to another host's record: the associated data no longer matches.
        assert!(open_options(Some(&key), "host3", &sealed).is_err());
        let mut altered = sealed.clone();
        altered.insert("password".into(), format!("{SEALED_PREFIX}AAAA"));
        assert!(open_options(Some(&key), "host2", &altered).is_err());
    }

    #[test]
    fn a_secret_without_a_cluster_key_is_not_written_in_clear() {
        let problem = seal_options(None, "host2", &options(&[("passwd", "x")])).unwrap_err();
        assert!(problem.contains("cluster.secret_key_file"), "{problem}");
        let plain = options(&[("ip", "10.0.9.11")]);
        assert_eq!(seal_options(None, "host2", &plain).unwrap(), plain);
    }

    #[test]
    fn the_key_file_is_written_0600_and_a_readable_or_short_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key = ClusterKey::generate().unwrap();
        key.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), key);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(ClusterKey::load(&path)
            .unwrap_err()
            .contains("lets others read"));
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClusterKey::load(&path).unwrap_err().contains("5 bytes"));
    }
}
