//! Which QEMU this host runs. Ferry supports QEMU 10.0 and newer (Debian 13's, and
//! bookworm-backports' on Debian 12): the agent refuses to start on anything older,
//! naming what it found, rather than fail later in a migration or a block job.

use std::path::Path;

use crate::QemuError;

/// The oldest QEMU Ferry runs on.
pub const MINIMUM: QemuVersion = QemuVersion {
    major: 10,
    minor: 0,
    micro: 0,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Reads the first line of `qemu-system-x86_64 --version`:
/// `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)`.
pub fn parse(output: &str) -> Option<QemuVersion> {
    let line = output.lines().next()?;
    let rest = line.strip_prefix("QEMU emulator version ")?;
    let number = rest.split_whitespace().next()?;
    let mut parts = number.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    Some(QemuVersion {
        major: parts.next()??,
        minor: parts.next().flatten().unwrap_or(0),
        micro: parts.next().flatten().unwrap_or(0),
    })
}

/// Runs `qemu --version` and checks it against [`MINIMUM`].
pub fn check(qemu: &Path) -> Result<QemuVersion, QemuError> {
    let output = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|error| {
            QemuError::Other(format!(
                "cannot run {} --version: {error} (scripts/setup-host installs QEMU 10)",
                qemu.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse(&text).ok_or_else(|| {
        QemuError::Other(format!(
            "{} --version printed {:?}, not a QEMU version",
            qemu.display(),
            text.lines().next().unwrap_or("")
        ))
    })?;
    if version < MINIMUM {
        return Err(QemuError::Other(format!(
            "{} is QEMU {version}; Ferry needs QEMU {MINIMUM} or newer (on Debian 12 from \
             bookworm-backports: scripts/setup-host installs it)",
            qemu.display()
        )));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debians_version_lines_parse() {
        assert_eq!(
            parse("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"),
            Some(QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            })
        );
        assert_eq!(
            parse("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 19
            })
        );
        assert_eq!(
            parse("QEMU emulator version 10.1.0-rc2"),
            Some(QemuVersion {
                major: 10,
                minor: 1,
                micro: 0
            })
        );
    }

    #[test]
    fn anything_else_is_not_a_version() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("qemu-img version 10.0.2"), None);
        assert_eq!(parse("QEMU emulator version x.y"), None);
    }

    #[test]
    fn qemu_7_is_older_than_the_minimum_and_10_is_not() {
        assert!(parse("QEMU emulator version 7.2.19").unwrap() < MINIMUM);
        assert!(parse("QEMU emulator version 10.0.0").unwrap() >= MINIMUM);
        assert!(parse("QEMU emulator version 11.0.0").unwrap() >= MINIMUM);
    }

    #[test]
    fn an_old_qemu_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu-system-x86_64");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'QEMU emulator version 7.2.19 (Debian)'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let error = check(&fake).unwrap_err().to_string();
        assert!(
            error.contains("is QEMU 7.2.19; Ferry needs QEMU 10.0.0 or newer"),
            "{error}"
        );
    }
}
