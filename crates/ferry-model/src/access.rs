//! Who may do what: roles, API tokens, portal users and projects with quotas, as etcd
//! keeps them. A token's secret is never stored: only its SHA-256 (a high-entropy
//! secret needs no slow hash); a user's password only as an argon2 hash.

use serde::{Deserialize, Serialize};

use crate::{Bytes, ProjectName, UserName};

/// Viewers read; operators also start, stop, reset, migrate and exec; admins also
/// create and delete. Within a project a role reaches that project's objects only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role {other:?}: use viewer, operator or admin")),
        }
    }
}

/// What a caller reaches: the whole cluster, or one project's objects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Cluster,
    Project(ProjectName),
}

impl Scope {
    pub fn from_project(project: Option<ProjectName>) -> Scope {
        project.map_or(Scope::Cluster, Scope::Project)
    }

    /// Whether an object of `project` is within reach.
    pub fn reaches(&self, project: &ProjectName) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Project(own) => own == project,
        }
    }

    pub fn project(&self) -> Option<&ProjectName> {
        match self {
            Scope::Cluster => None,
            Scope::Project(project) => Some(project),
        }
    }
}

/// The project every object without one belongs to.
pub fn default_project() -> ProjectName {
    ProjectName::try_from("default".to_string()).unwrap_or_else(|_| unreachable!())
}

/// `tokens/{id}`: an API token. The secret the caller holds is `fy_{id}_{random}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub version: u32,
    pub id: String,
    /// SHA-256 of the whole secret, hex.
    pub sha256: String,
    pub role: Role,
    /// None: the whole cluster.
    pub project: Option<ProjectName>,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    #[serde(default)]
    pub comment: String,
    /// The user a login session belongs to.
    #[serde(default)]
    pub user: Option<UserName>,
}

/// `users/{name}`: a portal user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub version: u32,
    pub name: UserName,
    /// argon2id, PHC string.
    pub password_hash: String,
    pub role: Role,
    pub project: Option<ProjectName>,
    pub created_ms: u64,
}

/// What a project may hold at most; None: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_vms: Option<u32>,
    pub max_vcpus: Option<u32>,
    pub max_memory: Option<Bytes>,
    pub max_disk: Option<Bytes>,
    pub max_backups: Option<u32>,
}

/// `projects/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRecord {
    pub version: u32,
    pub name: ProjectName,
    pub quota: Quota,
    pub created_ms: u64,
}

/// What a project holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub vms: u32,
    pub vcpus: u32,
    pub memory: Bytes,
    pub disk: Bytes,
}

impl Usage {
    pub fn add(&mut self, vcpus: u32, memory: Bytes, disk: Bytes) {
        self.vms += 1;
        self.vcpus += vcpus;
        self.memory = Bytes(self.memory.0 + memory.0);
        self.disk = Bytes(self.disk.0 + disk.0);
    }
}

/// The first quota the project would pass by adding `wanted` to `used`, as the 403's
/// message: the quota, its limit and the usage.
pub fn quota_exceeded(
    project: &ProjectName,
    quota: &Quota,
    used: &Usage,
    wanted: &Usage,
) -> Option<String> {
    let over = |name: &str, limit: u64, used: u64, wanted: u64, show: &dyn Fn(u64) -> String| {
        (used + wanted > limit).then(|| {
            format!(
                "project {project}: quota {name} is {}, {} in use, this needs {} more",
                show(limit),
                show(used),
                show(wanted)
            )
        })
    };
    let count = |value: u64| value.to_string();
    let size = |value: u64| Bytes(value).to_string();
    let checks = [
        quota.max_vms.and_then(|limit| {
            over(
                "max-vms",
                limit.into(),
                used.vms.into(),
                wanted.vms.into(),
                &count,
            )
        }),
        quota.max_vcpus.and_then(|limit| {
            over(
                "max-vcpus",
                limit.into(),
                used.vcpus.into(),
                wanted.vcpus.into(),
                &count,
            )
        }),
        quota
            .max_memory
            .and_then(|limit| over("max-memory", limit.0, used.memory.0, wanted.memory.0, &size)),
        quota
            .max_disk
            .and_then(|limit| over("max-disk", limit.0, used.disk.0, wanted.disk.0, &size)),
    ];
    checks.into_iter().flatten().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> ProjectName {
        "team-a".parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn the_first_quota_passed_is_named_with_its_limit_and_usage() {
        let quota = Quota {
            max_vms: Some(3),
            max_vcpus: Some(4),
            max_memory: Some(Bytes(2 * Bytes::GIB)),
            ..Quota::default()
        };
        let used = Usage {
            vms: 1,
            vcpus: 3,
            memory: Bytes(Bytes::GIB),
            disk: Bytes(0),
        };
        let one = |vcpus: u32, memory: u64| Usage {
            vms: 1,
            vcpus,
            memory: Bytes(memory),
            disk: Bytes(0),
        };
        assert_eq!(
            quota_exceeded(&project(), &quota, &used, &one(1, Bytes::GIB)),
            None
        );
        assert_eq!(
            quota_exceeded(&project(), &quota, &used, &one(2, Bytes::GIB)).as_deref(),
            Some("project team-a: quota max-vcpus is 4, 3 in use, this needs 2 more")
        );
        assert!(
            quota_exceeded(&project(), &quota, &used, &one(1, 2 * Bytes::GIB))
                .is_some_and(|message| message.contains("quota max-memory is 2 GiB"))
        );
        assert_eq!(
            quota_exceeded(
                &project(),
                &Quota::default(),
                &used,
                &one(64, 64 * Bytes::GIB)
            ),
            None
        );
    }

    #[test]
    fn a_project_scope_reaches_its_own_objects_only() {
        let own = Scope::Project(project());
        assert!(own.reaches(&project()));
        assert!(!own.reaches(&default_project()));
        assert!(Scope::Cluster.reaches(&project()));
    }
}
