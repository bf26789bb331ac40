//! Who may call which route: one table, enforced before any handler runs (so a caller
//! without the right learns nothing from a body or a path), and checked by the suite
//! against the OpenAPI document, so a new route without a rule fails the tests.
//!
//! A project's caller reaches only its project's VMs, ops and events (others answer
//! 404, as if they did not exist); the cluster's own objects (images it imports,
//! projects, users) need a caller of the whole cluster.

use ferry_model::access::{Role, Scope};

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No token (the OpenAPI document, the login).
    Public,
    /// At least this role; a project's caller within its project.
    Role(Role),
    /// An admin of the whole cluster.
    ClusterAdmin,
}

/// Every route of the API: method, path (`{x}` is one segment), what it needs.
pub const POLICY: &[(&str, &str, Access)] = &[
    ("GET", "/api/v1/openapi.json", Access::Public),
    ("POST", "/api/v1/login", Access::Public),
    ("GET", "/api/v1/hosts", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/hosts/{name}", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/vms", Access::Role(Role::Viewer)),
    ("POST", "/api/v1/vms", Access::Role(Role::Admin)),
    ("GET", "/api/v1/vms/{name}", Access::Role(Role::Viewer)),
    ("DELETE", "/api/v1/vms/{name}", Access::Role(Role::Admin)),
    (
        "POST",
        "/api/v1/vms/{name}/start",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/stop",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/reset",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ha",
        Access::Role(Role::Operator),
    ),
    (
        "GET",
        "/api/v1/vms/{name}/monitors",
        Access::Role(Role::Viewer),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/monitors",
        Access::Role(Role::Operator),
    ),
    (
        "DELETE",
        "/api/v1/vms/{name}/monitors/{id}",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/exec",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/migrate",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/disks/{disk}/move",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/cdrom/{drive}",
        Access::Role(Role::Operator),
    ),
    (
        "GET",
        "/api/v1/vms/{name}/console",
        Access::Role(Role::Operator),
    ),
    (
        "GET",
        "/api/v1/vms/{name}/vnc",
        Access::Role(Role::Operator),
    ),
    (
        "GET",
        "/api/v1/vms/{name}/checkpoints",
        Access::Role(Role::Viewer),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/checkpoints",
        Access::Role(Role::Operator),
    ),
    (
        "DELETE",
        "/api/v1/vms/{name}/checkpoints/{tag}",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/checkpoints/{tag}/revert",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/flatten",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/clone",
        Access::Role(Role::Admin),
    ),
    ("GET", "/api/v1/templates", Access::Role(Role::Viewer)),
    ("POST", "/api/v1/templates", Access::Role(Role::Admin)),
    (
        "GET",
        "/api/v1/templates/{name}",
        Access::Role(Role::Viewer),
    ),
    (
        "DELETE",
        "/api/v1/templates/{name}",
        Access::Role(Role::Admin),
    ),
    ("GET", "/api/v1/images", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/images/{name}", Access::Role(Role::Viewer)),
    ("PUT", "/api/v1/images/{name}", Access::ClusterAdmin),
    ("DELETE", "/api/v1/images/{name}", Access::ClusterAdmin),
    ("GET", "/api/v1/ops", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/ops/{id}", Access::Role(Role::Viewer)),
    (
        "POST",
        "/api/v1/ops/{id}/cancel",
        Access::Role(Role::Operator),
    ),
    ("GET", "/api/v1/events", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/events/stream", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/tokens", Access::Role(Role::Admin)),
    ("POST", "/api/v1/tokens", Access::Role(Role::Admin)),
    ("DELETE", "/api/v1/tokens/{id}", Access::Role(Role::Admin)),
    ("GET", "/api/v1/projects", Access::Role(Role::Viewer)),
    ("POST", "/api/v1/projects", Access::ClusterAdmin),
    ("GET", "/api/v1/projects/{name}", Access::Role(Role::Viewer)),
    ("DELETE", "/api/v1/projects/{name}", Access::ClusterAdmin),
    ("GET", "/api/v1/users", Access::ClusterAdmin),
    ("POST", "/api/v1/users", Access::ClusterAdmin),
    ("DELETE", "/api/v1/users/{name}", Access::ClusterAdmin),
    (
        "POST",
        "/api/v1/users/{name}/password",
        Access::ClusterAdmin,
    ),
];

/// Whether `path` fits `template` segment by segment (`{x}` takes any one segment).
fn fits(template: &str, path: &str) -> bool {
    let mut wanted = template.split('/');
    let mut given = path.split('/');
    loop {
        match (wanted.next(), given.next()) {
            (None, None) => return true,
            (Some(want), Some(got)) => {
                let wildcard = want.starts_with('{') && want.ends_with('}');
                let fits_segment = if wildcard {
                    !got.is_empty()
                } else {
                    want == got
                };
                if !fits_segment {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// The rule of a route; None: no such route.
pub fn rule(method: &str, path: &str) -> Option<Access> {
    POLICY
        .iter()
        .find(|(want_method, template, _)| *want_method == method && fits(template, path))
        .map(|(_, _, access)| *access)
}

/// Refuses a caller the rule does not let in, with the reason.
pub fn admit(access: Access, role: Role, scope: &Scope) -> Result<(), String> {
    let needed = match access {
        Access::Public => return Ok(()),
        Access::Role(needed) => needed,
        Access::ClusterAdmin => Role::Admin,
    };
    if role < needed {
        return Err(format!(
            "this needs the {} role; the token has {}",
            needed.as_str(),
            role.as_str()
        ));
    }
    if let (Access::ClusterAdmin, Scope::Project(project)) = (access, scope) {
        return Err(format!(
            "this needs a token of the whole cluster; this one is of project {project}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_fit_their_templates_segment_by_segment() {
        assert_eq!(
            rule("POST", "/api/v1/vms/web/start"),
            Some(Access::Role(Role::Operator))
        );
        assert_eq!(
            rule("DELETE", "/api/v1/vms/web/monitors/http"),
            Some(Access::Role(Role::Operator))
        );
        assert_eq!(rule("POST", "/api/v1/vms//start"), None);
        assert_eq!(rule("GET", "/api/v1/vms/web/start"), None);
        assert_eq!(rule("GET", "/api/v1/vms/web/extra/deep"), None);
        assert_eq!(rule("PUT", "/api/v1/images/x"), Some(Access::ClusterAdmin));
    }

    #[test]
    fn a_rule_admits_by_role_and_cluster_rules_refuse_a_project() {
        let project = Scope::Project("team-a".parse().unwrap_or_else(|_| unreachable!()));
        let operate = Access::Role(Role::Operator);
        assert!(admit(operate, Role::Viewer, &Scope::Cluster).is_err());
        assert!(admit(operate, Role::Operator, &project).is_ok());
        assert!(admit(Access::ClusterAdmin, Role::Admin, &project)
            .is_err_and(|why| why.contains("project team-a")));
        assert!(admit(Access::ClusterAdmin, Role::Admin, &Scope::Cluster).is_ok());
        assert!(admit(Access::Public, Role::Viewer, &project).is_ok());
    }
}
