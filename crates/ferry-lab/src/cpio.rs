//! A writer for the `newc` cpio format, the one the kernel unpacks as initramfs.
//! Written by hand: it is forty lines, and the crates for it do not cover device nodes
//! and symlinks together with streaming into a compressor.

use std::io::{self, Write};

pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

pub enum Entry<'a> {
    Directory,
    File { content: &'a [u8], executable: bool },
    Symlink { target: &'a str },
    CharDevice { major: u32, minor: u32 },
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    pub fn add(&mut self, path: &str, entry: Entry<'_>) -> io::Result<()> {
        let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Directory => (0o040_755, &[], (0, 0)),
            Entry::File {
                content,
                executable,
            } => (
                if executable { 0o100_755 } else { 0o100_644 },
                content,
                (0, 0),
            ),
            Entry::Symlink { target } => (0o120_777, target.as_bytes(), (0, 0)),
            Entry::CharDevice { major, minor } => (0o020_600, &[], (major, minor)),
        };
        let inode = self.next_inode;
        self.next_inode += 1;
        self.header(path, inode, mode, data.len(), rdev)?;
        self.write_padded(data)
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 0, (0, 0))?;
        Ok(self.out)
    }

    fn header(
        &mut self,
        path: &str,
        inode: u32,
        mode: u32,
        size: usize,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let name_len = path.len() + 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let header = format!(
            "070701{inode:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dev_major:08x}{dev_minor:08x}{rdev_major:08x}{rdev_minor:08x}{name_len:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dev_major = 0,
            dev_minor = 0,
            rdev_major = rdev.0,
            rdev_minor = rdev.1,
            check = 0,
        );
        let mut bytes = header.into_bytes();
        bytes.extend_from_slice(path.as_bytes());
        bytes.push(0);
        self.write_padded(&bytes)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..padding])?;
        self.written += padding as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_four_byte_aligned_and_end_with_a_trailer() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.add("bin", Entry::Directory).unwrap();
        writer
            .add(
                "bin/x",
                Entry::File {
                    content: b"hello",
                    executable: true,
                },
            )
            .unwrap();
        writer
            .add("dev/console", Entry::CharDevice { major: 5, minor: 1 })
            .unwrap();
        let archive = writer.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        assert!(archive.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn the_system_cpio_tool_reads_our_archives() {
        let Ok(_) = std::process::Command::new("cpio").arg("--version").output() else {
            panic!("cpio is not installed; the README's test command installs it");
        };
        let mut writer = CpioWriter::new(Vec::new());
        writer.add("etc", Entry::Directory).unwrap();
        writer
            .add(
                "etc/motd",
                Entry::File {
                    content: b"ferry\n",
                    executable: false,
                },
            )
            .unwrap();
        writer
            .add("etc/link", Entry::Symlink { target: "motd" })
            .unwrap();
        let archive = writer.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let listing = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        assert_eq!(
            listing.lines().collect::<Vec<_>>(),
            ["etc", "etc/motd", "etc/link"]
        );
    }
}
