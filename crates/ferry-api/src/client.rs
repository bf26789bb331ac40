//! The HTTP client over the REST API: the CLI's (and a forwarding agent's) way to call
//! the operations. Each method mirrors one operation of [`crate::ops::ClusterApi`].

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{
    CheckpointView, CloneVmRequest, CreateCheckpointRequest, CreateTemplateRequest,
    CreateVmRequest, ErrorBody, EventView, ExecRequest, ExecResponse, HostView, ImageView,
    MigrateRequest, MoveDiskRequest, OpView, TemplateView, VmView,
};
use crate::ApiError;

#[derive(Clone)]
pub struct ApiClient {
    /// Agents' API URLs: any of them answers any request. A request that cannot
    /// connect to one goes to the next (it never reached a server, so it is safe to
    /// send again); the one that answered is tried first next time.
    bases: Vec<String>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: String,
    http: reqwest::Client,
    /// The cluster CA alone (consoles' websockets use it too).
    tls: std::sync::Arc<rustls::ClientConfig>,
}

/// Turns a response into its value, or into the API's error.
pub async fn decode_response<T: DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ApiError> {
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|error| ApiError::Unavailable(format!("reading the reply: {error}")))?;
    if status.is_success() {
        // 204 No Content: the answer is "done", nothing more.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        return serde_json::from_slice(bytes)
            .map_err(|error| ApiError::Internal(format!("unexpected reply ({error})")));
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(ApiError::from_body(status.as_u16(), &body)),
        Err(_) => Err(ApiError::Internal(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes).trim()
        ))),
    }
}

/// A websocket to the API (consoles).
pub type ConsoleStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the websocket at `url` with the bearer token; `forwarded` marks an agent's
/// hop to the VM's host.
pub async fn connect_websocket(
    url: &str,
    token: &str,
    forwarded_by: Option<&str>,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<ConsoleStream, ApiError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url
        .into_client_request()
        .map_err(|error| ApiError::BadRequest(format!("console URL {url}: {error}")))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::BadRequest("the token is not a valid header value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    if let Some(host) = forwarded_by {
        let value = host
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("host name {host} is not a header value")))?;
        request
            .headers_mut()
            .insert(crate::console::FORWARDED_HEADER, value);
    }
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    match tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
        .await
    {
        Ok((stream, _)) => Ok(stream),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.body().clone().unwrap_or_default();
            match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(body) => Err(ApiError::from_body(status, &body)),
                Err(_) => Err(ApiError::Unavailable(format!("{url}: HTTP {status}"))),
            }
        }
        Err(error) => Err(ApiError::Unavailable(format!("{url}: {error}"))),
    }
}

impl ApiClient {
    /// The serial or graphical console of a VM, as a websocket of bytes.
    pub async fn console(
        &self,
        name: &str,
        kind: crate::console::ConsoleKind,
    ) -> Result<ConsoleStream, ApiError> {
        let base = &self.bases[self.current.load(std::sync::atomic::Ordering::Relaxed)];
        let ws = base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        connect_websocket(
            &format!("{ws}/api/v1/vms/{name}/{}", kind.path()),
            &self.token,
            None,
            self.tls.clone(),
        )
        .await
    }

