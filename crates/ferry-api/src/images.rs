//! The image library: files on the shared pool (`{pool}/images/{name}.{ext}`) that
//! every host can read, each with a record `images/{name}` holding what it is (a disk
//! image and its format, an ISO, or the appliance), its SHA-256 and who uses it.
//!
//! An import streams the upload into a hidden file while hashing it, then asks
//! `qemu-img` and the ISO volume descriptor what it is: a file that is not the format
//! named, or a qcow2 with a backing file (which could point anywhere on a host), is
//! refused and removed. Delete is refused while a VM was made from the image or has it
//! in a CD-ROM drive, with those VMs named.

use std::path::PathBuf;

use ferry_model::cluster::{now_ms, ImageContent, ImageKind, ImageRecord, VmRecord};
use ferry_model::events::EventKind;
use ferry_model::{Bytes, DiskFormat};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::ops::ClusterApi;
use crate::types::ImageView;
use crate::ApiError;

/// 1-63 of a-z 0-9 . _ -, starting with a letter or digit.
pub fn check_image_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "image name {name:?} must be 1-63 of a-z 0-9 . _ - starting with a letter or digit"
        )))
    }
}

fn view(image: &ImageRecord, used_by: Vec<String>) -> ImageView {
    ImageView {
        name: image.name.clone(),
        format: image.content.kind().as_str().into(),
        files: image
            .content
            .files()
            .iter()
            .map(|path| path.display().to_string())
            .collect(),
        virtual_size: match &image.content {
            ImageContent::Disk { virtual_size, .. } => Some(virtual_size.0),
            ImageContent::Appliance { data_disk, .. } => Some(data_disk.0),
            ImageContent::Iso { .. } => None,
        },
        file_size: image.file_size.map(|size| size.0),
        sha256: image.sha256.clone(),
        imported_ms: image.imported_ms,
        guest_agent: image.guest_agent,
        used_by,
    }
}

/// The VMs whose record names the image or whose CD-ROM holds one of its files.
fn users(image: &ImageRecord, vms: &[VmRecord]) -> Vec<String> {
    let files = image.content.files();
    vms.iter()
        .filter(|vm| {
            vm.image == image.name
                || vm
                    .spec
                    .cdroms
                    .iter()
                    .filter_map(|cd| cd.path.as_deref())
                    .any(|path| files.contains(&path))
        })
        .map(|vm| vm.spec.name.to_string())
        .collect()
}

impl ClusterApi {
    async fn vm_records(&self) -> Result<Vec<VmRecord>, ApiError> {
        Ok(self
            .vm_entries()
            .await?
            .into_values()
            .filter_map(|entry| entry.record.map(|record| record.value))
            .collect())
    }

    pub async fn list_images(&self) -> Result<Vec<ImageView>, ApiError> {
        let images = self
            .store
            .list_each::<ImageRecord>(&self.store.keys().images())
            .await?
            .readable();
        let vms = self.vm_records().await?;
        Ok(images
            .into_iter()
            .map(|(_, image)| view(&image.value, users(&image.value, &vms)))
            .collect())
    }

    pub async fn get_image(&self, name: &str) -> Result<ImageView, ApiError> {
        check_image_name(name)?;
        let image = self.image_record(name).await?;
        let vms = self.vm_records().await?;
        Ok(view(&image, users(&image, &vms)))
    }

    async fn image_record(&self, name: &str) -> Result<ImageRecord, ApiError> {
        self.store
            .get::<ImageRecord>(&self.store.keys().image(name))
            .await?
            .map(|record| record.value)
            .ok_or_else(|| ApiError::NotFound(format!("image {name} does not exist")))
    }

