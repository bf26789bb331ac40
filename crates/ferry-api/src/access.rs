//! Tokens, users and projects: the operations behind `ferry token|user|project` and
//! the portal's login, and the two checks every other operation leans on — whether a
//! caller reaches an object, and whether a project's quota holds a new VM.

use std::time::Duration;

use ferry_model::access::{
    default_project, quota_exceeded, ProjectRecord, Quota, Role, Scope, TokenRecord, Usage,
    UserRecord,
};
use ferry_model::cluster::{now_ms, RECORD_VERSION};
use ferry_model::{Bytes, ProjectName, UserName, VmName};
use ferry_store::Read;

use crate::auth::{config_identity, digest_matches, new_token, sha256_hex, Identity, TokenConfig};
use crate::ops::ClusterApi;
use crate::types::{
    CreateProjectRequest, CreateTokenRequest, CreateUserRequest, ProjectView, TokenCreated,
    TokenView, UserView,
};
use crate::ApiError;

/// How long a portal login lasts.
const SESSION: Duration = Duration::from_secs(12 * 3600);

fn parse_role(text: &str) -> Result<Role, ApiError> {
    text.parse().map_err(ApiError::BadRequest)
}

fn parse_project(text: &str) -> Result<ProjectName, ApiError> {
    text.parse()
        .map_err(|error| ApiError::BadRequest(format!("project: {error}")))
}

fn parse_user(text: &str) -> Result<UserName, ApiError> {
    text.parse()
        .map_err(|error| ApiError::BadRequest(format!("user: {error}")))
}

fn token_view(record: &TokenRecord) -> TokenView {
    TokenView {
        id: record.id.clone(),
        role: record.role.as_str().into(),
        project: record.project.as_ref().map(ToString::to_string),
        created_ms: record.created_ms,
        expires_ms: record.expires_ms,
        comment: record.comment.clone(),
        user: record.user.as_ref().map(ToString::to_string),
    }
}

/// A cluster admin reaches every token, a project's admin its project's tokens.
fn token_in_reach(scope: &Scope, token: &TokenRecord) -> bool {
    token
        .project
        .as_ref()
        .map_or(*scope == Scope::Cluster, |project| scope.reaches(project))
}

fn unreadable(what: &str, detail: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("{what} cannot be read: {detail}"))
}

impl ClusterApi {
    /// The identity behind a presented secret: a token of etcd (`fy_…`), else a
    /// bootstrap token of the config. A token that cannot be read is unavailable, not
    /// unauthorized: etcd may be down.
    pub async fn authenticate(
        &self,
        bootstrap: &[TokenConfig],
        presented: &str,
    ) -> Result<Identity, ApiError> {
        let Some(id) = crate::auth::token_id(presented) else {
            return config_identity(bootstrap, presented).ok_or(ApiError::Unauthorized);
        };
        let record = match self
            .store
            .read::<TokenRecord>(&self.store.keys().token(id))
            .await?
        {
            Read::Present(record) => record.value,
            Read::Absent => return Err(ApiError::Unauthorized),
            Read::Unreadable(problem) => return Err(unreadable(&format!("token {id}"), problem)),
        };
        if !digest_matches(presented, &record.sha256) {
            return Err(ApiError::Unauthorized);
        }
        if record.expires_ms.is_some_and(|expires| expires <= now_ms()) {
            return Err(ApiError::Unauthorized);
        }
        Ok(Identity {
            role: record.role,
            scope: Scope::from_project(record.project),
            token_id: record.id,
        })
    }

    /// Makes a token; its secret is in the answer only.
    pub async fn create_token(
        &self,
        caller: &Identity,
        request: &CreateTokenRequest,
    ) -> Result<TokenCreated, ApiError> {
        let role = parse_role(&request.role)?;
        let project = request.project.as_deref().map(parse_project).transpose()?;
        // A project's admin makes tokens of its project, never stronger than its own.
        match (&caller.scope, &project) {
            (Scope::Cluster, _) => {}
            (Scope::Project(own), Some(wanted)) if own == wanted && role <= caller.role => {}
            (Scope::Project(own), _) => {
                return Err(ApiError::Forbidden(format!(
                    "a token of project {own} makes tokens of project {own} only, with at \
                     most its own role"
                )))
            }
        }
        if let Some(project) = &project {
            self.require_project(project).await?;
        }
        let expires_ms = match request.expires.as_deref() {
            None => None,
            Some(text) => {
                let span = humantime::parse_duration(text)
                    .map_err(|error| ApiError::BadRequest(format!("expires: {text}: {error}")))?;
                Some(now_ms() + u64::try_from(span.as_millis()).unwrap_or(u64::MAX / 2))
            }
        };
        self.issue_token(role, project, expires_ms, request.comment.clone(), None)
            .await
    }

