//! Internal qcow2 snapshots of a running QEMU (QEMU 10's `snapshot-save`,
//! `snapshot-load` and `snapshot-delete` jobs, and `blockdev-snapshot-internal-sync`
//! for disks alone), block streaming, and the same on files of a stopped VM through
//! `qemu-img`. Why internal snapshots: see ferry-agent's `checkpoint` module.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Machine, QemuError};

/// One internal snapshot of a qcow2 file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    #[serde(rename = "vm-state-size", default)]
    pub vm_state_size: u64,
}

impl Machine {
    /// Saves memory, devices and every disk in `nodes` as snapshot `tag`, the memory
    /// into `vmstate_node`. QEMU stops the vCPUs for the whole save and runs them again
    /// if they ran.
    pub async fn snapshot_save(
        &self,
        tag: &str,
        vmstate_node: &str,
        nodes: &[String],
        timeout: Duration,
    ) -> Result<(), QemuError> {
        let job = format!("save-{tag}");
        self.command(
            "snapshot-save",
            Some(json!({"job-id": job, "tag": tag, "vmstate": vmstate_node, "devices": nodes})),
        )
        .await?;
        self.wait_job_concluded(&job, timeout).await
    }

    /// Loads snapshot `tag`: disks, memory and devices as they were when it was saved.
    pub async fn snapshot_load(
        &self,
        tag: &str,
        vmstate_node: &str,
        nodes: &[String],
        timeout: Duration,
    ) -> Result<(), QemuError> {
        let job = format!("load-{tag}");
        self.command(
            "snapshot-load",
            Some(json!({"job-id": job, "tag": tag, "vmstate": vmstate_node, "devices": nodes})),
        )
        .await?;
        self.wait_job_concluded(&job, timeout).await
    }

    /// Deletes snapshot `tag` from every disk in `nodes` (its clusters are freed).
    pub async fn snapshot_delete(
        &self,
        tag: &str,
        nodes: &[String],
        timeout: Duration,
    ) -> Result<(), QemuError> {
        let job = format!("delete-{tag}");
        self.command(
            "snapshot-delete",
            Some(json!({"job-id": job, "tag": tag, "devices": nodes})),
        )
        .await?;
        self.wait_job_concluded(&job, timeout).await
    }

    /// Snapshots the disks alone, all in one transaction (all or none), while the
    /// guest runs.
    pub async fn snapshot_disks(&self, tag: &str, nodes: &[String]) -> Result<(), QemuError> {
        let actions: Vec<Value> = nodes
            .iter()
            .map(|node| {
                json!({"type": "blockdev-snapshot-internal-sync",
                       "data": {"device": node, "name": tag}})
            })
            .collect();
        self.command("transaction", Some(json!({ "actions": actions })))
            .await
            .map(drop)
    }

    /// The internal snapshots of the disk behind device `vdisk-{disk}`.
    pub async fn disk_snapshots(&self, disk: &str) -> Result<Vec<SnapshotInfo>, QemuError> {
        let entry = self.block_entry(disk).await?;
        let snapshots = entry["inserted"]["image"]["snapshots"].clone();
        if snapshots.is_null() {
            return Ok(Vec::new());
        }
        serde_json::from_value(snapshots).map_err(|error| {
            QemuError::Other(format!("disk {disk}: unexpected snapshot list: {error}"))
        })
    }

    /// Copies what `node` reads from its backing chain into it and drops the backing
    /// file, while the guest runs (`block-stream`); returns when the job ended.
    pub async fn stream_into(
        &self,
        job: &str,
        node: &str,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        self.command(
            "block-stream",
            Some(json!({"job-id": job, "device": node, "auto-dismiss": false})),
        )
        .await?;
        self.wait_job_concluded(job, timeout).await
    }