    /// Imports the bytes of `body` as image `name`. `format` is checked against the
    /// file when given, detected when not.
    pub async fn import_image<S, E>(
        &self,
        name: &str,
        format: Option<ImageKind>,
        guest_agent: bool,
        body: S,
    ) -> Result<ImageView, ApiError>
    where
        S: Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        check_image_name(name)?;
        if format == Some(ImageKind::Appliance) {
            return Err(ApiError::BadRequest(
                "format: the appliance is built (ferry image build-appliance), not imported".into(),
            ));
        }
        let key = self.store.keys().image(name);
        if self.store.get::<ImageRecord>(&key).await?.is_some() {
            return Err(ApiError::Conflict(format!(
                "image {name} already exists (ferry image delete {name} first)"
            )));
        }
        let dir = self.shared_pool.join("images");
        tokio::fs::create_dir_all(&dir).await.map_err(|error| {
            ApiError::Internal(format!("cannot create {}: {error}", dir.display()))
        })?;
        // A file of its own per upload: two imports of one name never share one.
        let partial = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".upload")
            .tempfile_in(&dir)
            .map_err(|error| {
                ApiError::Internal(format!(
                    "cannot create an upload file in {}: {error}",
                    dir.display()
                ))
            })?
            .into_temp_path();
        let received = receive(&partial, body).await;
        let (sha256, size) = received?;
        let checked = {
            let partial = partial.to_path_buf();
            tokio::task::spawn_blocking(move || ferry_qemu::image::inspect(&partial))
                .await
                .map_err(|error| ApiError::Internal(error.to_string()))?
                .map_err(ApiError::BadRequest)
                .and_then(|info| kind_of(name, &info, format).map(|kind| (kind, info)))
        };
        let (kind, info) = checked?;
        let extension = match kind {
            ImageKind::Qcow2 => "qcow2",
            ImageKind::Iso => "iso",
            _ => "raw",
        };
        let path: PathBuf = dir.join(format!("{name}.{extension}"));
        // A hard link is made only where no file is: the file is this import's, or the
        // import stops (the upload goes when `partial` is dropped).
        if let Err(error) = std::fs::hard_link(&partial, &path) {
            return Err(if error.kind() == std::io::ErrorKind::AlreadyExists {
                ApiError::Conflict(format!(
                    "{} already exists on the pool (another import of {name}, or a file \
                     without a record: remove it first)",
                    path.display()
                ))
            } else {
                ApiError::Internal(format!(
                    "cannot publish the upload as {}: {error}",
                    path.display()
                ))
            });
        }
        let content = match kind {
            ImageKind::Iso => ImageContent::Iso { path: path.clone() },
            _ => ImageContent::Disk {
                path: path.clone(),
                format: if kind == ImageKind::Qcow2 {
                    DiskFormat::Qcow2
                } else {
                    DiskFormat::Raw
                },
                virtual_size: info.virtual_size,
            },
        };
        let record = ImageRecord {
            version: ferry_model::cluster::RECORD_VERSION,
            name: name.into(),
            content,
            sha256: Some(sha256),
            file_size: Some(Bytes(size)),
            imported_ms: now_ms(),
            guest_agent: guest_agent && kind != ImageKind::Iso,
            probe_cmdline: None,
            probe_marker: None,
            restart_command: None,
        };
        if let Err(error) = self
            .store
            .create(&key, &record, &format!("image {name}"))
            .await
        {
            remove_quietly(&path);
            return Err(error.into());
        }
        self.events
            .record(
                &format!("image/{name}"),
                EventKind::Imported,
                &format!("image {name} imported ({}, {})", kind.as_str(), Bytes(size)),
            )
            .await;
        Ok(view(&record, Vec::new()))
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), ApiError> {
        check_image_name(name)?;
        let key = self.store.keys().image(name);
        let current = self
            .store
            .get::<ImageRecord>(&key)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("image {name} does not exist")))?;
        let users = users(&current.value, &self.vm_records().await?);
        if !users.is_empty() {
            return Err(ApiError::Conflict(format!(
                "image {name} is used by {}: delete them or eject it first",
                users.join(", ")
            )));
        }
        // The record goes first, guarded by its revision: a file without a record is
        // harmless, a record without its file is not.
        self.store
            .delete_if_unchanged(&key, current.mod_revision)
            .await?;
        // Only the library's own files go: a record (etcd is not trusted with the
        // file system) may name a file anywhere, and the agent runs as root.
        let library = self.shared_pool.join("images");
        for file in current.value.content.files() {
            if !inside(&library, file) {
                tracing::warn!(
                    "image {name}: {} is outside the image library {}, left in place",
                    file.display(),
                    library.display()
                );
                continue;
            }
            if let Err(error) = std::fs::remove_file(file) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("image {name}: cannot remove {}: {error}", file.display());
                }
            }
        }
        self.events
            .record(
                &format!("image/{name}"),
                EventKind::Deleted,
                &format!("image {name} deleted"),
            )
            .await;
        Ok(())
    }
}

