//! `ferry image …` and `ferry host …`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_lab::appliance::{self, BuildRequest};
use ferry_lab::defaults;

use crate::cluster::Endpoint;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum ImageVerb {
    /// Build the Debian 12 test guest (systemd, qemu-guest-agent, cloud-init, GRUB for
    /// BIOS and UEFI) with debootstrap; cached until its recipe changes.
    BuildDebian {
        /// Where to put it (default: the cache directory's images/debian-12).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// A bootable ISO of the appliance (GRUB, BIOS and UEFI): an installer stand-in.
    BuildIso {
        /// The ISO to write.
        #[arg(long)]
        out: PathBuf,
        /// The guest's hostname.
        #[arg(long, default_value = "from-iso")]
        hostname: String,
    },
    /// Upload a disk image or ISO into the library on the shared pool.
    Import {
        name: String,
        file: PathBuf,
        /// qcow2, raw or iso; detected when left out, checked when given.
        #[arg(long)]
        format: Option<String>,
        /// Its guests run no QEMU guest agent (heartbeat and stall monitors stay off).
        #[arg(long)]
        no_guest_agent: bool,
        #[arg(long)]
        json: bool,
    },
    /// The images of the library.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One image: files, checksum, the VMs that use it.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an image; refused while a VM uses it.
    Delete { name: String },
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

pub async fn run_image(endpoint: &Endpoint, verb: ImageVerb) -> anyhow::Result<()> {
    match verb {
        ImageVerb::Import {
            name,
            file,
            format,
            no_guest_agent,
            json,
        } => {
            let size = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            let client = endpoint.client()?;
            let bar = (!json).then(|| {
                let bar = indicatif::ProgressBar::new(size);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(format!("importing {name}"));
                bar
            });
            let progress = bar.clone();
            let image = client
                .import_image(
                    &name,
                    &file,
                    format.as_deref(),
                    !no_guest_agent,
                    move |sent| {
                        if let Some(bar) = &progress {
                            bar.set_position(sent);
                        }
                    },
                )
                .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            print_image(&image?, json)
        }
        ImageVerb::BuildDebian { out, json } => {
            let dir = out.unwrap_or_else(defaults::debian_image_dir);
            let image =
                tokio::task::spawn_blocking(move || ferry_lab::debian::build(&dir)).await??;
            if json {
                return print_json(&serde_json::json!({
                    "path": image.path,
                    "cached": image.cached,
                    "manifest": image.manifest,
                }));
            }
            println!("image      {}", image.path.display());
            println!(
                "size       {:.1} MiB",
                image.manifest.bytes as f64 / 1048576.0
            );
            if image.cached {
                println!(
                    "cached     (built in {:.1} s)",
                    image.manifest.build_ms as f64 / 1000.0
                );
            } else {
                println!(
                    "built in   {:.1} s",
                    image.manifest.build_ms as f64 / 1000.0
                );
            }
            Ok(())
        }
        ImageVerb::BuildIso { out, hostname } => {
            let appliance = appliance::Appliance::load(&defaults::appliance_dir())?;
            appliance.boot_iso(&out, &hostname)?;
            println!("{}", out.display());
            Ok(())
        }
        ImageVerb::List { json } => {
            let images = endpoint.client()?.list_images().await?;
            if json {
                return print_json(&images);
            }
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(["NAME", "FORMAT", "SIZE", "GUEST AGENT", "USED BY"]);
            for image in &images {
                table.add_row([
                    image.name.clone(),
                    image.format.clone(),
                    image
                        .virtual_size
                        .or(image.file_size)
                        .map(|size| ferry_model::Bytes(size).to_string())
                        .unwrap_or_default(),
                    if image.guest_agent { "yes" } else { "no" }.to_string(),
                    image.used_by.join(", "),
                ]);
            }
            println!("{table}");
            Ok(())
        }
        ImageVerb::Show { name, json } => {
            print_image(&endpoint.client()?.get_image(&name).await?, json)
        }
        ImageVerb::Delete { name } => {
            endpoint.client()?.delete_image(&name).await?;
            println!("image {name} deleted");
            Ok(())
        }
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

fn print_image(image: &ferry_api::types::ImageView, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(image);
    }
    println!("name         {}", image.name);
    println!("format       {}", image.format);
    if let Some(size) = image.virtual_size {
        println!("size         {}", ferry_model::Bytes(size));
    }
    if let Some(size) = image.file_size {
        println!("file size    {}", ferry_model::Bytes(size));
    }
    println!("files        {}", image.files.join(" "));
    if let Some(sha256) = &image.sha256 {
        println!("sha256       {sha256}");
    }
    println!(
        "guest agent  {}",
        if image.guest_agent { "yes" } else { "no" }
    );
    println!(
        "used by      {}",
        if image.used_by.is_empty() {
            "-".to_string()
        } else {
            image.used_by.join(", ")
        }
    );
    Ok(())
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