    /// A client of the agent at `base` (`https://…`) that trusts the cluster CA alone.
    pub fn new(base: &str, token: &str, trust: &ferry_tls::Trust) -> Result<ApiClient, ApiError> {
        let tls = trust
            .client_config(None)
            .map_err(|error| ApiError::BadRequest(error.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            // A host whose link is cut never refuses: give up connecting soon and try
            // the next agent.
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| ApiError::BadRequest(format!("HTTP client: {error}")))?;
        Ok(ApiClient {
            bases: vec![base.trim_end_matches('/').to_string()],
            current: Default::default(),
            token: token.to_string(),
            http,
            tls: std::sync::Arc::new(tls),
        })
    }

    /// The client a client config describes: its agents, its token, its CA.
    pub fn from_config(config: &crate::client_config::ClientConfig) -> Result<ApiClient, ApiError> {
        let trust = ferry_tls::Trust::load(&config.ca)
            .map_err(|error| ApiError::BadRequest(format!("the cluster CA: {error}")))?;
        Ok(ApiClient::new(&config.api, &config.token, &trust)?.with_fallbacks(&config.fallback))
    }

    /// Also tries these agents, in order, when the ones before cannot be reached.
    pub fn with_fallbacks(mut self, others: &[String]) -> ApiClient {
        self.bases.extend(
            others
                .iter()
                .map(|base| base.trim_end_matches('/').to_string()),
        );
        self
    }

    /// Sends what `build` makes for a base URL, trying the next agent on connect errors.
    async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::Relaxed);
        let mut causes = Vec::new();
        for offset in 0..self.bases.len() {
            let index = (first + offset) % self.bases.len();
            let base = &self.bases[index];
            match build(base).send().await {
                Ok(response) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(error) if error.is_connect() => {
                    causes.push(format!("{base}: {}", root_cause(&error)));
                }
                Err(error) => {
                    return Err(ApiError::Unavailable(format!(
                        "cannot reach the Ferry API at {base}: {}",
                        root_cause(&error)
                    )))
                }
            }
        }
        Err(ApiError::Unavailable(format!(
            "cannot reach the Ferry API at {}",
            causes.join("; ")
        )))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let response = self
            .send(|base| {
                let request = self
                    .http
                    .request(method.clone(), format!("{base}/api/v1{path}"))
                    .bearer_auth(&self.token)
                    .timeout(timeout);
                match body {
                    Some(body) => request.json(body),
                    None => request,
                }
            })
            .await?;
        decode_response(response).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call(
            reqwest::Method::GET,
            path,
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        self.call(reqwest::Method::POST, path, body, timeout).await
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>, ApiError> {
        self.get("/hosts").await
    }

    pub async fn get_host(&self, name: &str) -> Result<HostView, ApiError> {
        self.get(&format!("/hosts/{name}")).await
    }

    pub async fn list_vms(&self) -> Result<Vec<VmView>, ApiError> {
        self.get("/vms").await
    }

    pub async fn get_vm(&self, name: &str) -> Result<VmView, ApiError> {
        self.get(&format!("/vms/{name}")).await
    }

    pub async fn create_vm(&self, request: &CreateVmRequest) -> Result<VmView, ApiError> {
        // Copying a large image into the VM's first disk takes a while.
        self.post("/vms", Some(request), Duration::from_secs(900))
            .await
    }

    pub async fn change_cdrom(
        &self,
        name: &str,
        drive: &str,
        image: Option<&str>,
    ) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/cdrom/{drive}"),
            Some(&crate::types::CdromRequest {
                image: image.map(str::to_string),
            }),
            Duration::from_secs(60),
        )
        .await
    }

    pub async fn list_images(&self) -> Result<Vec<ImageView>, ApiError> {
        self.get("/images").await
    }

    pub async fn get_image(&self, name: &str) -> Result<ImageView, ApiError> {
        self.get(&format!("/images/{name}")).await
    }

    pub async fn delete_image(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/images/{name}"),
            None::<&()>,
            Duration::from_secs(60),
        )
        .await
    }

    /// Uploads `file` as image `name`; `sent` is told the bytes sent so far.
    pub async fn import_image(
        &self,
        name: &str,
        file: &std::path::Path,
        format: Option<&str>,
        guest_agent: bool,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<ImageView, ApiError> {
        use futures::StreamExt;
        // What the agent would refuse before reading the upload is checked here first:
        // a server that answers early closes the stream, and the client would see only
        // a broken pipe instead of the reason.
        crate::images::check_image_name(name)?;
        if let Some(format) = format {
            format
                .parse::<ferry_model::cluster::ImageKind>()
                .map_err(|error| ApiError::BadRequest(format!("format: {error}")))?;
        }
        match self.get_image(name).await {
            Ok(_) => {
                return Err(ApiError::Conflict(format!(
                    "image {name} already exists (ferry image delete {name} first)"
                )))
            }
            Err(ApiError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
        let opened = tokio::fs::File::open(file).await.map_err(|error| {
            ApiError::BadRequest(format!("cannot read {}: {error}", file.display()))
        })?;
        let mut total = 0u64;
        let stream =
            tokio_util::io::ReaderStream::with_capacity(opened, 1 << 20).map(move |chunk| {
                if let Ok(bytes) = &chunk {
                    total += bytes.len() as u64;
                    sent(total);
                }
                chunk
            });
        let base = &self.bases[self.current.load(std::sync::atomic::Ordering::Relaxed)];
        let mut query = vec![("guest_agent", guest_agent.to_string())];
        if let Some(format) = format {
            query.push(("format", format.to_string()));
        }
        let response = self
            .http
            .put(format!("{base}/api/v1/images/{name}"))
            .query(&query)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|error| {
                ApiError::Unavailable(format!("uploading to {base}: {}", root_cause(&error)))
            })?;
        decode_response(response).await
    }

    pub async fn start_vm(&self, name: &str) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/start"),
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn add_monitor(
        &self,
        name: &str,
        request: &crate::types::AddMonitorRequest,
    ) -> Result<crate::types::MonitorView, ApiError> {
        self.post(
            &format!("/vms/{name}/monitors"),
            Some(request),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn list_monitors(
        &self,
        name: &str,
    ) -> Result<Vec<crate::types::MonitorView>, ApiError> {
        self.get(&format!("/vms/{name}/monitors")).await
    }

    pub async fn remove_monitor(
        &self,
        name: &str,
        id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/vms/{name}/monitors/{id}"),
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn update_ha(
        &self,
        name: &str,
        update: &crate::types::UpdateHaRequest,
    ) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/ha"),
            Some(update),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn stop_vm(&self, name: &str) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/stop"),
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn reset_vm(&self, name: &str) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/reset"),
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn delete_vm(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/vms/{name}"),
            None::<&()>,
            Duration::from_secs(90),
        )
        .await
    }

    pub async fn exec_vm(
        &self,
        name: &str,
        request: &ExecRequest,
    ) -> Result<ExecResponse, ApiError> {
        let timeout = Duration::from_secs(request.timeout_seconds.unwrap_or(30) + 15);
        self.post(&format!("/vms/{name}/exec"), Some(request), timeout)
            .await
    }

    pub async fn migrate_vm(
        &self,
        name: &str,
        request: &MigrateRequest,
    ) -> Result<OpView, ApiError> {
        self.post(
            &format!("/vms/{name}/migrate"),
            Some(request),
            Duration::from_secs(30),
        )
        .await
    }

    /// Long calls: a memory save of a large guest, a full copy of a large disk.
    const LONG_CALL: Duration = Duration::from_secs(3600);

    pub async fn create_checkpoint(
        &self,
        name: &str,
        request: &CreateCheckpointRequest,
    ) -> Result<OpView, ApiError> {
        self.post(
            &format!("/vms/{name}/checkpoints"),
            Some(request),
            Self::LONG_CALL,
        )
        .await
    }

    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<CheckpointView>, ApiError> {
        self.get(&format!("/vms/{name}/checkpoints")).await
    }

    pub async fn revert_checkpoint(&self, name: &str, tag: &str) -> Result<OpView, ApiError> {
        self.post(
            &format!("/vms/{name}/checkpoints/{tag}/revert"),
            None::<&()>,
            Self::LONG_CALL,
        )
        .await
    }

    pub async fn delete_checkpoint(&self, name: &str, tag: &str) -> Result<OpView, ApiError> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/vms/{name}/checkpoints/{tag}"),
            None::<&()>,
            Self::LONG_CALL,
        )
        .await
    }

    pub async fn flatten_vm(&self, name: &str) -> Result<OpView, ApiError> {
        self.post(
            &format!("/vms/{name}/flatten"),
            None::<&()>,
            Self::LONG_CALL,
        )
        .await
    }

    pub async fn clone_vm(&self, name: &str, request: &CloneVmRequest) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/clone"),
            Some(request),
            Self::LONG_CALL,
        )
        .await
    }

    pub async fn create_template(
        &self,
        request: &CreateTemplateRequest,
    ) -> Result<TemplateView, ApiError> {
        self.post("/templates", Some(request), Self::LONG_CALL)
            .await
    }

    pub async fn list_templates(&self) -> Result<Vec<TemplateView>, ApiError> {
        self.get("/templates").await
    }

    pub async fn get_template(&self, name: &str) -> Result<TemplateView, ApiError> {
        self.get(&format!("/templates/{name}")).await
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), ApiError> {
        self.delete(&format!("/templates/{name}")).await
    }

    pub async fn move_disk(
        &self,
        name: &str,
        disk: &str,
        request: &MoveDiskRequest,
    ) -> Result<OpView, ApiError> {
        self.post(
            &format!("/vms/{name}/disks/{disk}/move"),
            Some(request),
            Duration::from_secs(30),
        )
        .await
    }

    async fn delete(&self, path: &str) -> Result<(), ApiError> {
        self.call(
            reqwest::Method::DELETE,
            path,
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn create_token(
        &self,
        request: &crate::types::CreateTokenRequest,
    ) -> Result<crate::types::TokenCreated, ApiError> {
        self.post("/tokens", Some(request), Duration::from_secs(30))
            .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<crate::types::TokenView>, ApiError> {
        self.get("/tokens").await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ApiError> {
        self.delete(&format!("/tokens/{id}")).await
    }

    pub async fn create_project(
        &self,
        request: &crate::types::CreateProjectRequest,
    ) -> Result<crate::types::ProjectView, ApiError> {
        self.post("/projects", Some(request), Duration::from_secs(30))
            .await
    }

    pub async fn list_projects(&self) -> Result<Vec<crate::types::ProjectView>, ApiError> {
        self.get("/projects").await
    }

    pub async fn get_project(&self, name: &str) -> Result<crate::types::ProjectView, ApiError> {
        self.get(&format!("/projects/{name}")).await
    }

    pub async fn delete_project(&self, name: &str) -> Result<(), ApiError> {
        self.delete(&format!("/projects/{name}")).await
    }

    pub async fn create_user(
        &self,
        request: &crate::types::CreateUserRequest,
    ) -> Result<crate::types::UserView, ApiError> {
        self.post("/users", Some(request), Duration::from_secs(30))
            .await
    }

    pub async fn list_users(&self) -> Result<Vec<crate::types::UserView>, ApiError> {
        self.get("/users").await
    }

    pub async fn delete_user(&self, name: &str) -> Result<(), ApiError> {
        self.delete(&format!("/users/{name}")).await
    }

    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), ApiError> {
        self.post(
            &format!("/users/{name}/password"),
            Some(&crate::types::PasswordRequest {
                password: password.to_string(),
            }),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn login(
        &self,
        user: &str,
        password: &str,
    ) -> Result<crate::types::TokenCreated, ApiError> {
        self.post(
            "/login",
            Some(&crate::types::LoginRequest {
                user: user.to_string(),
                password: password.to_string(),
            }),
            Duration::from_secs(30),
        )
        .await
    }

    /// The same agents and CA with another token.
    pub fn with_token(&self, token: &str) -> ApiClient {
        ApiClient {
            token: token.to_string(),
            ..self.clone()
        }
    }

    pub async fn list_ops(&self) -> Result<Vec<OpView>, ApiError> {
        self.get("/ops").await
    }

    pub async fn get_op(&self, id: &str) -> Result<OpView, ApiError> {
        self.get(&format!("/ops/{id}")).await
    }

    pub async fn cancel_op(&self, id: &str) -> Result<OpView, ApiError> {
        self.post(
            &format!("/ops/{id}/cancel"),
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
    }

    /// Polls an op until it ends, calling `on_progress` with each state seen.
    pub async fn wait_op(
        &self,
        id: &str,
        poll: Duration,
        mut on_progress: impl FnMut(&OpView),
    ) -> Result<OpView, ApiError> {
        loop {
            let op = self.get_op(id).await?;
            on_progress(&op);
            if matches!(op.status.as_str(), "completed" | "failed" | "cancelled") {
                return Ok(op);
            }
            tokio::time::sleep(poll).await;
        }
    }

    pub async fn list_events(&self, limit: usize) -> Result<Vec<EventView>, ApiError> {
        self.get(&format!("/events?limit={limit}")).await
    }

    /// Follows the event stream (server-sent events), calling `on_event` for each.
    pub async fn follow_events(&self, mut on_event: impl FnMut(EventView)) -> Result<(), ApiError> {
        let mut response = self
            .send(|base| {
                self.http
                    .get(format!("{base}/api/v1/events/stream"))
                    .bearer_auth(&self.token)
            })
            .await?;
        if !response.status().is_success() {
            return decode_response::<()>(response).await;
        }
        let mut buffer = String::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| ApiError::Unavailable(error.to_string()))?
        {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let message: String = buffer.drain(..end + 2).collect();
                for line in message.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        if let Ok(event) = serde_json::from_str::<EventView>(data.trim()) {
                            on_event(event);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly by design

    use super::*;
    use ferry_tls::{install_host, ClusterCa, Identity, Subject, Trust};

    /// An address nothing listens on: bound, then released.
    fn dead_address() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", listener.local_addr().unwrap())
    }

    /// A CA, and a TLS server with its certificate answering every request with an
    /// empty JSON list.
    async fn empty_list_server(dir: &std::path::Path) -> (String, Trust) {
        let ca = ClusterCa::create("test").unwrap();
        let files = install_host(
            &ca,
            dir,
            &Subject::host("host1", &["127.0.0.1".parse().unwrap()]),
        )
        .unwrap();
        let identity = Identity::load(&files).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("https://{}", listener.local_addr().unwrap());
        let router = axum::Router::new().fallback(|| async { axum::Json(Vec::<u8>::new()) });
        let config = identity.server_config().unwrap();
        tokio::spawn(crate::serve::serve_tls(listener, router, config));
        (address, identity.trust.clone())
    }

    #[tokio::test]
    async fn a_request_goes_to_the_next_agent_when_one_cannot_be_reached() {
        let dir = tempfile::tempdir().unwrap();
        let (live, trust) = empty_list_server(dir.path()).await;
        let client = ApiClient::new(&dead_address(), "t", &trust)
            .unwrap()
            .with_fallbacks(&[live]);
        assert!(client.list_hosts().await.unwrap().is_empty());
        // The agent that answered is asked first from now on.
        assert_eq!(client.current.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(client.list_vms().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_server_of_another_ca_or_plain_http_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (live, _) = empty_list_server(dir.path()).await;
        let other = ClusterCa::create("other").unwrap();
        let other_trust = Trust::from_pem(other.cert_pem(), dir.path()).unwrap();
        let client = ApiClient::new(&live, "t", &other_trust).unwrap();
        let error = client.list_hosts().await.unwrap_err().to_string();
        assert!(error.contains("certificate"), "{error}");
        // A plain-HTTP client gets no HTTP answer from a TLS port.
        let plain = reqwest::Client::new()
            .get(live.replacen("https://", "http://", 1))
            .send()
            .await;
        assert!(plain.is_err(), "{plain:?}");
    }

    #[tokio::test]
    async fn when_no_agent_answers_the_error_names_each_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let (_, trust) = empty_list_server(dir.path()).await;
        let (one, two) = (dead_address(), dead_address());
        let client = ApiClient::new(&one, "t", &trust)
            .unwrap()
            .with_fallbacks(std::slice::from_ref(&two));
        let error = client.list_hosts().await.unwrap_err().to_string();
        assert!(error.contains(&one) && error.contains(&two), "{error}");
    }
}
