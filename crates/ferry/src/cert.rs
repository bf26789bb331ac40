//! `ferry cert ca|issue`: the cluster CA and its certificates, for hosts outside the
//! lab (which makes its own at `ferry lab up`).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum CertVerb {
    /// Create the cluster CA (`ca.pem`, `ca-key.pem`) in DIR; refuses to replace one.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name, in the CA's common name.
        #[arg(long, default_value = "ferry")]
        cluster: String,
    },
    /// Issue a host's certificate into OUT (`ca.pem`, `host.pem`, `host-key.pem`: an
    /// agent's `[tls] dir`). Rotation: issue again and restart the agent.
    Issue {
        /// The host's name (the certificate's common name, its etcd user).
        name: String,
        /// The directory holding the CA.
        #[arg(long)]
        ca: PathBuf,
        /// The host's addresses (API, migration network); repeat for each.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run_cert(verb: CertVerb) -> anyhow::Result<()> {
    match verb {
        CertVerb::Ca { dir, cluster } => {
            let existing = dir.join(ferry_tls::CA_FILE);
            anyhow::ensure!(
                !existing.exists(),
                "{} exists; a new CA would cut every host off",
                existing.display()
            );
            ferry_tls::ClusterCa::create(&cluster)?.write(&dir)?;
            println!("cluster CA in {}", dir.display());
        }
        CertVerb::Issue { name, ca, ips, out } => {
            name.parse::<ferry_model::HostName>()
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let ca = ferry_tls::ClusterCa::load(&ca)?;
            let files = ferry_tls::install_host(&ca, &out, &ferry_tls::Subject::host(&name, &ips))?;
            println!(
                "certificate of {name} in {} (key {})",
                files.cert.display(),
                files.key.display()
            );
        }
    }
    Ok(())
}
