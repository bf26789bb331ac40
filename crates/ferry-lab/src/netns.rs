//! Network namespaces that stand in for hosts (and isolate tests). A namespace made here
//! is removed when its handle is dropped; code runs inside one on a dedicated thread,
//! because `setns` changes only the calling thread's namespace.

use std::future::Future;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("ip {args}: {detail}")]
    Ip { args: String, detail: String },
    /// Entering the namespace failed.
    #[error("cannot enter network namespace {name}: {detail}")]
    Enter { name: String, detail: String },
}

/// A network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with its loopback up. Fails if it exists: a namespace is
    /// only ever removed by whoever made it.
    pub fn create(name: &str) -> Result<NetNs, NetnsError> {
        ip(&["netns", "add", name])?;
        let namespace = NetNs {
            name: name.to_string(),
        };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args…`
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `work` on a thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        run_in(&self.name, work)
    }

    /// Runs an async task to completion inside the namespace (on its own small runtime).
    pub fn block_on<F, Fut, T>(&self, task: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        block_on_in(&self.name, task)
    }
}

/// Runs `work` on a thread inside the named namespace (one this process did not
/// necessarily create) and returns its result. Sockets made there stay in that
/// namespace after the thread ends.
pub fn run_in<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let path = format!("/run/netns/{name}");
    let enter_error = |detail: String| NetnsError::Enter {
        name: name.to_string(),
        detail,
    };
    let handle = std::fs::File::open(&path).map_err(|error| enter_error(error.to_string()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|errno| enter_error(errno.to_string()))?;
                Ok(work())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetnsError::Enter {
                    name: name.to_string(),
                    detail: "the worker thread panicked".into(),
                })
            })
    })
}

/// Runs an async task to completion inside the named namespace (on its own small runtime).
pub fn block_on_in<F, Fut, T>(name: &str, task: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    run_in(name, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| error.to_string());
        runtime.map(|runtime| runtime.block_on(task()))
    })?
    .map_err(|detail| NetnsError::Enter {
        name: name.to_string(),
        detail,
    })
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "delete", &self.name]) {
            tracing::warn!("{error}");
        }
    }
}

/// `ip args…` in this process's namespace; stdout on success.
pub(crate) fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| NetnsError::Ip {
            args: args.join(" "),
            detail: format!("cannot run ip: {error}"),
        })?;
    if !output.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