    async fn issue_token(
        &self,
        role: Role,
        project: Option<ProjectName>,
        expires_ms: Option<u64>,
        comment: Option<String>,
        user: Option<UserName>,
    ) -> Result<TokenCreated, ApiError> {
        let (id, secret) = new_token().map_err(ApiError::Internal)?;
        let record = TokenRecord {
            version: RECORD_VERSION,
            id: id.clone(),
            sha256: sha256_hex(&secret),
            role,
            project,
            created_ms: now_ms(),
            expires_ms,
            comment: comment.unwrap_or_default(),
            user,
        };
        self.store
            .create(&self.store.keys().token(&id), &record, "token")
            .await?;
        Ok(TokenCreated {
            token: token_view(&record),
            secret,
        })
    }

    /// Tokens the caller may see: all for the cluster's admins, its project's for a
    /// project's.
    pub async fn list_tokens(&self, scope: &Scope) -> Result<Vec<TokenView>, ApiError> {
        let listing = self
            .store
            .list_each::<TokenRecord>(&self.store.keys().tokens())
            .await?;
        Ok(listing
            .readable()
            .into_iter()
            .map(|(_, record)| record)
            .filter(|record| token_in_reach(scope, &record.value))
            .map(|record| token_view(&record.value))
            .collect())
    }

    pub async fn revoke_token(&self, scope: &Scope, id: &str) -> Result<(), ApiError> {
        let key = self.store.keys().token(id);
        let record = match self.store.read::<TokenRecord>(&key).await? {
            Read::Present(record) => record.value,
            Read::Absent => return Err(ApiError::NotFound(format!("token {id} does not exist"))),
            // An unreadable token is still revoked: deleting it is what the admin asked.
            Read::Unreadable(_) => {
                if *scope != Scope::Cluster {
                    return Err(ApiError::NotFound(format!("token {id} does not exist")));
                }
                self.store.delete(&key).await?;
                return Ok(());
            }
        };
        if !token_in_reach(scope, &record) {
            return Err(ApiError::NotFound(format!("token {id} does not exist")));
        }
        self.store.delete(&key).await?;
        Ok(())
    }

    // ----- users -----

    pub async fn create_user(&self, request: &CreateUserRequest) -> Result<UserView, ApiError> {
        let name = parse_user(&request.name)?;
        let role = parse_role(&request.role)?;
        let project = request.project.as_deref().map(parse_project).transpose()?;
        if request.password.chars().count() < 8 {
            return Err(ApiError::BadRequest(
                "password: at least 8 characters".into(),
            ));
        }
        if let Some(project) = &project {
            self.require_project(project).await?;
        }
        let record = UserRecord {
            version: RECORD_VERSION,
            name: name.clone(),
            password_hash: crate::auth::hash_password(&request.password)
                .map_err(ApiError::Internal)?,
            role,
            project,
            created_ms: now_ms(),
        };
        self.store
            .create(&self.store.keys().user(&name), &record, "user")
            .await
            .map_err(|error| match error {
                ferry_store::StoreError::Exists { .. } => {
                    ApiError::Conflict(format!("user {name} exists"))
                }
                other => other.into(),
            })?;
        Ok(user_view(&record))
    }

    pub async fn list_users(&self) -> Result<Vec<UserView>, ApiError> {
        let listing = self
            .store
            .list_each::<UserRecord>(&self.store.keys().users())
            .await?;
        Ok(listing
            .readable()
            .into_iter()
            .map(|(_, record)| user_view(&record.value))
            .collect())
    }

