//! `ferry image …` and `ferry host …`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_lab::appliance::{self, BuildRequest};
use ferry_lab::defaults;

use crate::output::print_json;

#[derive(Subcommand)]
pub enum ImageVerb {
    /// Build the test appliance (kernel + initramfs) from Debian packages.
    BuildAppliance {
        /// Where to put the appliance.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where downloaded packages are cached.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The ferry-guest binary to put inside (default: next to this binary).
        #[arg(long)]
        guest_binary: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_image(verb: ImageVerb) -> anyhow::Result<()> {
    match verb {
        ImageVerb::BuildAppliance {
            out,
            cache,
            guest_binary,
            json,
        } => {
            let guest_binary = match guest_binary {
                Some(path) => path,
                None => std::env::current_exe()
                    .context("cannot find this binary's directory")?
                    .with_file_name("ferry-guest"),
            };
            let request = BuildRequest {
                out_dir: out.unwrap_or_else(defaults::appliance_dir),
                cache_dir: cache.unwrap_or_else(defaults::cache_dir),
                guest_binary,
            };
            let built = tokio::task::spawn_blocking(move || appliance::build(&request)).await??;
            if json {
                return print_json(
                    &serde_json::json!({"dir": built.dir, "manifest": built.manifest}),
                );
            }
            let manifest = &built.manifest;
            println!("appliance  {}", built.dir.display());
            println!(
                "kernel     {} ({:.1} MiB)",
                manifest.kernel_release,
                manifest.kernel_bytes as f64 / 1048576.0
            );
            println!(
                "initramfs  {:.1} MiB",
                manifest.initrd_bytes as f64 / 1048576.0
            );
            println!("modules    {}", manifest.modules.join(" "));
            println!(
                "packages   {}",
                manifest
                    .packages
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            println!("built in   {:.1} s", manifest.build_ms as f64 / 1000.0);
            Ok(())
        }
    }
}

/// `ferry host accel`: this machine's verdict on KVM versus TCG.
pub async fn accel(json: bool) -> anyhow::Result<()> {
    let appliance = appliance::Appliance::load(&defaults::appliance_dir())?;
    let report = defaults::detect_accel(&appliance).await?;
    if json {
        return print_json(&report);
    }
    let cached = if report.cached { " (cached)" } else { "" };
    println!("{}: {}{cached}", report.accel.qemu_name(), report.reason);
    Ok(())
}
