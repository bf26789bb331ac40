//! Disk image files through `qemu-img`: what a file is (format, size, backing file),
//! blank disks, and copies of an image as a VM's own disk. ISO 9660 images are told
//! apart from raw disks by their volume descriptor, which `qemu-img` does not look at.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use ferry_model::{Bytes, DiskFormat};
use serde::Deserialize;

/// What a file on a pool is, as far as Ferry cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: FileFormat,
    pub virtual_size: Bytes,
    /// A qcow2 backing file; images with one are refused at import (it could name any
    /// file on the host).
    pub backing_file: Option<String>,
    /// A qcow2 external data file: refused at import for the same reason.
    pub data_file: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Qcow2,
    Raw,
    Iso,
    /// A format QEMU reads but Ferry does not run from (vmdk, vdi, vhdx …).
    Other,
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    data: Option<FormatSpecificData>,
}

#[derive(Deserialize)]
struct FormatSpecificData {
    #[serde(rename = "data-file")]
    data_file: Option<String>,
}

/// ISO 9660: "CD001" at byte 1 of the first volume descriptor (sector 16).
const ISO_MAGIC_OFFSET: u64 = 16 * 2048 + 1;

fn is_iso(path: &Path) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(path)?;
    if file.metadata()?.len() < ISO_MAGIC_OFFSET + 5 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(ISO_MAGIC_OFFSET))?;
    let mut magic = [0u8; 5];
    file.read_exact(&mut magic)?;
    Ok(&magic == b"CD001")
}

fn run(command: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let output = command
        .output()
        .map_err(|error| format!("cannot run qemu-img ({what}): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output.stdout)
}

/// Reads what `path` is.
pub fn inspect(path: &Path) -> Result<ImageInfo, String> {
    std::fs::File::open(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let stdout = run(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(path),
        &format!("qemu-img info {}", path.display()),
    )?;
    let info: QemuImgInfo = serde_json::from_slice(&stdout).map_err(|error| {
        format!(
            "qemu-img info {}: unexpected output: {error}",
            path.display()
        )
    })?;
    let format = match info.format.as_str() {
        "qcow2" => FileFormat::Qcow2,
        "raw" => {
            let iso =
                is_iso(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            if iso {
                FileFormat::Iso
            } else {
                FileFormat::Raw
            }
        }
        _ => FileFormat::Other,
    };
    Ok(ImageInfo {
        format,
        virtual_size: Bytes(info.virtual_size),
        backing_file: info.backing_filename,
        data_file: info
            .format_specific
            .and_then(|specific| specific.data)
            .and_then(|data| data.data_file),
    })
}

/// The name `qemu-img` uses for a format Ferry runs disks in.
fn qemu_format(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}

/// Makes an empty disk of `size` (qcow2: sparse and growing; raw: sparse).
pub fn create_blank(path: &Path, format: DiskFormat, size: Bytes) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", qemu_format(format)]);
    if format == DiskFormat::Qcow2 {
        command.args(["-o", "compat=1.1"]);
    }
    run(
        command.arg(path).arg(size.0.to_string()),
        &format!("qemu-img create {}", path.display()),
    )
    .map(drop)
}

/// Copies an image into a new qcow2 disk at `to`, grown to `size` when that is larger
/// than the image (the guest grows its filesystem itself, as cloud images do).
pub fn copy_to_qcow2(
    from: &Path,
    from_format: DiskFormat,
    to: &Path,
    size: Option<Bytes>,
) -> Result<(), String> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", qemu_format(from_format)])
            .args(["-O", "qcow2", "-o", "compat=1.1"])
            .arg(from)
            .arg(to),
        &format!("qemu-img convert {} to {}", from.display(), to.display()),
    )?;
    if let Some(size) = size {
        let copied = inspect(to)?;
        if size > copied.virtual_size {
            resize(to, size)?;
        }
    }
    Ok(())
}

/// Grows a qcow2 disk to `size`.
pub fn resize(path: &Path, size: Bytes) -> Result<(), String> {
    run(
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.0.to_string()),
        &format!("qemu-img resize {}", path.display()),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_qcow2_is_seen_as_qcow2_of_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        create_blank(&path, DiskFormat::Qcow2, Bytes::mib(64)).unwrap();
        let info = inspect(&path).unwrap();
        assert_eq!(info.format, FileFormat::Qcow2);
        assert_eq!(info.virtual_size, Bytes::mib(64));
        assert_eq!(info.backing_file, None);
        assert_eq!(info.data_file, None);
    }

    #[test]
    fn an_external_data_file_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let data = dir.path().join("a.data");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", data.display()))
            .arg(&path)
            .arg("16M")
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(
            inspect(&path).unwrap().data_file,
            Some(data.display().to_string())
        );
    }

    #[test]
    fn raw_files_and_iso_images_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, vec![0u8; 64 * 1024]).unwrap();
        assert_eq!(inspect(&raw).unwrap().format, FileFormat::Raw);
        let mut iso = vec![0u8; 64 * 1024];
        iso[ISO_MAGIC_OFFSET as usize..ISO_MAGIC_OFFSET as usize + 5].copy_from_slice(b"CD001");
        let iso_path = dir.path().join("cd.iso");
        std::fs::write(&iso_path, iso).unwrap();
        assert_eq!(inspect(&iso_path).unwrap().format, FileFormat::Iso);
    }

    #[test]
    fn a_copy_is_grown_to_the_size_asked_and_never_shrunk() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        create_blank(&base, DiskFormat::Raw, Bytes::mib(16)).unwrap();
        let grown = dir.path().join("grown.qcow2");
        copy_to_qcow2(&base, DiskFormat::Raw, &grown, Some(Bytes::mib(48))).unwrap();
        assert_eq!(inspect(&grown).unwrap().virtual_size, Bytes::mib(48));
        let same = dir.path().join("same.qcow2");
        copy_to_qcow2(&base, DiskFormat::Raw, &same, Some(Bytes::mib(8))).unwrap();
        assert_eq!(inspect(&same).unwrap().virtual_size, Bytes::mib(16));
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = inspect(Path::new("/nonexistent/x.qcow2")).unwrap_err();
        assert!(
            error.starts_with("cannot read /nonexistent/x.qcow2"),
            "{error}"
        );
    }
}
