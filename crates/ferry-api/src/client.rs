//! The HTTP client over the REST API: the CLI's (and a forwarding agent's) way to call
//! the operations. Each method mirrors one operation of [`crate::ops::ClusterApi`].

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{
    CreateVmRequest, ErrorBody, EventView, ExecRequest, ExecResponse, HostView, MigrateRequest,
    MoveDiskRequest, OpView, VmView,
};
use crate::ApiError;

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
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
        return serde_json::from_slice(&bytes)
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

impl ApiClient {
    pub fn new(base: &str, token: &str) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|error| {
            ApiError::Unavailable(format!(
                "cannot reach the Ferry API at {}: {}",
                self.base,
                root_cause(&error)
            ))
        })?;
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
        self.post("/vms", Some(request), Duration::from_secs(60))
            .await
    }

    pub async fn start_vm(&self, name: &str) -> Result<VmView, ApiError> {
        self.post(
            &format!("/vms/{name}/start"),
            None::<&()>,
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
        let url = format!("{}/api/v1/events/stream", self.base);
        let mut response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|error| {
                ApiError::Unavailable(format!(
                    "cannot reach the Ferry API at {}: {}",
                    self.base,
                    root_cause(&error)
                ))
            })?;
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