    /// Waits until job `id` has concluded, dismisses it, and returns its error if it
    /// failed. A job still running at `timeout` is cancelled.
    pub async fn wait_job_concluded(&self, id: &str, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.command("query-jobs", None).await?;
            let job = jobs
                .as_array()
                .into_iter()
                .flatten()
                .find(|job| job["id"].as_str() == Some(id))
                .cloned();
            let Some(job) = job else {
                // Auto-dismissed: it ended without an error to report.
                return Ok(());
            };
            if job["status"].as_str() == Some("concluded") {
                self.command("job-dismiss", Some(json!({ "id": id })))
                    .await?;
                return match job["error"].as_str() {
                    Some(error) => Err(QemuError::Other(format!("job {id}: {error}"))),
                    None => Ok(()),
                };
            }
            if Instant::now() >= deadline {
                if let Err(error) = self.command("job-cancel", Some(json!({ "id": id }))).await {
                    tracing::warn!("cannot cancel job {id}: {error}");
                }
                return Err(QemuError::Other(format!(
                    "job {id} did not finish within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn qemu_img(args: &[&str], path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let output = Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .map_err(|error| format!("cannot run qemu-img ({what}): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{what} {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output.stdout)
}

/// Snapshot `tag` of the disks of a stopped VM: `create`, `apply` (revert the file to
/// it) or `delete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileSnapshot {
    Create,
    Apply,
    Delete,
}

pub fn file_snapshot(path: &Path, tag: &str, action: FileSnapshot) -> Result<(), String> {
    let flag = match action {
        FileSnapshot::Create => "-c",
        FileSnapshot::Apply => "-a",
        FileSnapshot::Delete => "-d",
    };
    qemu_img(&["snapshot", "-q", flag, tag], path, "qemu-img snapshot").map(drop)
}

/// The internal snapshots of a qcow2 file (read with `-U`: it may be open elsewhere).
pub fn file_snapshots(path: &Path) -> Result<Vec<SnapshotInfo>, String> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        snapshots: Vec<SnapshotInfo>,
    }
    let stdout = qemu_img(&["info", "--output=json", "-U"], path, "qemu-img info")?;
    serde_json::from_slice::<Info>(&stdout)
        .map(|info| info.snapshots)
        .map_err(|error| {
            format!(
                "qemu-img info {}: unexpected output: {error}",
                path.display()
            )
        })
}

/// A qcow2 overlay at `path` on the read-only `base`: a linked clone's disk, made in
/// milliseconds whatever the base's size. `size` grows it beyond the base's.
pub fn create_overlay(
    base: &Path,
    path: &Path,
    size: Option<ferry_model::Bytes>,
) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let base_text = base.to_string_lossy();
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base_text,
    ];
    let options = "compat=1.1";
    args.extend(["-o", options]);
    let size_text = size.map(|size| size.0.to_string());
    let output = Command::new("qemu-img")
        .args(&args)
        .arg(path)
        .args(size_text.as_deref())
        .output()
        .map_err(|error| format!("cannot run qemu-img (create overlay): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "qemu-img create {} on {}: {}",
            path.display(),
            base.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// A standalone qcow2 copy at `to` of what `from` reads (its backing chain folded in,
/// without its snapshots), or of its snapshot `snapshot`. `progress` gets the percent
/// done as `qemu-img` reports it.
pub fn flat_copy(
    from: &Path,
    to: &Path,
    snapshot: Option<&str>,
    progress: &mut dyn FnMut(f64),
) -> Result<(), String> {
    use std::io::Read as _;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-p", "-U", "-O", "qcow2", "-o", "compat=1.1"]);
    let selector = snapshot.map(|tag| format!("snapshot.name={tag}"));
    if let Some(selector) = &selector {
        command.args(["-l", selector]);
    }
    let mut child = command
        .arg(from)
        .arg(to)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run qemu-img (convert): {error}"))?;
    // `-p` writes "    (12.34/100%)\r" as it goes.
    if let Some(mut stdout) = child.stdout.take() {
        let mut buffer = [0u8; 256];
        let mut text = String::new();
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buffer[..read]));
            while let Some(end) = text.find('\r') {
                let line: String = text.drain(..=end).collect();
                if let Some(done) = line
                    .trim()
                    .trim_start_matches('(')
                    .split('/')
                    .next()
                    .and_then(|number| number.parse::<f64>().ok())
                {
                    progress(done);
                }
            }
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|error| format!("qemu-img convert: {error}"))?;
    if !output.status.success() {
        if let Err(error) = std::fs::remove_file(to) {
            tracing::debug!("no partial copy at {} to remove: {error}", to.display());
        }
        return Err(format!(
            "qemu-img convert {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Folds the backing chain of a stopped VM's disk into it (`qemu-img rebase -b ""`).
pub fn flatten_file(path: &Path) -> Result<(), String> {
    qemu_img(
        &["rebase", "-q", "-f", "qcow2", "-b", ""],
        path,
        "qemu-img rebase",
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly by design

    use super::*;
    use ferry_model::{Bytes, DiskFormat};

    #[test]
    fn file_snapshots_are_made_listed_applied_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.qcow2");
        crate::image::create_blank(&disk, DiskFormat::Qcow2, Bytes::mib(8)).unwrap();
        file_snapshot(&disk, "one", FileSnapshot::Create).unwrap();
        file_snapshot(&disk, "two", FileSnapshot::Create).unwrap();
        let names: Vec<String> = file_snapshots(&disk)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["one", "two"]);
        file_snapshot(&disk, "one", FileSnapshot::Apply).unwrap();
        file_snapshot(&disk, "one", FileSnapshot::Delete).unwrap();
        let refused = file_snapshot(&disk, "one", FileSnapshot::Apply).unwrap_err();
        assert!(refused.contains("d.qcow2"), "{refused}");
        assert_eq!(file_snapshots(&disk).unwrap().len(), 1);
    }

    #[test]
    fn an_overlay_reads_its_base_until_flattened_and_a_flat_copy_stands_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        crate::image::create_blank(&base, DiskFormat::Qcow2, Bytes::mib(8)).unwrap();
        let overlay = dir.path().join("clone.qcow2");
        create_overlay(&base, &overlay, None).unwrap();
        let info = crate::image::inspect(&overlay).unwrap();
        assert_eq!(info.backing_file.as_deref(), Some(base.to_str().unwrap()));
        assert_eq!(info.virtual_size, Bytes::mib(8));

        let copy = dir.path().join("copy.qcow2");
        let mut seen = Vec::new();
        flat_copy(&overlay, &copy, None, &mut |done| seen.push(done)).unwrap();
        assert_eq!(crate::image::inspect(&copy).unwrap().backing_file, None);
        assert!(seen.last().is_some_and(|done| *done >= 100.0), "{seen:?}");

        flatten_file(&overlay).unwrap();
        assert_eq!(crate::image::inspect(&overlay).unwrap().backing_file, None);
        let missing = dir.path().join("none.qcow2");
        assert!(create_overlay(&missing, &dir.path().join("x.qcow2"), None).is_err());
    }
}
