//! The REST face of [`ClusterApi`]: routing, bearer-token auth with roles, JSON errors,
//! the event stream and the OpenAPI document. Handlers only translate; the operations
//! decide.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::Stream;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::auth::{Identity, Role, Scope, TokenConfig};
use crate::ops::{ClusterApi, Hop};
use crate::serve::Peer;
use crate::streams::{StreamLimits, StreamPermit};
use crate::types::{
    AddMonitorRequest, CdromRequest, CdromView, CheckpointView, CloneVmRequest, CloudInitRequest,
    CreateCheckpointRequest, CreateProjectRequest, CreateTemplateRequest, CreateTokenRequest,
    CreateUserRequest, CreateVmRequest, DiskRequest, DiskView, ErrorBody, ErrorDetail, EventView,
    ExecRequest, ExecResponse, HostMonitorView, HostView, ImageView, LoginRequest, MigrateRequest,
    MonitorView, MoveDiskRequest, NicRequest, NicView, OpView, PasswordRequest, ProgressView,
    ProjectView, TemplateDiskView, TemplateView, TokenCreated, TokenView, UpdateHaRequest,
    UserView, VmView,
};
use crate::ApiError;

#[derive(Clone)]
pub struct RestState {
    pub api: Arc<ClusterApi>,
    pub tokens: Arc<Vec<TokenConfig>>,
    /// The event stream and the consoles open per token.
    pub streams: StreamLimits,
}

/// Who is calling: the role and what it reaches, the token (forwarded when another
/// host must act), and whether another agent forwarded the call.
#[derive(Clone)]
pub struct Caller {
    pub role: Role,
    pub scope: Scope,
    /// The token's id, for the audit trail.
    pub token_id: String,
    pub token: String,
    pub hop: Hop,
}

/// The largest JSON request body any route takes (image uploads stream and have none).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// JSON bodies whose errors come back in the API's error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::TooLarge(format!(
                    "request body: over the {} KiB limit for JSON requests",
                    MAX_JSON_BODY / 1024
                )))
            }
            Err(rejection) => Err(ApiError::BadRequest(json_problem(&rejection))),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> String {
    format!("request body: {}", rejection.body_text())
}

async fn authenticate(
    State(state): State<RestState>,
    mut request: Request,
    next: Next,
) -> Response {
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    // Browsers cannot set headers on a websocket: the consoles also take the token as
    // `access_token` in the query.
    let is_console =
        request.uri().path().ends_with("/console") || request.uri().path().ends_with("/vnc");
    let from_query = is_console
        .then(|| {
            request.uri().query().and_then(|query| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("access_token=").map(str::to_string))
            })
        })
        .flatten();
    let presented = from_header.or(from_query).unwrap_or_default();
    let hop = match forwarding_host(&request) {
        Ok(None) => Hop::Direct,
        Ok(Some(_)) => Hop::Forwarded,
        Err(error) => return error.into_response(),
    };
    let identity: Identity = match state.api.authenticate(&state.tokens, &presented).await {
        Ok(identity) => identity,
        Err(error) => return error.into_response(),
    };
    let caller = Caller {
        role: identity.role,
        scope: identity.scope,
        token_id: identity.token_id,
        token: presented,
        hop,
    };
    let method_name = request.method().as_str().to_string();
    match crate::policy::rule(&method_name, request.uri().path()) {
        // No such route: the router's fallback answers.
        None => {}
        Some(access) => {
            if let Err(why) = crate::policy::admit(access, caller.role, &caller.scope) {
                let response = ApiError::Forbidden(why).into_response();
                audit(
                    &state,
                    &caller,
                    request.method(),
                    request.uri().path(),
                    response.status(),
                )
                .await;
                return response;
            }
        }
    }
    // A VM route of a VM out of the caller's reach answers as if it did not exist.
    if let Some(vm) = vm_of_path(request.uri().path()) {
        if let Err(error) = check_vm_reach(&state, &caller, &vm).await {
            return error.into_response();
        }
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    if method != axum::http::Method::GET {
        audit(&state, &caller, &method, &path, response.status()).await;
    }
    response
}

