//! Consoles over the API: the serial console (interactive, what `ferry vm console`
//! attaches to) and the graphical one (QEMU's VNC server, spoken as RFB, what noVNC
//! and any VNC viewer speak), both as binary websocket streams at
//! `/api/v1/vms/{name}/console` and `/api/v1/vms/{name}/vnc`, behind the API's token.
//!
//! QEMU serves both on unix sockets in the VM's run directory on its host; any agent
//! answers: the VM's own host pumps bytes between the websocket and the socket, any
//! other forwards the websocket to it once (a forwarded request that does not find the
//! VM at home is refused, never forwarded again).

use std::path::PathBuf;

use axum::extract::ws::{Message, WebSocket};
use ferry_model::cluster::VmState;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ops::{parse_vm_name, vm_view, ClusterApi, Owner};
use crate::ApiError;

/// Marks a request one agent forwarded to another.
pub const FORWARDED_HEADER: &str = "x-ferry-forwarded";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleKind {
    Serial,
    Vnc,
}

impl ConsoleKind {
    pub fn path(self) -> &'static str {
        match self {
            ConsoleKind::Serial => "console",
            ConsoleKind::Vnc => "vnc",
        }
    }
}

/// Where a console's bytes are.
#[derive(Clone, Debug)]
pub enum ConsoleTarget {
    /// The unix socket of a VM running here.
    Local(PathBuf),
    /// The VM's host's websocket URL, reached with this host's certificate.
    Remote {
        url: String,
        from: ferry_model::HostName,
        tls: std::sync::Arc<rustls::ClientConfig>,
    },
}

impl ClusterApi {
    /// Finds the console of a running VM; `forwarded` requests must find it here.
    pub async fn console_target(
        &self,
        name: &str,
        kind: ConsoleKind,
        hop: crate::ops::Hop,
    ) -> Result<ConsoleTarget, ApiError> {
        let name = parse_vm_name(name)?;
        let entry = self.vm_entry(&name).await?;
        let view = vm_view(&entry)
            .ok_or_else(|| ApiError::NotFound(format!("VM {name} does not exist")))?;
        if view.state != VmState::Running.as_str() && view.state != VmState::Migrating.as_str() {
            return Err(ApiError::Conflict(format!(
                "VM {name} is {}; its console is there while it runs",
                view.state
            )));
        }
        let url = match self.owner_of(&name, &entry).await? {
            Owner::Here => {
                let socket = self.local.console_socket(&name, kind).await?;
                return Ok(ConsoleTarget::Local(socket));
            }
            Owner::There { .. } if hop == crate::ops::Hop::Forwarded => {
                return Err(ApiError::Conflict(format!(
                    "VM {name} is not on {} (a forwarded console request is not forwarded again)",
                    self.host
                )))
            }
            Owner::There { url, .. } => url,
        };
        let ws = url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        Ok(ConsoleTarget::Remote {
            url: format!("{ws}/api/v1/vms/{name}/{}", kind.path()),
            from: self.host.clone(),
            tls: self.peer_tls.clone(),
        })
    }
}

/// Pumps bytes between a browser's or CLI's websocket and the console's target, until
/// either side closes.
pub async fn serve(socket: WebSocket, target: ConsoleTarget, token: String) {
    let result = match target {
        ConsoleTarget::Local(path) => to_unix(socket, &path).await,
        ConsoleTarget::Remote { url, from, tls } => {
            to_remote(socket, &url, &token, &from, tls).await
        }
    };
    if let Err(error) = result {
        tracing::info!("console session ended: {error}");
    }
}

async fn to_unix(socket: WebSocket, path: &std::path::Path) -> Result<(), String> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", path.display()))?;
    let (mut read_half, mut write_half) = stream.into_split();
    let (mut sink, mut source) = socket.split();
    let upstream = async {
        while let Some(message) = source.next().await {
            match message.map_err(|error| error.to_string())? {
                Message::Binary(bytes) => write_half
                    .write_all(&bytes)
                    .await
                    .map_err(|error| error.to_string())?,
                Message::Text(text) => write_half
                    .write_all(text.as_bytes())
                    .await
                    .map_err(|error| error.to_string())?,
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        Ok::<(), String>(())
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = read_half
                .read(&mut buffer)
                .await
                .map_err(|error| error.to_string())?;
            if read == 0 {
                break;
            }
            sink.send(Message::Binary(buffer[..read].to_vec().into()))
                .await
                .map_err(|error| error.to_string())?;
        }
        let closed = sink.send(Message::Close(None)).await;
        closed.map_err(|error| error.to_string())
    };
    tokio::select! {
        result = upstream => result,
        result = downstream => result,
    }
}

async fn to_remote(
    socket: WebSocket,
    url: &str,
    token: &str,
    from: &ferry_model::HostName,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::Message as Remote;
    let remote = crate::client::connect_websocket(url, token, Some(from.as_str()), tls)
        .await
        .map_err(|error| error.to_string())?;
    let (mut remote_sink, mut remote_source) = remote.split();
    let (mut sink, mut source) = socket.split();
    let upstream = async {
        while let Some(message) = source.next().await {
            let forwarded = match message.map_err(|error| error.to_string())? {
                Message::Binary(bytes) => Remote::Binary(bytes),
                Message::Text(text) => Remote::Binary(text.as_bytes().to_vec().into()),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            remote_sink
                .send(forwarded)
                .await
                .map_err(|error| error.to_string())?;
        }
        Ok::<(), String>(())
    };
    let downstream = async {
        while let Some(message) = remote_source.next().await {
            let back = match message.map_err(|error| error.to_string())? {
                Remote::Binary(bytes) => Message::Binary(bytes),
                Remote::Text(text) => Message::Binary(text.as_bytes().to_vec().into()),
                Remote::Close(_) => break,
                _ => continue,
            };
            sink.send(back).await.map_err(|error| error.to_string())?;
        }
        let closed = sink.send(Message::Close(None)).await;
        closed.map_err(|error| error.to_string())
    };
    tokio::select! {
        result = upstream => result,
        result = downstream => result,
    }
}
