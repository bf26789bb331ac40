//! The Debian 12 test guest (`ferry image build-debian`): a real distribution disk
//! image — systemd, Debian's qemu-guest-agent and cloud-init, the cloud kernel, GRUB for
//! BIOS and UEFI — built by `debian/build-image.sh` with debootstrap from the Debian
//! mirror this machine's own apt sources name. The image is cached: a build whose recipe
//! (the script) has not changed returns the image already there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::appliance::ApplianceError;

const BUILD_SCRIPT: &str = include_str!("../debian/build-image.sh");
/// The file the image is written to in its directory.
pub const IMAGE_FILE: &str = "debian-12.qcow2";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebianManifest {
    /// SHA-256 of the build script: a new recipe builds a new image.
    pub recipe: String,
    pub build_ms: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub struct DebianImage {
    pub path: PathBuf,
    pub manifest: DebianManifest,
    /// Found in the cache rather than built now.
    pub cached: bool,
}

fn recipe() -> String {
    Sha256::digest(BUILD_SCRIPT.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The image in `dir` if it was built from today's recipe.
pub fn cached(dir: &Path) -> Option<DebianImage> {
    let manifest: DebianManifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
    let path = dir.join(IMAGE_FILE);
    (manifest.recipe == recipe() && path.is_file()).then_some(DebianImage {
        path,
        manifest,
        cached: true,
    })
}

/// Builds the image into `dir` unless today's recipe is already there.
pub fn build(dir: &Path) -> Result<DebianImage, ApplianceError> {
    if let Some(image) = cached(dir) {
        return Ok(image);
    }
    let started = Instant::now();
    let io = |context: String| move |source| ApplianceError::Io { context, source };
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let sources = read_sources().map_err(io("cannot read /etc/apt/sources.list*".into()))?;
    let mirror = debian_mirror(&sources).ok_or_else(|| ApplianceError::Command {
        command: "build-debian".into(),
        detail: "no Debian mirror for bookworm in /etc/apt/sources.list*".into(),
    })?;
    let script = dir.join("build-image.sh");
    std::fs::write(&script, BUILD_SCRIPT)
        .map_err(io(format!("cannot write {}", script.display())))?;
    let path = dir.join(IMAGE_FILE);
    let output = Command::new("bash")
        .arg(&script)
        .env("MIRROR", &mirror)
        .env("OUT", &path)
        .env("WORK", dir.join("work"))
        .output()
        .map_err(|error| ApplianceError::Command {
            command: "bash build-image.sh".into(),
            detail: error.to_string(),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail = match stderr.trim().lines().last() {
            Some(line) => line.to_string(),
            None => format!(
                "build-image.sh {} without a word; its logs are in {}",
                output.status,
                dir.join("work").display()
            ),
        };
        return Err(ApplianceError::Command {
            command: "build-debian".into(),
            detail,
        });
    }
    let bytes = std::fs::metadata(&path)
        .map_err(io(format!("cannot read {}", path.display())))?
        .len();
    let manifest = DebianManifest {
        recipe: recipe(),
        build_ms: started.elapsed().as_millis() as u64,
        bytes,
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    std::fs::write(dir.join("manifest.json"), json).map_err(io(format!(
        "cannot write the manifest in {}",
        dir.display()
    )))?;
    Ok(DebianImage {
        path,
        manifest,
        cached: false,
    })
}

fn read_sources() -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|entry| Some(entry.ok()?.path()))
            .collect();
        more.sort();
        files.extend(more);
    }
    let mut sources = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => sources.push((file, text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(sources)
}

/// The first mirror that serves the `bookworm` suite, from deb822 `.sources` files or
/// one-line `.list` files (never a host name of our own).
pub fn debian_mirror(sources: &[(PathBuf, String)]) -> Option<String> {
    for (path, text) in sources {
        let name = path.to_string_lossy();
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |key: &str| {
                    stanza.lines().find_map(|line| {
                        line.strip_prefix(key)
                            .and_then(|rest| rest.strip_prefix(':'))
                            .map(str::trim)
                    })
                };
                let is_deb = field("Types")
                    .is_some_and(|types| types.split_whitespace().any(|t| t == "deb"));
                let serves = field("Suites")
                    .is_some_and(|suites| suites.split_whitespace().any(|s| s == "bookworm"));
                if is_deb && serves {
                    if let Some(uri) = field("URIs").and_then(|uris| uris.split_whitespace().next())
                    {
                        return Some(uri.to_string());
                    }
                }
            }
        } else if name.ends_with(".list") {
            for line in text.lines() {
                let mut words = line.split_whitespace().peekable();
                if words.next() != Some("deb") {
                    continue;
                }
                if words.peek().is_some_and(|word| word.starts_with('[')) {
                    for word in words.by_ref() {
                        if word.ends_with(']') {
                            break;
                        }
                    }
                }
                let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                    continue;
                };
                if suite == "bookworm" {
                    return Some(uri.to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_comes_from_the_systems_own_deb822_sources() {
        let sources = vec![(
            PathBuf::from("/etc/apt/sources.list.d/debian.sources"),
            "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n".to_string(),
        )];
        assert_eq!(
            debian_mirror(&sources).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn one_line_sources_with_options_are_read_too() {
        let sources = vec![(
            PathBuf::from("/etc/apt/sources.list"),
            "# deb http://old/ bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n".to_string(),
        )];
        assert_eq!(
            debian_mirror(&sources).as_deref(),
            Some("http://m.example/debian")
        );
    }

    #[test]
    fn no_bookworm_source_is_no_mirror() {
        let sources = vec![(
            PathBuf::from("/etc/apt/sources.list.d/x.sources"),
            "Types: deb\nURIs: http://security/\nSuites: bookworm-security\n".to_string(),
        )];
        assert_eq!(debian_mirror(&sources), None);
    }
}