    async fn user(&self, name: &UserName) -> Result<ferry_store::Versioned<UserRecord>, ApiError> {
        match self
            .store
            .read::<UserRecord>(&self.store.keys().user(name))
            .await?
        {
            Read::Present(record) => Ok(record),
            Read::Absent => Err(ApiError::NotFound(format!("user {name} does not exist"))),
            Read::Unreadable(problem) => Err(unreadable(&format!("user {name}"), problem)),
        }
    }

    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), ApiError> {
        let name = parse_user(name)?;
        if password.chars().count() < 8 {
            return Err(ApiError::BadRequest(
                "password: at least 8 characters".into(),
            ));
        }
        let current = self.user(&name).await?;
        let mut record = current.value;
        record.password_hash = crate::auth::hash_password(password).map_err(ApiError::Internal)?;
        self.store
            .compare_and_swap(
                &self.store.keys().user(&name),
                current.mod_revision,
                &record,
            )
            .await?;
        Ok(())
    }

    pub async fn delete_user(&self, name: &str) -> Result<(), ApiError> {
        let name = parse_user(name)?;
        self.user(&name).await?;
        self.store.delete(&self.store.keys().user(&name)).await?;
        // Its sessions end with it.
        let sessions = self
            .store
            .list_each::<TokenRecord>(&self.store.keys().tokens())
            .await?;
        for session in sessions
            .readable()
            .into_iter()
            .map(|(_, token)| token)
            .filter(|token| token.value.user.as_ref() == Some(&name))
        {
            self.store
                .delete(&self.store.keys().token(&session.value.id))
                .await?;
        }
        Ok(())
    }

    /// A session token for a user whose password checks out. A wrong user and a
    /// wrong password get the same answer.
    pub async fn login(&self, user: &str, password: &str) -> Result<TokenCreated, ApiError> {
        let name = parse_user(user).map_err(|_| ApiError::Unauthorized)?;
        let record = match self.user(&name).await {
            Ok(record) => record.value,
            Err(ApiError::NotFound(_)) => {
                // The same work as a real check, so timing does not tell names apart.
                crate::auth::password_matches(password, DUMMY_HASH);
                return Err(ApiError::Unauthorized);
            }
            Err(other) => return Err(other),
        };
        if !crate::auth::password_matches(password, &record.password_hash) {
            return Err(ApiError::Unauthorized);
        }
        let expires = now_ms() + u64::try_from(SESSION.as_millis()).unwrap_or(u64::MAX / 2);
        self.issue_token(
            record.role,
            record.project,
            Some(expires),
            Some(format!("session of user {name}")),
            Some(name),
        )
        .await
    }

    // ----- projects -----

    pub async fn create_project(
        &self,
        request: &CreateProjectRequest,
    ) -> Result<ProjectView, ApiError> {
        let name = parse_project(&request.name)?;
        let size = |field: &str, text: &Option<String>| -> Result<Option<Bytes>, ApiError> {
            text.as_deref()
                .map(|text| {
                    text.parse::<Bytes>()
                        .map_err(|error| ApiError::BadRequest(format!("{field}: {error}")))
                })
                .transpose()
        };
        let record = ProjectRecord {
            version: RECORD_VERSION,
            name: name.clone(),
            quota: Quota {
                max_vms: request.max_vms,
                max_vcpus: request.max_vcpus,
                max_memory: size("max_memory", &request.max_memory)?,
                max_disk: size("max_disk", &request.max_disk)?,
                max_backups: request.max_backups,
            },
            created_ms: now_ms(),
        };
        self.store
            .create(&self.store.keys().project(&name), &record, "project")
            .await
            .map_err(|error| match error {
                ferry_store::StoreError::Exists { .. } => {
                    ApiError::Conflict(format!("project {name} exists"))
                }
                other => other.into(),
            })?;
        Ok(project_view(&record, &Usage::default()))
    }

    /// The project's record; `default` exists without one (no quota).
    async fn project_record(&self, name: &ProjectName) -> Result<ProjectRecord, ApiError> {
        match self
            .store
            .read::<ProjectRecord>(&self.store.keys().project(name))
            .await?
        {
            Read::Present(record) => Ok(record.value),
            Read::Absent if *name == default_project() => Ok(ProjectRecord {
                version: RECORD_VERSION,
                name: name.clone(),
                quota: Quota::default(),
                created_ms: 0,
            }),
            Read::Absent => Err(ApiError::NotFound(format!("project {name} does not exist"))),
            Read::Unreadable(problem) => Err(unreadable(&format!("project {name}"), problem)),
        }
    }

    async fn require_project(&self, name: &ProjectName) -> Result<(), ApiError> {
        self.project_record(name).await.map(drop)
    }

    pub async fn list_projects(&self, scope: &Scope) -> Result<Vec<ProjectView>, ApiError> {
        let listing = self
            .store
            .list_each::<ProjectRecord>(&self.store.keys().projects())
            .await?;
        let mut names: Vec<ProjectName> = listing
            .readable()
            .into_iter()
            .map(|(_, record)| record.value.name.clone())
            .collect();
        if !names.contains(&default_project()) {
            names.insert(0, default_project());
        }
        let mut views = Vec::new();
        for name in names.into_iter().filter(|name| scope.reaches(name)) {
            views.push(self.get_project(scope, name.as_str()).await?);
        }
        Ok(views)
    }

    pub async fn get_project(&self, scope: &Scope, name: &str) -> Result<ProjectView, ApiError> {
        let name = parse_project(name)?;
        if !scope.reaches(&name) {
            return Err(ApiError::NotFound(format!("project {name} does not exist")));
        }
        let record = self.project_record(&name).await?;
        let (usage, _) = self.project_usage(&name).await?;
        Ok(project_view(&record, &usage))
    }

    pub async fn delete_project(&self, name: &str) -> Result<(), ApiError> {
        let name = parse_project(name)?;
        if name == default_project() {
            return Err(ApiError::Conflict(
                "project default cannot be deleted".into(),
            ));
        }
        self.project_record(&name).await?;
        let (_, vms) = self.project_usage(&name).await?;
        if !vms.is_empty() {
            let names: Vec<String> = vms.iter().map(ToString::to_string).collect();
            return Err(ApiError::Conflict(format!(
                "project {name} still holds VMs: {}",
                names.join(", ")
            )));
        }
        self.store.delete(&self.store.keys().project(&name)).await?;
        Ok(())
    }

    /// What a project's VMs use, and their names. A VM whose record cannot be read
    /// makes the usage unknown: a quota is never checked against a guess.
    pub async fn project_usage(
        &self,
        project: &ProjectName,
    ) -> Result<(Usage, Vec<VmName>), ApiError> {
        let mut usage = Usage::default();
        let mut names = Vec::new();
        for (name, entry) in self.vm_entries().await? {
            if let Some(part) = entry.unreadable.keys().next() {
                return Err(ApiError::Unavailable(format!(
                    "VM {name}: its {part:?} cannot be read, so project usage is unknown"
                )));
            }
            let Some(record) = entry.record.as_ref().map(|record| &record.value) else {
                continue;
            };
            if record.project != *project {
                continue;
            }
            let disk = record
                .spec
                .disks
                .iter()
                .filter_map(|disk| disk.size)
                .fold(0u64, |sum, size| sum + size.0);
            usage.add(record.spec.cpus, record.spec.memory, Bytes(disk));
            names.push(record.spec.name.clone());
        }
        Ok((usage, names))
    }

    /// Refuses (403, naming the quota, its limit and the usage) a VM of `wanted` that
    /// the project's quota does not hold.
    pub async fn check_quota(&self, project: &ProjectName, wanted: &Usage) -> Result<(), ApiError> {
        let record = self.project_record(project).await?;
        if record.quota == Quota::default() {
            return Ok(());
        }
        let (used, _) = self.project_usage(project).await?;
        match quota_exceeded(project, &record.quota, &used, wanted) {
            Some(message) => Err(ApiError::Forbidden(message)),
            None => Ok(()),
        }
    }

    /// The project of a VM, for the access check of a VM route. A VM that does not
    /// exist has none (the route answers 404 itself).
    pub async fn vm_project(&self, name: &VmName) -> Result<Option<ProjectName>, ApiError> {
        let entry = self.vm_entry(name).await?;
        Ok(entry.record.map(|record| record.value.project))
    }
}

/// A valid argon2 hash of nothing anyone knows, for the login of an unknown user.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1l5bXyqQ1xkz9LzFvM8JQ7n6yXgVhD4mAQ2o8cWsy0k";

fn user_view(record: &UserRecord) -> UserView {
    UserView {
        name: record.name.to_string(),
        role: record.role.as_str().into(),
        project: record.project.as_ref().map(ToString::to_string),
        created_ms: record.created_ms,
    }
}

fn project_view(record: &ProjectRecord, usage: &Usage) -> ProjectView {
    ProjectView {
        name: record.name.to_string(),
        max_vms: record.quota.max_vms,
        max_vcpus: record.quota.max_vcpus,
        max_memory_mib: record.quota.max_memory.map(|bytes| bytes.as_mib()),
        max_disk_gib: record.quota.max_disk.map(|bytes| bytes.0 / Bytes::GIB),
        max_backups: record.quota.max_backups,
        vms: usage.vms,
        vcpus: usage.vcpus,
        memory_mib: usage.memory.as_mib(),
        disk_gib: usage.disk.0 / Bytes::GIB,
    }
}
