//! `ferry agent run --config FILE` and `ferry agent config-example`.

use std::path::PathBuf;

use clap::Subcommand;
use ferry_agent::config::{AgentConfig, EXAMPLE};

#[derive(Subcommand)]
pub enum AgentVerb {
    /// Run this host's agent (in the foreground).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a configuration file with every option and its comment.
    ConfigExample,
}

pub async fn run(verb: AgentVerb) -> anyhow::Result<()> {
    match verb {
        AgentVerb::Run { config } => {
            let config = AgentConfig::load(&config)?;
            ferry_agent::daemon::run(config).await?;
            Ok(())
        }
        AgentVerb::ConfigExample => {
            print!("{EXAMPLE}");
            Ok(())
        }
    }
}
