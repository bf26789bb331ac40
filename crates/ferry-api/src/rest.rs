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

use crate::auth::{role_of, Role, TokenConfig};
use crate::ops::{ClusterApi, Hop};
use crate::serve::Peer;
use crate::streams::{StreamLimits, StreamPermit};
use crate::types::{
    AddMonitorRequest, CdromRequest, CdromView, CloudInitRequest, CreateVmRequest, DiskRequest,
    DiskView, ErrorBody, ErrorDetail, EventView, ExecRequest, ExecResponse, HostMonitorView,
    HostView, ImageView, MigrateRequest, MonitorView, MoveDiskRequest, NicRequest, NicView, OpView,
    ProgressView, UpdateHaRequest, VmView,
};
use crate::ApiError;

#[derive(Clone)]
pub struct RestState {
    pub api: Arc<ClusterApi>,
    pub tokens: Arc<Vec<TokenConfig>>,
    /// The event stream and the consoles open per token.
    pub streams: StreamLimits,
}

/// Who is calling: the role and the token (forwarded when another host must act), and
/// whether another agent forwarded the call.
#[derive(Clone)]
pub struct Caller {
    pub role: Role,
    pub token: String,
    pub hop: Hop,
}

impl Caller {
    fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                format!(
                    "this needs the {needed:?} role; the token has {:?}",
                    self.role
                )
                .to_lowercase(),
            ))
        }
    }
}

