//! `ferry`: the one binary. Commands are `ferry <noun> <verb>`; each one is a thin
//! adapter that parses arguments, calls the library, and prints a table or `--json`.
//! Failures end with one line on stderr and a non-zero exit code.

mod access;
mod agent;
mod bench;
mod bench_chaos;
mod bench_checkpoint;
mod bench_downtime;
mod bench_faults;
mod bench_ha;
mod bench_migrate;
mod cert;
mod checkpoint_cli;
mod cluster;
mod console;
mod demo;
mod image;
mod lab;
mod monitor_cli;
mod ops;
mod output;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a high-availability virtualization cluster for QEMU/KVM"
)]
struct Cli {
    #[command(flatten)]
    endpoint: cluster::Endpoint,
    #[command(subcommand)]
    command: Noun,
}

#[derive(Subcommand)]
enum Noun {
    /// The image library (disk images, ISOs, the appliance) and image builders.
    Image {
        #[command(subcommand)]
        verb: image::ImageVerb,
    },
    /// Hosts of the cluster.
    Host {
        #[command(subcommand)]
        verb: cluster::HostVerb,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        verb: cluster::VmVerb,
    },
    /// Templates: read-only bases that VMs are cloned from.
    Template {
        #[command(subcommand)]
        verb: checkpoint_cli::TemplateVerb,
    },
    /// Long operations: migrations and disk moves.
    Op {
        #[command(subcommand)]
        verb: ops::OpVerb,
    },
    /// The cluster CA and host certificates.
    Cert {
        #[command(subcommand)]
        verb: cert::CertVerb,
    },
    /// API tokens (hashed in etcd, shown once).
    Token {
        #[command(subcommand)]
        verb: access::TokenVerb,
    },
    /// Projects: a team's VMs within a quota.
    Project {
        #[command(subcommand)]
        verb: access::ProjectVerb,
    },
    /// Portal users (argon2-hashed passwords).
    User {
        #[command(subcommand)]
        verb: access::UserVerb,
    },
    /// The event log.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// How many past events to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// This host's agent.
    Agent {
        #[command(subcommand)]
        verb: agent::AgentVerb,
    },
    /// Measurements that print numbers.
    Bench {
        #[command(subcommand)]
        verb: bench::BenchVerb,
    },
    /// The lab on this machine.
    Lab {
        #[command(subcommand)]
        verb: lab::LabVerb,
    },
}

fn main() {
    // Called by the lab's fence-agent name, `ferry` is that agent (stdin in, exit code out).
    let called_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        });
    if called_as.as_deref() == Some(ferry_lab::lab::fence::FENCE_AGENT_NAME) {
        fence_agent();
    }
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
            Noun::Image { verb } => image::run_image(&cli.endpoint, verb).await,
            Noun::Host { verb } => cluster::run_host(&cli.endpoint, verb).await,
            Noun::Vm { verb } => cluster::run_vm(&cli.endpoint, verb).await,
            Noun::Op { verb } => ops::run_op(&cli.endpoint, verb).await,
            Noun::Template { verb } => checkpoint_cli::run_template(&cli.endpoint, verb).await,
            Noun::Cert { verb } => cert::run_cert(verb),
            Noun::Token { verb } => access::run_token(&cli.endpoint, verb).await,
            Noun::Project { verb } => access::run_project(&cli.endpoint, verb).await,
            Noun::User { verb } => access::run_user(&cli.endpoint, verb).await,
            Noun::Events {
                follow,
                limit,
                json,
            } => cluster::run_events(&cli.endpoint, follow, limit, json).await,
            Noun::Agent { verb } => agent::run(verb).await,
            Noun::Lab { verb } => lab::run(verb).await,
            Noun::Bench { verb } => bench::run(verb).await,
        }
    });
    if let Err(error) = result {
        output::fail(&error);
    }
}

/// `fence_ferry_lab`: reads the ClusterLabs request on stdin, exits with its answer.
fn fence_agent() -> ! {
    use std::io::Read;
    let mut stdin = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut stdin) {
        eprintln!("fence_ferry_lab: cannot read stdin: {error}");
        std::process::exit(1);
    }
    let (code, problem) = ferry_lab::lab::fence::run(&stdin);
    if let Some(problem) = problem {
        eprintln!("{problem}");
    }
    std::process::exit(code)
}