/// The VM a `/api/v1/vms/{name}…` path names.
fn vm_of_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/vms/")?;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

async fn check_vm_reach(state: &RestState, caller: &Caller, vm: &str) -> Result<(), ApiError> {
    let Scope::Project(own) = &caller.scope else {
        return Ok(());
    };
    let name = crate::ops::parse_vm_name(vm)?;
    match state.api.vm_project(&name).await? {
        Some(project) if project == *own => Ok(()),
        _ => Err(ApiError::NotFound(format!("VM {name} does not exist"))),
    }
}

/// Every call that changes something is an event: the token (its id), the project,
/// the call and its result.
async fn audit(
    state: &RestState,
    caller: &Caller,
    method: &axum::http::Method,
    path: &str,
    status: StatusCode,
) {
    let subject = match vm_of_path(path) {
        Some(vm) => format!("vm/{vm}"),
        None => "api".to_string(),
    };
    let project = caller
        .scope
        .project()
        .map_or("the cluster".to_string(), |project| {
            format!("project {project}")
        });
    state
        .api
        .events()
        .record(
            &subject,
            ferry_model::events::EventKind::ApiCall,
            &format!(
                "token {} ({}, {}): {method} {path} → {}",
                caller.token_id,
                caller.role.as_str(),
                project,
                status.as_u16()
            ),
        )
        .await;
}

/// The host that forwarded this request, checked against the certificate it presented:
/// a forwarded request that does not come over that host's own certificate is refused.
fn forwarding_host(request: &Request) -> Result<Option<String>, ApiError> {
    let Some(claimed) = request.headers().get(crate::console::FORWARDED_HEADER) else {
        return Ok(None);
    };
    let peer = request
        .extensions()
        .get::<Peer>()
        .and_then(|peer| peer.certificate.clone());
    match (claimed.to_str(), peer) {
        (Ok(claimed), Some(peer)) if claimed == peer => Ok(Some(peer)),
        (claimed, peer) => Err(ApiError::Forbidden(format!(
            "a request forwarded by {} must come over that host's certificate (it came with {})",
            claimed.unwrap_or("?"),
            peer.map_or("none".to_string(), |peer| format!("{peer}'s"))
        ))),
    }
}

pub fn router(state: RestState) -> Router {
    let protected = Router::new()
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/{name}", get(get_host))
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/api/v1/vms/{name}/start", post(start_vm))
        .route("/api/v1/vms/{name}/stop", post(stop_vm))
        .route("/api/v1/vms/{name}/reset", post(reset_vm))
        .route("/api/v1/vms/{name}/ha", post(update_ha))
        .route(
            "/api/v1/vms/{name}/monitors",
            get(list_monitors).post(add_monitor),
        )
        .route(
            "/api/v1/vms/{name}/monitors/{id}",
            axum::routing::delete(remove_monitor),
        )
        .route("/api/v1/vms/{name}/exec", post(exec_vm))
        .route(
            "/api/v1/vms/{name}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route(
            "/api/v1/vms/{name}/checkpoints/{tag}",
            axum::routing::delete(delete_checkpoint),
        )
        .route(
            "/api/v1/vms/{name}/checkpoints/{tag}/revert",
            post(revert_checkpoint),
        )
        .route("/api/v1/vms/{name}/flatten", post(flatten_vm))
        .route("/api/v1/vms/{name}/clone", post(clone_vm))
        .route(
            "/api/v1/templates",
            get(list_templates).post(create_template),
        )
        .route(
            "/api/v1/templates/{name}",
            get(get_template).delete(delete_template),
        )
        .route("/api/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/api/v1/vms/{name}/disks/{disk}/move", post(move_disk))
        .route("/api/v1/vms/{name}/cdrom/{drive}", post(change_cdrom))
        .route("/api/v1/vms/{name}/console", get(serial_console))
        .route("/api/v1/vms/{name}/vnc", get(vnc_console))
        .route("/api/v1/images", get(list_images))
        .route(
            "/api/v1/images/{name}",
            get(get_image)
                .put(import_image)
                .delete(delete_image)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/api/v1/ops", get(list_ops))
        .route("/api/v1/ops/{id}", get(get_op))
        .route("/api/v1/ops/{id}/cancel", post(cancel_op))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/events/stream", get(stream_events))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/projects", get(list_projects).post(create_project))
        .route(
            "/api/v1/projects/{name}",
            get(get_project).delete(delete_project),
        )
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/{name}", axum::routing::delete(delete_user))
        .route("/api/v1/users/{name}/password", post(set_password))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(login))
        .merge(protected)
        .fallback(|| async {
            ApiError::NotFound("no such API route; see /api/v1/openapi.json".into())
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(state)
}

#[utoipa::path(get, path = "/api/v1/hosts", responses((status = 200, body = [HostView]), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn list_hosts(State(state): State<RestState>) -> Result<Json<Vec<HostView>>, ApiError> {
    Ok(Json(state.api.list_hosts().await?))
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}", params(("name" = String, Path)), responses((status = 200, body = HostView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_host(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<HostView>, ApiError> {
    Ok(Json(state.api.get_host(&name).await?))
}

