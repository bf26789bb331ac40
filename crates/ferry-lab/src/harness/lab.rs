//! What a benchmark or the tour runs in: the appliance, the lab, a client of the lab's
//! API, and the machine under it all.

use ferry_api::client::ApiClient;

use super::HarnessError;
use crate::appliance::{self, Appliance, BuildRequest};
use crate::defaults;
use crate::lab::Lab;

/// The built appliance, built first (from Debian packages) if it is missing. A build
/// takes minutes, so `announce` is told first, in words, to show the user.
pub async fn load_or_build_appliance(
    announce: impl FnOnce(&str),
) -> Result<Appliance, HarnessError> {
    if let Ok(appliance) = Appliance::load(&defaults::appliance_dir()) {
        return Ok(appliance);
    }
    announce("building the test appliance from Debian packages");
    let guest_binary = std::env::current_exe()?.with_file_name("ferry-guest");
    let request = BuildRequest {
        out_dir: defaults::appliance_dir(),
        cache_dir: defaults::cache_dir(),
        guest_binary,
    };
    Ok(tokio::task::spawn_blocking(move || appliance::build(&request)).await??)
}

/// The lab a benchmark that moves VMs between hosts runs in (`ferry lab up` made it).
pub fn load_lab(name: &str) -> Result<Lab, HarnessError> {
    let lab = Lab::load(&defaults::lab_dir().join(name)).map_err(|source| HarnessError::NoLab {
        lab: name.into(),
        source,
    })?;
    if lab.spec().hosts < 2 {
        return Err(HarnessError::Unfit(format!("lab {name} needs two hosts")));
    }
    Ok(lab)
}

/// The lab's admin token.
pub fn lab_token(lab: &Lab) -> Result<&str, HarnessError> {
    lab.token()
        .ok_or_else(|| HarnessError::Unfit(format!("lab {} has no API token", lab.spec().name)))
}

/// A client of the lab's host1 that falls back to the other hosts, so it keeps
/// answering when a benchmark or the tour powers host1 off.
pub fn lab_client(lab: &Lab) -> Result<ApiClient, HarnessError> {
    let spec = lab.spec();
    let others: Vec<String> = spec
        .host_numbers()
        .skip(1)
        .map(|host| spec.api_url(host))
        .collect();
    Ok(host_client(lab, 1)?.with_fallbacks(&others))
}

/// A client of one host's API alone, trusting the lab's CA.
pub fn host_client(lab: &Lab, host: u32) -> Result<ApiClient, HarnessError> {
    let spec = lab.spec();
    let token = lab_token(lab)?;
    let trust = ferry_tls::Trust::load(&spec.ca_file())
        .map_err(|error| HarnessError::Unfit(format!("lab {}: {error}", spec.name)))?;
    ApiClient::new(&spec.api_url(host), token, &trust)
        .map_err(|error| HarnessError::Unfit(format!("lab {}: {error}", spec.name)))
}

/// The accelerator the cluster's VMs run with, as its first host reports it.
pub async fn cluster_accel(client: &ApiClient) -> Result<String, HarnessError> {
    let hosts = client.list_hosts().await?;
    Ok(hosts
        .first()
        .map(|host| host.accel.clone())
        .unwrap_or_default())
}

/// This machine in a few words, for a report: every lab host shares it.
pub fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib / 1024 / 1024);
    format!("{cpus} CPUs, {memory_gib} GiB, lab hosts in network namespaces on one machine")
}
