//! REFERENCE's measurements, which the benchmarks print next to their own.

/// REFERENCE §1 (Hyper-V 2.0), seconds per run; `true`: the flow failed in that run.
pub fn downtime_reference(mode: &str, scenario: &str) -> [(f64, bool); 3] {
    match (mode, scenario) {
        ("live" | "qemu", "idle") => [(1.12, false), (0.78, false), (1.08, false)],
        ("live" | "qemu", "db-every-0.5s") => [(0.75, false), (13.1, false), (0.81, false)],
        ("live" | "qemu", "db-bulk") => [(1.01, false), (0.90, false), (0.85, false)],
        ("live" | "qemu", "http-every-0.5s") => [(13.6, false), (0.78, false), (0.93, false)],
        ("live" | "qemu", "http-bulk") => [(0.82, false), (13.4, false), (0.81, false)],
        ("live" | "qemu", "file-every-0.5s") => [(0.78, false), (13.2, false), (0.84, false)],
        ("live" | "qemu", "file-bulk") => [(1.66, false), (5.57, false), (5.33, false)],
        ("quick", "idle") => [(25.0, false), (40.0, false), (28.0, false)],
        ("quick", "db-every-0.5s") => [(30.0, true), (29.0, true), (41.0, true)],
        ("quick", "db-bulk") => [(31.0, true), (33.0, false), (30.0, true)],
        ("quick", "http-every-0.5s") => [(28.0, true), (31.0, true), (29.0, true)],
        ("quick", "http-bulk") => [(37.0, true), (37.0, true), (50.0, true)],
        ("quick", "file-every-0.5s") => [(50.0, false), (36.0, false), (49.0, false)],
        ("quick", "file-bulk") => [(55.0, false), (64.0, false), (51.0, false)],
        // HA: "idle, host forced off" and "scheduled flows running, forced off".
        ("ha", "idle") => [(17.0, false), (17.0, false), (16.0, false)],
        _ => [(17.0, false), (17.0, false), (17.0, false)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::SCENARIOS;
    use crate::harness::downtime::MODES;

    #[test]
    fn every_mode_and_workload_has_three_reference_runs() {
        for mode in MODES {
            for scenario in SCENARIOS {
                assert!(downtime_reference(mode, scenario.name)
                    .iter()
                    .all(|(s, _)| *s > 0.0));
            }
        }
    }
}