#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = [VmView]), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn list_vms(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<VmView>>, ApiError> {
    let vms = state.api.list_vms().await?;
    Ok(Json(
        vms.into_iter()
            .filter(|vm| in_scope(&caller.scope, &vm.project))
            .collect(),
    ))
}

fn in_scope(scope: &Scope, project: &str) -> bool {
    match scope {
        Scope::Cluster => true,
        Scope::Project(own) => own.as_str() == project,
    }
}

/// The VMs a project's caller reaches (None: a cluster caller reaches all).
async fn vms_in_reach(
    state: &RestState,
    scope: &Scope,
) -> Result<Option<std::collections::BTreeSet<String>>, ApiError> {
    match scope {
        Scope::Cluster => Ok(None),
        Scope::Project(_) => Ok(Some(
            state
                .api
                .list_vms()
                .await?
                .into_iter()
                .filter(|vm| in_scope(scope, &vm.project))
                .map(|vm| vm.name)
                .collect(),
        )),
    }
}

/// Whether an event is about something within reach: a project's caller sees its
/// VMs' events only.
fn event_in_reach(reach: &Option<std::collections::BTreeSet<String>>, subject: &str) -> bool {
    match reach {
        None => true,
        Some(vms) => subject
            .strip_prefix("vm/")
            .is_some_and(|vm| vms.contains(vm)),
    }
}

