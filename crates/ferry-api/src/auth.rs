//! Bearer tokens and roles. Viewers read; operators also start, stop, reset and exec;
//! admins also create and delete.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub role: Role,
}

/// Finds the role of a presented token. Comparison does not stop at the first differing
/// byte, so response timing does not reveal how much of a guess was right.
pub fn role_of(tokens: &[TokenConfig], presented: &str) -> Option<Role> {
    let mut found = None;
    for candidate in tokens {
        let same_length = candidate.token.len() == presented.len();
        let differences = candidate
            .token
            .bytes()
            .zip(presented.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if same_length && differences == 0 && !presented.is_empty() {
            found = Some(candidate.role);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_roles_and_near_misses_do_not() {
        let tokens = vec![
            TokenConfig {
                token: "secret-admin".into(),
                role: Role::Admin,
            },
            TokenConfig {
                token: "secret-view".into(),
                role: Role::Viewer,
            },
        ];
        assert_eq!(role_of(&tokens, "secret-admin"), Some(Role::Admin));
        assert_eq!(role_of(&tokens, "secret-view"), Some(Role::Viewer));
        assert_eq!(role_of(&tokens, "secret-admiN"), None);
        assert_eq!(role_of(&tokens, "secret"), None);
        assert_eq!(role_of(&tokens, ""), None);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }
}