/// Whether `file` is within `dir`, links resolved (a path that cannot be resolved is
/// not).
fn inside(dir: &std::path::Path, file: &std::path::Path) -> bool {
    match (dir.canonicalize(), file.canonicalize()) {
        (Ok(dir), Ok(file)) => file.starts_with(dir),
        _ => false,
    }
}

/// The image's kind from what the file is and what the user named.
fn kind_of(
    name: &str,
    info: &ferry_qemu::image::ImageInfo,
    named: Option<ImageKind>,
) -> Result<ImageKind, ApiError> {
    use ferry_qemu::image::FileFormat;
    if let Some(data_file) = &info.data_file {
        return Err(ApiError::BadRequest(format!(
            "image {name}: the qcow2 keeps its data in an external file ({data_file}); \
             convert it first (qemu-img convert -O qcow2 IN OUT)"
        )));
    }
    if let Some(backing) = &info.backing_file {
        return Err(ApiError::BadRequest(format!(
            "image {name}: the qcow2 has a backing file ({backing}); flatten it first \
             (qemu-img convert -O qcow2 IN OUT)"
        )));
    }
    let found = match info.format {
        FileFormat::Qcow2 => ImageKind::Qcow2,
        FileFormat::Raw => ImageKind::Raw,
        FileFormat::Iso => ImageKind::Iso,
        FileFormat::Other => {
            return Err(ApiError::BadRequest(format!(
                "image {name}: a format Ferry does not run from; convert it first \
                 (qemu-img convert -O qcow2 IN OUT)"
            )))
        }
    };
    match named {
        None => Ok(found),
        Some(named) if named == found => Ok(found),
        // An ISO is also a valid raw disk; importing it as one is the user's choice.
        Some(ImageKind::Raw) if found == ImageKind::Iso => Ok(ImageKind::Raw),
        Some(named) => Err(ApiError::BadRequest(format!(
            "image {name}: the file is {}, not {}",
            found.as_str(),
            named.as_str()
        ))),
    }
}

async fn receive<S, E>(path: &std::path::Path, mut body: S) -> Result<(String, u64), ApiError>
where
    S: Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(path).await.map_err(|error| {
        ApiError::Internal(format!("cannot create {}: {error}", path.display()))
    })?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|error| ApiError::BadRequest(format!("upload interrupted: {error}")))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|error| {
            ApiError::Internal(format!("cannot write {}: {error}", path.display()))
        })?;
    }
    file.sync_all()
        .await
        .map_err(|error| ApiError::Internal(format!("cannot sync {}: {error}", path.display())))?;
    if size == 0 {
        return Err(ApiError::BadRequest("the upload is empty".into()));
    }
    let digest = hasher.finalize();
    Ok((
        digest.iter().map(|byte| format!("{byte:02x}")).collect(),
        size,
    ))
}

fn remove_quietly(path: &std::path::Path) {
    if let Err(error) = std::fs::remove_file(path) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {error}", path.display());
        }
    }
}

#[cfg(test)]
mod library_tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly by design

    use super::inside;

    #[test]
    fn only_files_within_the_library_count_as_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("pool/images");
        std::fs::create_dir_all(library.join("appliance")).unwrap();
        let own = library.join("appliance/vmlinuz");
        std::fs::write(&own, "k").unwrap();
        let outside = dir.path().join("build/vmlinuz");
        std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
        std::fs::write(&outside, "k").unwrap();
        assert!(inside(&library, &own));
        assert!(!inside(&library, &outside));
        assert!(!inside(&library, &library.join("../../build/vmlinuz")));
        assert!(!inside(&library, &library.join("gone")));
        let link = library.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(!inside(&library, &link), "a link out of the library");
    }
}