#[utoipa::path(post, path = "/api/v1/vms", request_body = CreateVmRequest,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    ApiJson(mut request): ApiJson<CreateVmRequest>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    // A project's caller creates in its project only.
    if let Scope::Project(own) = &caller.scope {
        match request.project.as_deref() {
            None => request.project = Some(own.to_string()),
            Some(wanted) if wanted == own.as_str() => {}
            Some(other) => {
                return Err(ApiError::Forbidden(format!(
                    "a token of project {own} creates VMs in project {own}, not {other}"
                )))
            }
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(
            state
                .api
                .create_vm(request, &caller.token, caller.hop)
                .await?,
        ),
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/cdrom/{drive}", params(("name" = String, Path), ("drive" = String, Path)), request_body = CdromRequest,
    responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn change_cdrom(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path((name, drive)): Path<(String, String)>,
    ApiJson(request): ApiJson<CdromRequest>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(
        state
            .api
            .change_cdrom(&name, &drive, request.image.as_deref(), &caller.token)
            .await?,
    ))
}

/// The serial console as a binary websocket (bytes both ways).
#[utoipa::path(get, path = "/api/v1/vms/{name}/console", params(("name" = String, Path)), responses((status = 101), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody, description = "the token has 8 streams open")), security(("bearer" = [])))]
async fn serial_console(
    state: State<RestState>,
    caller: Extension<Caller>,
    name: Path<String>,
    upgrade: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    console(
        state,
        caller,
        name,
        upgrade,
        crate::console::ConsoleKind::Serial,
    )
    .await
}

/// The graphical console: RFB (VNC) over a binary websocket, what noVNC speaks.
#[utoipa::path(get, path = "/api/v1/vms/{name}/vnc", params(("name" = String, Path)), responses((status = 101), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody, description = "the token has 8 streams open")), security(("bearer" = [])))]
async fn vnc_console(
    state: State<RestState>,
    caller: Extension<Caller>,
    name: Path<String>,
    upgrade: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    console(
        state,
        caller,
        name,
        upgrade,
        crate::console::ConsoleKind::Vnc,
    )
    .await
}

async fn console(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    upgrade: axum::extract::WebSocketUpgrade,
    kind: crate::console::ConsoleKind,
) -> Result<Response, ApiError> {
    let permit = state.streams.acquire(&caller.token_id)?;
    let target = state.api.console_target(&name, kind, caller.hop).await?;
    let token = caller.token.clone();
    Ok(upgrade
        .protocols(["binary"])
        .on_upgrade(move |socket| async move {
            crate::console::serve(socket, target, token).await;
            drop(permit);
        }))
}

#[utoipa::path(get, path = "/api/v1/images", responses((status = 200, body = [ImageView])), security(("bearer" = [])))]
async fn list_images(State(state): State<RestState>) -> Result<Json<Vec<ImageView>>, ApiError> {
    Ok(Json(state.api.list_images().await?))
}

#[utoipa::path(get, path = "/api/v1/images/{name}", params(("name" = String, Path)), responses((status = 200, body = ImageView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_image(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<ImageView>, ApiError> {
    Ok(Json(state.api.get_image(&name).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ImportQuery {
    /// `qcow2`, `raw` or `iso`; detected when left out.
    format: Option<String>,
    /// The guests run a QEMU guest agent (default true).
    guest_agent: Option<bool>,
}

/// Uploads an image: the request body is the file.
#[utoipa::path(put, path = "/api/v1/images/{name}", params(("name" = String, Path), ImportQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ImageView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn import_image(
    State(state): State<RestState>,
    Path(name): Path<String>,
    Query(query): Query<ImportQuery>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<ImageView>), ApiError> {
    let format = query
        .format
        .as_deref()
        .map(str::parse::<ferry_model::cluster::ImageKind>)
        .transpose()
        .map_err(|error| ApiError::BadRequest(format!("format: {error}")))?;
    let view = state
        .api
        .import_image(
            &name,
            format,
            query.guest_agent.unwrap_or(true),
            body.into_data_stream(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(delete, path = "/api/v1/images/{name}", params(("name" = String, Path)), responses((status = 200), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_image(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.api.delete_image(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_vm(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.api.get_vm(&name).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}", params(("name" = String, Path)), responses((status = 200), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_vm(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.api.delete_vm(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/start", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn start_vm(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.api.start_vm(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/ha", params(("name" = String, Path)), request_body = UpdateHaRequest, responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn update_ha(
    State(state): State<RestState>,
    Path(name): Path<String>,
    Json(update): Json<UpdateHaRequest>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.api.update_ha(&name, &update).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/monitors", params(("name" = String, Path)), responses((status = 200, body = Vec<MonitorView>), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn list_monitors(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<MonitorView>>, ApiError> {
    Ok(Json(state.api.list_monitors(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/monitors", params(("name" = String, Path)), request_body = AddMonitorRequest, responses((status = 200, body = MonitorView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn add_monitor(
    State(state): State<RestState>,
    Path(name): Path<String>,
    Json(request): Json<AddMonitorRequest>,
) -> Result<Json<MonitorView>, ApiError> {
    Ok(Json(state.api.add_monitor(&name, &request).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/monitors/{id}", params(("name" = String, Path), ("id" = String, Path)), responses((status = 200), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn remove_monitor(
    State(state): State<RestState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.api.remove_monitor(&name, &id).await?;
    Ok(Json(serde_json::json!({"removed": id})))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn stop_vm(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.api.stop_vm(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/reset", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn reset_vm(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.api.reset_vm(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/exec", params(("name" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResponse), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn exec_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    Ok(Json(
        state
            .api
            .exec_vm(&name, request, &caller.token, caller.hop)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/checkpoints", params(("name" = String, Path)),
    responses((status = 200, body = [CheckpointView], description = "the tree, depth first"), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn list_checkpoints(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<CheckpointView>>, ApiError> {
    Ok(Json(state.api.list_checkpoints(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/checkpoints", params(("name" = String, Path)), request_body = CreateCheckpointRequest,
    responses((status = 200, body = OpView, description = "the op, completed"), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_checkpoint(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<CreateCheckpointRequest>,
) -> Result<Json<OpView>, ApiError> {
    Ok(Json(
        state
            .api
            .create_checkpoint(&name, request, &caller.token, caller.hop)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/checkpoints/{tag}/revert", params(("name" = String, Path), ("tag" = String, Path)),
    responses((status = 200, body = OpView, description = "the op, completed"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn revert_checkpoint(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path((name, tag)): Path<(String, String)>,
) -> Result<Json<OpView>, ApiError> {
    Ok(Json(
        state
            .api
            .revert_checkpoint(&name, &tag, &caller.token, caller.hop)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/checkpoints/{tag}", params(("name" = String, Path), ("tag" = String, Path)),
    responses((status = 200, body = OpView, description = "the op, completed"), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_checkpoint(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path((name, tag)): Path<(String, String)>,
) -> Result<Json<OpView>, ApiError> {
    Ok(Json(
        state
            .api
            .delete_checkpoint(&name, &tag, &caller.token, caller.hop)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/flatten", params(("name" = String, Path)),
    responses((status = 200, body = OpView, description = "the op, completed"), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn flatten_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<OpView>, ApiError> {
    Ok(Json(
        state
            .api
            .flatten_vm(&name, &caller.token, caller.hop)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/clone", params(("name" = String, Path)), request_body = CloneVmRequest,
    responses((status = 201, body = VmView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn clone_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<CloneVmRequest>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let view = state
        .api
        .clone_vm(&name, request, &caller.token, caller.hop)
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/templates", responses((status = 200, body = [TemplateView])), security(("bearer" = [])))]
async fn list_templates(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TemplateView>>, ApiError> {
    let templates = state.api.list_templates().await?;
    Ok(Json(
        templates
            .into_iter()
            .filter(|template| template_in_reach(&caller.scope, &template.project))
            .collect(),
    ))
}

/// A project's caller uses its own project's templates and the default project's.
fn template_in_reach(scope: &Scope, project: &str) -> bool {
    in_scope(scope, project) || project == ferry_model::access::default_project().as_str()
}

#[utoipa::path(get, path = "/api/v1/templates/{name}", params(("name" = String, Path)),
    responses((status = 200, body = TemplateView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_template(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<TemplateView>, ApiError> {
    let template = state.api.get_template(&name).await?;
    if !template_in_reach(&caller.scope, &template.project) {
        return Err(ApiError::NotFound(format!(
            "template {name} does not exist"
        )));
    }
    Ok(Json(template))
}

#[utoipa::path(post, path = "/api/v1/templates", request_body = CreateTemplateRequest,
    responses((status = 201, body = TemplateView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_template(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CreateTemplateRequest>,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    check_vm_reach(&state, &caller, &request.from_vm).await?;
    let view = state
        .api
        .create_template(request, &caller.token, caller.hop)
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(delete, path = "/api/v1/templates/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "linked clones use it")), security(("bearer" = [])))]
async fn delete_template(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let template = state.api.get_template(&name).await?;
    if !in_scope(&caller.scope, &template.project) {
        return Err(ApiError::NotFound(format!(
            "template {name} does not exist"
        )));
    }
    state.api.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", params(("name" = String, Path)), request_body = MigrateRequest,
    responses((status = 202, body = OpView), (status = 409, body = ErrorBody, description = "refused: the reason names the check")), security(("bearer" = [])))]
async fn migrate_vm(
    State(state): State<RestState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<MigrateRequest>,
) -> Result<(StatusCode, Json<OpView>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(state.api.migrate_vm(&name, request).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/disks/{disk}/move", params(("name" = String, Path), ("disk" = String, Path)), request_body = MoveDiskRequest,
    responses((status = 202, body = OpView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn move_disk(
    State(state): State<RestState>,
    Path((name, disk)): Path<(String, String)>,
    ApiJson(request): ApiJson<MoveDiskRequest>,
) -> Result<(StatusCode, Json<OpView>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(state.api.move_disk(&name, &disk, request).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/ops", responses((status = 200, body = [OpView])), security(("bearer" = [])))]
async fn list_ops(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<OpView>>, ApiError> {
    let reach = vms_in_reach(&state, &caller.scope).await?;
    let ops = state.api.list_ops().await?;
    Ok(Json(
        ops.into_iter()
            .filter(|op| reach.as_ref().is_none_or(|vms| vms.contains(&op.vm)))
            .collect(),
    ))
}

/// An op of a VM out of the caller's reach answers as if it did not exist.
async fn op_in_reach(state: &RestState, caller: &Caller, id: &str) -> Result<OpView, ApiError> {
    let op = state.api.get_op(id).await?;
    match check_vm_reach(state, caller, &op.vm).await {
        Err(ApiError::NotFound(_)) => Err(ApiError::NotFound(format!("op {id} does not exist"))),
        Err(other) => Err(other),
        Ok(()) => Ok(op),
    }
}

#[utoipa::path(get, path = "/api/v1/ops/{id}", params(("id" = String, Path)), responses((status = 200, body = OpView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_op(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<OpView>, ApiError> {
    Ok(Json(op_in_reach(&state, &caller, &id).await?))
}

#[utoipa::path(post, path = "/api/v1/ops/{id}/cancel", params(("id" = String, Path)), responses((status = 200, body = OpView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn cancel_op(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<OpView>, ApiError> {
    op_in_reach(&state, &caller, &id).await?;
    Ok(Json(state.api.cancel_op(&id).await?))
}

#[derive(Deserialize)]
struct EventQuery {
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/events", params(("limit" = Option<usize>, Query)), responses((status = 200, body = [EventView])), security(("bearer" = [])))]
async fn list_events(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<EventQuery>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    let reach = vms_in_reach(&state, &caller.scope).await?;
    let events = state
        .api
        .list_events(query.limit.unwrap_or(100).min(10_000))
        .await?;
    Ok(Json(
        events
            .into_iter()
            .filter(|event| event_in_reach(&reach, &event.subject))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/events/stream", responses((status = 200, description = "server-sent events, one EventView per `data:` line"), (status = 429, body = ErrorBody, description = "the token has 8 streams open")), security(("bearer" = [])))]
async fn stream_events(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let permit = state.streams.acquire(&caller.token_id)?;
    let store = state.api.store().clone();
    let prefix = store.keys().events();
    // Start after what exists now: the stream shows new events.
    let (_, revision) = store.list_raw(&prefix).await?;
    let mut watch = ferry_store::PrefixWatch::resume(&store, &prefix, revision + 1);
    let state = state.clone();
    let stream = async_stream(permit, move |sender| async move {
        while let Some(change) = watch.next().await {
            if let ferry_store::WatchEvent::Put { value, .. } = change {
                if let Ok(event) = serde_json::from_slice::<ferry_model::cluster::Event>(&value) {
                    // A project's VMs change while the stream runs: ask, for each
                    // event, the project of its VM.
                    if caller.scope != Scope::Cluster {
                        let Some(vm) = event.subject.strip_prefix("vm/") else {
                            continue;
                        };
                        if let Err(error) = check_vm_reach(&state, &caller, vm).await {
                            if !matches!(error, ApiError::NotFound(_)) {
                                tracing::warn!("event stream: the project of VM {vm}: {error}");
                            }
                            continue;
                        }
                    }
                    let view = EventView {
                        at_ms: event.at_ms,
                        source: event.source,
                        subject: event.subject,
                        kind: event.kind,
                        message: event.message,
                    };
                    let data = serde_json::to_string(&view).unwrap_or_default();
                    if sender
                        .send(Ok(SseEvent::default().data(data)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A stream fed by a task through a channel (the task ends when the client goes away).
/// The stream holds `permit`: the client's place is freed when the response is dropped,
/// even while no event comes to show the task that nobody listens.
fn async_stream<F, Fut>(
    permit: StreamPermit,
    producer: F,
) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(sender));
    futures::stream::unfold((receiver, permit), |(mut receiver, permit)| async move {
        receiver.recv().await.map(|item| (item, (receiver, permit)))
    })
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn create_token(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let identity = Identity {
        role: caller.role,
        scope: caller.scope.clone(),
        token_id: caller.token_id.clone(),
    };
    Ok((
        StatusCode::CREATED,
        Json(state.api.create_token(&identity, &request).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, body = [TokenView]), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn list_tokens(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(state.api.list_tokens(&caller.scope).await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn revoke_token(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.api.revoke_token(&caller.scope, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/projects", request_body = CreateProjectRequest,
    responses((status = 201, body = ProjectView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_project(
    State(state): State<RestState>,
    ApiJson(request): ApiJson<CreateProjectRequest>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.api.create_project(&request).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/projects", responses((status = 200, body = [ProjectView])), security(("bearer" = [])))]
async fn list_projects(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    Ok(Json(state.api.list_projects(&caller.scope).await?))
}

#[utoipa::path(get, path = "/api/v1/projects/{name}", params(("name" = String, Path)), responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_project(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    Ok(Json(state.api.get_project(&caller.scope, &name).await?))
}

#[utoipa::path(delete, path = "/api/v1/projects/{name}", params(("name" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_project(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.api.delete_project(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/users", request_body = CreateUserRequest,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_user(
    State(state): State<RestState>,
    ApiJson(request): ApiJson<CreateUserRequest>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.api.create_user(&request).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/users", responses((status = 200, body = [UserView]), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn list_users(State(state): State<RestState>) -> Result<Json<Vec<UserView>>, ApiError> {
    Ok(Json(state.api.list_users().await?))
}

#[utoipa::path(delete, path = "/api/v1/users/{name}", params(("name" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_user(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.api.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/users/{name}/password", params(("name" = String, Path)), request_body = PasswordRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn set_password(
    State(state): State<RestState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<PasswordRequest>,
) -> Result<StatusCode, ApiError> {
    state.api.set_password(&name, &request.password).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A user's password for a session token (12 hours).
#[utoipa::path(post, path = "/api/v1/login", request_body = LoginRequest,
    responses((status = 201, body = TokenCreated), (status = 401, body = ErrorBody)))]
async fn login(
    State(state): State<RestState>,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.api.login(&request.user, &request.password).await?),
    ))
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Ferry API", description = "A high-availability virtualization cluster for QEMU/KVM. A JSON request body may be at most 1 MiB (larger ones are answered 413 with code too_large); an image upload (PUT /api/v1/images/{name}) streams its file and has no limit."),
    paths(list_hosts, get_host, list_vms, create_vm, list_checkpoints, create_checkpoint, revert_checkpoint, delete_checkpoint, flatten_vm, clone_vm, list_templates, get_template, create_template, delete_template, change_cdrom, serial_console, vnc_console, list_images, get_image, import_image, delete_image, get_vm, delete_vm, start_vm, stop_vm, reset_vm, update_ha, list_monitors, add_monitor, remove_monitor, exec_vm, migrate_vm, move_disk, list_ops, get_op, cancel_op, list_events, stream_events, create_token, list_tokens, revoke_token, create_project, list_projects, get_project, delete_project, create_user, list_users, delete_user, set_password, login),
    components(schemas(CreateCheckpointRequest, CheckpointView, CreateTemplateRequest, TemplateView, TemplateDiskView, CloneVmRequest, HostView, HostMonitorView, VmView, CreateVmRequest, DiskRequest, NicRequest, CloudInitRequest, ImageView, CdromRequest, DiskView, CdromView, NicView, UpdateHaRequest, AddMonitorRequest, MonitorView, ExecRequest, ExecResponse, EventView, ErrorBody, ErrorDetail, MigrateRequest, MoveDiskRequest, OpView, ProgressView, CreateTokenRequest, TokenView, TokenCreated, CreateProjectRequest, ProjectView, CreateUserRequest, UserView, PasswordRequest, LoginRequest)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;
