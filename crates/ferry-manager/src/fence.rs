//! The ClusterLabs fence-agent protocol, pure: what Ferry writes on a fence agent's
//! stdin and what its exit code means. `fence_ipmilan`, `fence_redfish`, the lab's
//! `fence_ferry_lab` and the rest read `key=value` lines (`action=off`, `ip=…`,
//! `plug=…`) and answer with their exit code: 0 done (for `status`: on), 2 off (for
//! `status`), anything else failed. A failure or a timeout is never taken as success.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceAction {
    Off,
    On,
    Reboot,
    Status,
    Monitor,
}

impl FenceAction {
    pub fn name(self) -> &'static str {
        match self {
            FenceAction::Off => "off",
            FenceAction::On => "on",
            FenceAction::Reboot => "reboot",
            FenceAction::Status => "status",
            FenceAction::Monitor => "monitor",
        }
    }
}

impl std::str::FromStr for FenceAction {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(FenceAction::Off),
            "on" => Ok(FenceAction::On),
            "reboot" => Ok(FenceAction::Reboot),
            "status" => Ok(FenceAction::Status),
            "monitor" => Ok(FenceAction::Monitor),
            other => Err(format!(
                "action {other:?}: expected off, on, reboot, status or monitor"
            )),
        }
    }
}

/// The stdin of one fence-agent call: the action first, then the device's options.
pub fn request(action: FenceAction, options: &BTreeMap<String, String>) -> String {
    let mut text = format!("action={}\n", action.name());
    for (key, value) in options {
        text.push_str(&format!("{key}={value}\n"));
    }
    text
}

/// Reads a fence agent's stdin: `key=value` lines; blank lines and `#` comments skipped.
pub fn parse_request(text: &str) -> Result<(FenceAction, BTreeMap<String, String>), String> {
    let mut options = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?}: expected key=value"))?;
        options.insert(key.trim().to_string(), value.trim().to_string());
    }
    let action = options
        .remove("action")
        .or_else(|| options.remove("option"))
        .ok_or("no action= line on stdin")?
        .parse()?;
    Ok((action, options))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    On,
    Off,
}

/// What a fence agent's exit code says.
pub fn outcome(action: FenceAction, exit_code: Option<i32>) -> Result<Option<Power>, String> {
    match (action, exit_code) {
        (FenceAction::Status, Some(0)) => Ok(Some(Power::On)),
        (FenceAction::Status, Some(2)) => Ok(Some(Power::Off)),
        (FenceAction::Off, Some(0)) => Ok(Some(Power::Off)),
        (FenceAction::On | FenceAction::Reboot, Some(0)) => Ok(Some(Power::On)),
        (FenceAction::Monitor, Some(0)) => Ok(None),
        (action, Some(code)) => Err(format!(
            "action {} failed (exit code {code})",
            action.name()
        )),
        (action, None) => Err(format!("action {} was killed by a signal", action.name())),
    }
}

/// The exit code a fence agent reports for a result.
pub fn exit_code(action: FenceAction, power: Option<Power>) -> i32 {
    match (action, power) {
        (FenceAction::Status, Some(Power::Off)) => 2,
        _ => 0,
    }
}

/// Pause before retry `attempt` (1-based) of a failed fence: 1, 2, 4, 5, 5 … seconds.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.saturating_sub(1).min(3)).min(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_through_the_stdin_format() {
        let options: BTreeMap<String, String> = [("ip", "10.0.0.9"), ("plug", "host2")]
            .into_iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let text = request(FenceAction::Off, &options);
        assert_eq!(text, "action=off\nip=10.0.0.9\nplug=host2\n");
        assert_eq!(parse_request(&text).unwrap(), (FenceAction::Off, options));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        assert_eq!(
            parse_request("plug=x\n").unwrap_err(),
            "no action= line on stdin"
        );
        assert_eq!(
            parse_request("action=explode\n").unwrap_err(),
            "action \"explode\": expected off, on, reboot, status or monitor"
        );
        assert_eq!(
            parse_request("action=off\nnonsense\n").unwrap_err(),
            "line \"nonsense\": expected key=value"
        );
    }

    #[test]
    fn only_the_documented_exit_codes_count_as_success() {
        assert_eq!(outcome(FenceAction::Status, Some(2)), Ok(Some(Power::Off)));
        assert_eq!(outcome(FenceAction::Status, Some(0)), Ok(Some(Power::On)));
        assert_eq!(outcome(FenceAction::Off, Some(0)), Ok(Some(Power::Off)));
        assert!(outcome(FenceAction::Off, Some(1)).is_err());
        assert!(outcome(FenceAction::Off, Some(2)).is_err());
        assert!(outcome(FenceAction::Status, Some(1)).is_err());
        assert!(outcome(FenceAction::Off, None).is_err());
        for action in [FenceAction::Off, FenceAction::Status, FenceAction::On] {
            for power in [Power::On, Power::Off] {
                let code = exit_code(action, Some(power));
                if let Ok(Some(seen)) = outcome(action, Some(code)) {
                    if action == FenceAction::Status {
                        assert_eq!(seen, power);
                    }
                }
            }
        }
    }

    #[test]
    fn retries_back_off_to_five_seconds() {
        let delays: Vec<u64> = (1..=6)
            .map(|attempt| retry_delay(attempt).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5, 5]);
    }
}
