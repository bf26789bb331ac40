//! `ferry vm console NAME` (the serial console, interactive, detach with Ctrl-]) and
//! `ferry vm vnc NAME --listen ADDR` (the graphical console for any VNC viewer): both
//! through the API's websocket, from any host.

use std::io::{IsTerminal, Read, Write};

use anyhow::Context;
use ferry_api::client::ApiClient;
use ferry_api::console::ConsoleKind;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Ctrl-] ends the session, as telnet and virsh do.
const DETACH: u8 = 0x1d;

/// Puts the terminal in raw mode for the session and back when dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawTerminal(None);
        }
        let Ok(saved) = nix::sys::termios::tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        if let Err(error) =
            nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw)
        {
            eprintln!("ferry: cannot put the terminal in raw mode ({error}); line mode it is");
            return RawTerminal(None);
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let restored = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
            if let Err(error) = restored {
                eprintln!("ferry: cannot restore the terminal ({error}); run `reset`");
            }
        }
    }
}

pub async fn serial(client: &ApiClient, name: &str) -> anyhow::Result<()> {
    let stream = client.console(name, ConsoleKind::Serial).await?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to the serial console of {name}; detach with Ctrl-].\r");
    }
    let (mut sink, mut source) = stream.split();
    // Stdin is read on a thread of its own: a blocking read cannot be cancelled.
    let (keys, mut typed) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = [0u8; 1024];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if keys.blocking_send(buffer[..read].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let _raw = RawTerminal::enter();
    let mut stdout = std::io::stdout();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            input = typed.recv(), if stdin_open => match input {
                Some(bytes) => {
                    let (bytes, detach) = match bytes.iter().position(|byte| *byte == DETACH) {
                        Some(at) => (bytes[..at].to_vec(), true),
                        None => (bytes, false),
                    };
                    if !bytes.is_empty() {
                        sink.send(Message::Binary(bytes.into())).await.context("the console closed")?;
                    }
                    if detach {
                        break;
                    }
                }
                // Piped input ended: show what the guest answers for a moment, then go.
                None => {
                    stdin_open = false;
                    if interactive {
                        break;
                    }
                }
            },
            output = source.next() => match output {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(text))) => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(error)) => anyhow::bail!("the console of {name} ended: {error}"),
            },
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)), if !stdin_open => break,
        }
    }
    if let Err(error) = sink.send(Message::Close(None)).await {
        tracing::debug!("closing the console: {error}");
    }
    if interactive {
        eprintln!("\r\nDetached from {name}.\r");
    }
    Ok(())
}

/// Serves the VM's graphical console on a local TCP port for any VNC viewer.
pub async fn vnc(client: &ApiClient, name: &str, listen: &str) -> anyhow::Result<()> {
    // Refused here, with the API's reason, rather than at the viewer's first connect.
    drop(client.console(name, ConsoleKind::Vnc).await?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    println!(
        "VNC of {name} at {address} (e.g. `vncviewer {}::{}`); Ctrl-C to stop",
        address.ip(),
        address.port()
    );
    loop {
        let (connection, peer) = listener.accept().await?;
        let client = client.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            if let Err(error) = bridge(&client, &name, connection).await {
                eprintln!("ferry: VNC session of {peer} ended: {error}");
            }
        });
    }
}

async fn bridge(
    client: &ApiClient,
    name: &str,
    connection: tokio::net::TcpStream,
) -> anyhow::Result<()> {
    let stream = client.console(name, ConsoleKind::Vnc).await?;
    let (mut sink, mut source) = stream.split();
    let (mut read_half, mut write_half) = connection.into_split();
    let upstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = read_half.read(&mut buffer).await?;
            if read == 0 {
                return anyhow::Ok(());
            }
            sink.send(Message::Binary(buffer[..read].to_vec().into()))
                .await?;
        }
    };
    let downstream = async {
        while let Some(message) = source.next().await {
            match message? {
                Message::Binary(bytes) => write_half.write_all(&bytes).await?,
                Message::Close(_) => break,
                _ => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = upstream => result,
        result = downstream => result,
    }
}
