//! The harness the benchmarks and the tour share: the lab they run in, the VM they
//! measure, the host faults they make and mend, and the numbers they report. The
//! clients that drive the guest meanwhile are [`crate::workload::Writer`] (writes and
//! probes) and [`crate::flows::Flow`] (REFERENCE §1's workloads).

pub mod chaos;
pub mod double_run;
pub mod downtime;
pub mod faults;
pub mod lab;
pub mod reference;
pub mod stats;
pub mod vm;

use ferry_api::ApiError;

use crate::appliance::ApplianceError;
use crate::lab::LabError;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Appliance(#[from] ApplianceError),
    /// The lab to run in cannot be loaded.
    #[error("lab {lab} (start it with `ferry lab up`)")]
    NoLab {
        lab: String,
        #[source]
        source: LabError,
    },
    /// The lab is up but lacks what the run needs (hosts, a token).
    #[error("{0}")]
    Unfit(String),
    /// A host name the lab does not have.
    #[error("{0}")]
    NoSuchHost(String),
    #[error("VM {vm} failed: {error}")]
    VmFailed { vm: String, error: String },
    /// A VM or a host did not get where it was waited for in time.
    #[error("{0}")]
    TimedOut(String),
    /// A migration op ended in another state than completed.
    #[error("migration {id} {status}: {error}")]
    Migration {
        id: String,
        status: String,
        error: String,
    },
    /// The running binary, next to which ferry-guest is, cannot be found.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The appliance's build task died.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}
