//! `ferry`: the one binary. Commands are `ferry <noun> <verb>`; each one is a thin
//! adapter that parses arguments, calls the library, and prints a table or `--json`.
//! Failures end with one line on stderr and a non-zero exit code.

mod bench;
mod demo;
mod image;
mod output;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a high-availability virtualization cluster for QEMU/KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Noun,
}

#[derive(Subcommand)]
enum Noun {
    /// VM images: the test appliance.
    Image {
        #[command(subcommand)]
        verb: image::ImageVerb,
    },
    /// This host: acceleration.
    Host {
        #[command(subcommand)]
        verb: image::HostVerb,
    },
    /// Measurements that print numbers.
    Bench {
        #[command(subcommand)]
        verb: bench::BenchVerb,
    },
    /// The lab on this machine.
    Lab {
        #[command(subcommand)]
        verb: demo::LabVerb,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => output::fail(&anyhow::anyhow!("cannot start the async runtime: {error}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Noun::Image { verb } => image::run_image(verb).await,
            Noun::Host { verb } => image::run_host(verb).await,
            Noun::Lab { verb } => demo::run(verb).await,
            Noun::Bench { verb } => bench::run(verb).await,
        }
    });
    if let Err(error) = result {
        output::fail(&error);
    }
}
