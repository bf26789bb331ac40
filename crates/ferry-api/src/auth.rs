//! Who is calling. Tokens live in etcd (`ferry token create`) as the SHA-256 of their
//! secret, or as bootstrap tokens in the agents' root-only configs (also only their
//! SHA-256); users log in with a password (argon2) and get a session token. Comparing
//! digests of equal length in constant time hides both the secret and its length.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use ferry_model::access::{Role, Scope};

/// A bootstrap token of the agent config, cluster-wide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// SHA-256 of the secret, hex (`ferry token hash` prints it).
    pub sha256: String,
    pub role: Role,
}

/// A caller's identity once its token checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub scope: Scope,
    /// The token's id (`config-N` for bootstrap tokens), never its secret.
    pub token_id: String,
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `presented` hashes to `stored_hex`, in constant time.
pub fn digest_matches(presented: &str, stored_hex: &str) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    match hex::decode(stored_hex) {
        Ok(stored) if stored.len() == presented.len() => {
            bool::from(presented.as_slice().ct_eq(stored.as_slice()))
        }
        _ => false,
    }
}

/// The bootstrap token `presented` is, if any. Every entry is compared, so timing does
/// not say which one matched.
pub fn config_identity(tokens: &[TokenConfig], presented: &str) -> Option<Identity> {
    let mut found = None;
    for (index, candidate) in tokens.iter().enumerate() {
        if digest_matches(presented, &candidate.sha256) && !presented.is_empty() {
            found = Some(Identity {
                role: candidate.role,
                scope: Scope::Cluster,
                token_id: format!("config-{}", index + 1),
            });
        }
    }
    found
}

/// Random bytes from the kernel, hex.
pub fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|error| format!("no randomness: {error}"))?;
    Ok(hex::encode(buffer))
}

/// A new token: its id and its secret `fy_{id}_{256 random bits}`.
pub fn new_token() -> Result<(String, String), String> {
    let id = random_hex(6)?;
    let secret = format!("fy_{id}_{}", random_hex(32)?);
    Ok((id, secret))
}

/// The id inside a token secret of `new_token`'s form.
pub fn token_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix("fy_")?;
    let (id, _) = rest.split_once('_')?;
    (!id.is_empty() && id.bytes().all(|byte| byte.is_ascii_hexdigit())).then_some(id)
}

/// argon2id of a password, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|error| format!("no randomness: {error}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|error| error.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| error.to_string())
}

pub fn password_matches(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tokens_match_by_digest_and_near_misses_do_not() {
        let tokens = vec![
            TokenConfig {
                sha256: sha256_hex("secret-admin"),
                role: Role::Admin,
            },
            TokenConfig {
                sha256: sha256_hex("secret-view"),
                role: Role::Viewer,
            },
        ];
        let role = |presented: &str| config_identity(&tokens, presented).map(|id| id.role);
        assert_eq!(role("secret-admin"), Some(Role::Admin));
        assert_eq!(role("secret-view"), Some(Role::Viewer));
        assert_eq!(role("secret-admiN"), None);
        assert_eq!(role("secret"), None);
        assert_eq!(role(""), None);
        assert_eq!(
            config_identity(&tokens, "secret-view").map(|id| id.token_id),
            Some("config-2".to_string())
        );
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn a_new_token_carries_its_id_and_a_password_hash_checks_only_its_password() {
        let (id, secret) = new_token().unwrap_or_default();
        assert_eq!(token_id(&secret), Some(id.as_str()));
        assert!(secret.len() > 64, "{secret}");
        assert_eq!(token_id("fy__x"), None);
        assert_eq!(token_id("plain-token"), None);
        let phc = hash_password("correct horse").unwrap_or_default();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(password_matches("correct horse", &phc));
        assert!(!password_matches("correct horsE", &phc));
        assert!(!password_matches("correct horse", "not a hash"));
    }
}