/// JSON bodies whose errors come back in the API's error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
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
    match role_of(&state.tokens, &presented) {
        Some(role) => {
            request.extensions_mut().insert(Caller {
                role,
                token: presented,
                hop,
            });
            next.run(request).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
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
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .merge(protected)
        .fallback(|| async {
            ApiError::NotFound("no such API route; see /api/v1/openapi.json".into())
        })
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
async fn list_vms(State(state): State<RestState>) -> Result<Json<Vec<VmView>>, ApiError> {
    Ok(Json(state.api.list_vms().await?))
}

#[utoipa::path(post, path = "/api/v1/vms", request_body = CreateVmRequest,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CreateVmRequest>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    caller.require(Role::Admin)?;
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
    caller.require(Role::Operator)?;
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
    caller.require(Role::Operator)?;
    let permit = state.streams.acquire(&caller.token)?;
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
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<ImportQuery>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<ImageView>), ApiError> {
    caller.require(Role::Admin)?;
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
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Role::Admin)?;
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
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Role::Admin)?;
    state.api.delete_vm(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/start", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn start_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    caller.require(Role::Operator)?;
    Ok(Json(state.api.start_vm(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/ha", params(("name" = String, Path)), request_body = UpdateHaRequest, responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn update_ha(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(update): Json<UpdateHaRequest>,
) -> Result<Json<VmView>, ApiError> {
    caller.require(Role::Operator)?;
    Ok(Json(state.api.update_ha(&name, &update).await?))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/monitors", params(("name" = String, Path)), responses((status = 200, body = Vec<MonitorView>), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn list_monitors(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Vec<MonitorView>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(state.api.list_monitors(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/monitors", params(("name" = String, Path)), request_body = AddMonitorRequest, responses((status = 200, body = MonitorView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn add_monitor(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(request): Json<AddMonitorRequest>,
) -> Result<Json<MonitorView>, ApiError> {
    caller.require(Role::Operator)?;
    Ok(Json(state.api.add_monitor(&name, &request).await?))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}/monitors/{id}", params(("name" = String, Path), ("id" = String, Path)), responses((status = 200), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn remove_monitor(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Role::Operator)?;
    state.api.remove_monitor(&name, &id).await?;
    Ok(Json(serde_json::json!({"removed": id})))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn stop_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    caller.require(Role::Operator)?;
    Ok(Json(state.api.stop_vm(&name).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/reset", params(("name" = String, Path)), responses((status = 200, body = VmView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn reset_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    caller.require(Role::Operator)?;
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
    caller.require(Role::Operator)?;
    Ok(Json(
        state
            .api
            .exec_vm(&name, request, &caller.token, caller.hop)
            .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", params(("name" = String, Path)), request_body = MigrateRequest,
    responses((status = 202, body = OpView), (status = 409, body = ErrorBody, description = "refused: the reason names the check")), security(("bearer" = [])))]
async fn migrate_vm(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<MigrateRequest>,
) -> Result<(StatusCode, Json<OpView>), ApiError> {
    caller.require(Role::Operator)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(state.api.migrate_vm(&name, request).await?),
    ))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/disks/{disk}/move", params(("name" = String, Path), ("disk" = String, Path)), request_body = MoveDiskRequest,
    responses((status = 202, body = OpView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn move_disk(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path((name, disk)): Path<(String, String)>,
    ApiJson(request): ApiJson<MoveDiskRequest>,
) -> Result<(StatusCode, Json<OpView>), ApiError> {
    caller.require(Role::Operator)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(state.api.move_disk(&name, &disk, request).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/ops", responses((status = 200, body = [OpView])), security(("bearer" = [])))]
async fn list_ops(State(state): State<RestState>) -> Result<Json<Vec<OpView>>, ApiError> {
    Ok(Json(state.api.list_ops().await?))
}

#[utoipa::path(get, path = "/api/v1/ops/{id}", params(("id" = String, Path)), responses((status = 200, body = OpView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_op(
    State(state): State<RestState>,
    Path(id): Path<String>,
) -> Result<Json<OpView>, ApiError> {
    Ok(Json(state.api.get_op(&id).await?))
}

#[utoipa::path(post, path = "/api/v1/ops/{id}/cancel", params(("id" = String, Path)), responses((status = 200, body = OpView), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn cancel_op(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<OpView>, ApiError> {
    caller.require(Role::Operator)?;
    Ok(Json(state.api.cancel_op(&id).await?))
}

#[derive(Deserialize)]
struct EventQuery {
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/events", params(("limit" = Option<usize>, Query)), responses((status = 200, body = [EventView])), security(("bearer" = [])))]
async fn list_events(
    State(state): State<RestState>,
    Query(query): Query<EventQuery>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    Ok(Json(
        state
            .api
            .list_events(query.limit.unwrap_or(100).min(10_000))
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/events/stream", responses((status = 200, description = "server-sent events, one EventView per `data:` line"), (status = 429, body = ErrorBody, description = "the token has 8 streams open")), security(("bearer" = [])))]
async fn stream_events(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let permit = state.streams.acquire(&caller.token)?;
    let store = state.api.store().clone();
    let prefix = store.keys().events();
    // Start after what exists now: the stream shows new events.
    let (_, revision) = store.list_raw(&prefix).await?;
    let mut watch = ferry_store::PrefixWatch::resume(&store, &prefix, revision + 1);
    let stream = async_stream(permit, move |sender| async move {
        while let Some(change) = watch.next().await {
            if let ferry_store::WatchEvent::Put { value, .. } = change {
                if let Ok(event) = serde_json::from_slice::<ferry_model::cluster::Event>(&value) {
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
    info(title = "Ferry API", description = "A high-availability virtualization cluster for QEMU/KVM."),
    paths(list_hosts, get_host, list_vms, create_vm, change_cdrom, serial_console, vnc_console, list_images, get_image, import_image, delete_image, get_vm, delete_vm, start_vm, stop_vm, reset_vm, update_ha, list_monitors, add_monitor, remove_monitor, exec_vm, migrate_vm, move_disk, list_ops, get_op, cancel_op, list_events, stream_events),
    components(schemas(HostView, HostMonitorView, VmView, CreateVmRequest, DiskRequest, NicRequest, CloudInitRequest, ImageView, CdromRequest, DiskView, CdromView, NicView, UpdateHaRequest, AddMonitorRequest, MonitorView, ExecRequest, ExecResponse, EventView, ErrorBody, ErrorDetail, MigrateRequest, MoveDiskRequest, OpView, ProgressView)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;
