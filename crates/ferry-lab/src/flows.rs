//! The downtime benchmark's client: the seven workloads of REFERENCE §1 driven against
//! ferry-guest from outside the VM, the way an integration engine's flows would. Each
//! operation is retried until it succeeds or `client_timeout` passes (then it counts
//! as failed, as a well-designed flow would give up); every acknowledged write is
//! remembered, so that afterwards the guest is checked for each one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What a flow does in one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowKind {
    /// Nothing runs in the guest; a probe reads `/health` to see it answer.
    Idle,
    /// A database write: `PUT /kv/{key}` (SQLite, synchronous=FULL).
    Db,
    /// An HTTP request and its answer: `GET /health`.
    Http,
    /// A file put and read back: `PUT` then `GET /files/{name}` (fsynced).
    File,
}

/// One of REFERENCE §1's workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub kind: FlowKind,
    /// `None`: back to back (bulk).
    pub interval: Option<Duration>,
    /// File size for `File`.
    pub file_bytes: usize,
}

const EVERY: Option<Duration> = Some(Duration::from_millis(500));
/// The idle probe's period: the resolution of an idle guest's measured downtime.
const IDLE_PROBE: Option<Duration> = Some(Duration::from_millis(100));

/// REFERENCE §1's rows, in its order.
pub const SCENARIOS: [Scenario; 7] = [
    Scenario {
        name: "idle",
        kind: FlowKind::Idle,
        interval: IDLE_PROBE,
        file_bytes: 0,
    },
    Scenario {
        name: "db-every-0.5s",
        kind: FlowKind::Db,
        interval: EVERY,
        file_bytes: 0,
    },
    Scenario {
        name: "db-bulk",
        kind: FlowKind::Db,
        interval: None,
        file_bytes: 0,
    },
    Scenario {
        name: "http-every-0.5s",
        kind: FlowKind::Http,
        interval: EVERY,
        file_bytes: 0,
    },
    Scenario {
        name: "http-bulk",
        kind: FlowKind::Http,
        interval: None,
        file_bytes: 0,
    },
    Scenario {
        name: "file-every-0.5s",
        kind: FlowKind::File,
        interval: EVERY,
        file_bytes: 256 * 1024,
    },
    Scenario {
        name: "file-bulk",
        kind: FlowKind::File,
        interval: None,
        file_bytes: 4 * 1024 * 1024,
    },
];

/// Bulk file flows reuse this many names, so a long run does not fill the guest's disk.
const FILE_NAMES: u64 = 8;

/// What a flow saw.
#[derive(Clone, Debug, Default)]
pub struct FlowLog {
    pub operations: u64,
    /// One line per operation that got no success within the client timeout.
    pub failed: Vec<String>,
    /// The longest time between two successes (or from the start to the first).
    pub longest_gap: Duration,
    pub interval: Duration,
    /// KV writes the guest acknowledged.
    acked_kv: Vec<(String, String)>,
    /// Per file name with an acknowledged put: the versions the guest may hold now (the
    /// last acknowledged one and any attempted after it without an answer).
    file_versions: HashMap<String, Vec<u64>>,
    file_bytes: usize,
}

impl FlowLog {
    /// Client-observed downtime: the longest gap minus the flow's own interval.
    pub fn downtime(&self) -> Duration {
        self.longest_gap.saturating_sub(self.interval)
    }
}

pub struct Flow {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<FlowLog>,
}

impl Flow {
    /// Starts the scenario's flow against `http://{ip}:8080`; keys and file names start
    /// with `prefix`, so runs do not mix.
    pub fn start(ip: &str, scenario: Scenario, prefix: &str, client_timeout: Duration) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let base = format!("http://{ip}:8080");
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(client_timeout.min(Duration::from_secs(2)))
                .build()
                .unwrap_or_default();
            let mut log = FlowLog {
                interval: scenario.interval.unwrap_or_default(),
                file_bytes: scenario.file_bytes,
                ..FlowLog::default()
            };
            let mut ticker = scenario.interval.map(|interval| {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker
            });
            let mut last_success = Instant::now();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                if let Some(ticker) = &mut ticker {
                    ticker.tick().await;
                }
                n += 1;
                log.operations += 1;
                let started = Instant::now();
                let mut last_error = String::new();
                let succeeded = loop {
                    match attempt(&http, &base, scenario, &prefix, n, &mut log).await {
                        Ok(()) => break true,
                        Err(error) => last_error = error,
                    }
                    if started.elapsed() >= client_timeout {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                if succeeded {
                    log.longest_gap = log.longest_gap.max(last_success.elapsed());
                    last_success = Instant::now();
                } else {
                    log.failed.push(format!("operation {n}: {last_error}"));
                }
            }
            log
        });
        Flow { stop, task }
    }

    pub async fn stop(self) -> FlowLog {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// The bytes of version `version` of a file: recognisable, different per version.
fn file_content(version: u64, bytes: usize) -> Vec<u8> {
    format!("{version:015}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(bytes)
        .collect()
}

async fn attempt(
    http: &reqwest::Client,
    base: &str,
    scenario: Scenario,
    prefix: &str,
    n: u64,
    log: &mut FlowLog,
) -> Result<(), String> {
    let ok = |response: reqwest::Response| {
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(format!("HTTP {}", response.status()))
        }
    };
    match scenario.kind {
        FlowKind::Idle | FlowKind::Http => {
            ok(http
                .get(format!("{base}/health"))
                .send()
                .await
                .map_err(|e| e.to_string())?)?;
        }
        FlowKind::Db => {
            let key = format!("{prefix}{n}");
            ok(http
                .put(format!("{base}/kv/{key}"))
                .body(n.to_string())
                .send()
                .await
                .map_err(|e| e.to_string())?)?;
            log.acked_kv.push((key, n.to_string()));
        }
        FlowKind::File => {
            let name = format!("{prefix}{}", n % FILE_NAMES);
            let content = file_content(n, scenario.file_bytes);
            // Sent but unanswered, it may or may not be there: either version is right.
            if let Some(versions) = log.file_versions.get_mut(&name) {
                versions.push(n);
            }
            ok(http
                .put(format!("{base}/files/{name}"))
                .body(content.clone())
                .send()
                .await
                .map_err(|e| e.to_string())?)?;
            log.file_versions.insert(name.clone(), vec![n]);
            let back = ok(http
                .get(format!("{base}/files/{name}"))
                .send()
                .await
                .map_err(|e| e.to_string())?)?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
            if back.as_ref() != content.as_slice() {
                return Err(format!("file {name} read back different from what was put"));
            }
        }
    }
    Ok(())
}

/// Acknowledged writes (KV keys, file names) the guest no longer has.
pub async fn lost_writes(ip: &str, log: &FlowLog) -> Result<Vec<String>, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|error| error.to_string())?;
    let mut lost = Vec::new();
    if !log.acked_kv.is_empty() {
        #[derive(serde::Deserialize)]
        struct Write {
            key: String,
            value: String,
        }
        let url = format!("http://{ip}:8080/kv?since=0");
        let writes: Vec<Write> = http
            .get(&url)
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .map_err(|error| format!("{url}: {error}"))?
            .json()
            .await
            .map_err(|error| format!("{url}: {error}"))?;
        let stored: HashMap<String, String> = writes
            .into_iter()
            .map(|write| (write.key, write.value))
            .collect();
        lost.extend(
            log.acked_kv
                .iter()
                .filter(|(key, value)| stored.get(key) != Some(value))
                .map(|(key, _)| key.clone()),
        );
    }
    for (name, versions) in &log.file_versions {
        let url = format!("http://{ip}:8080/files/{name}");
        let held = http
            .get(&url)
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .map_err(|error| format!("{url}: {error}"))?
            .bytes()
            .await
            .map_err(|error| format!("{url}: {error}"))?;
        let expected = versions
            .iter()
            .any(|version| held.as_ref() == file_content(*version, log.file_bytes).as_slice());
        if !expected {
            lost.push(format!("file {name}"));
        }
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_versions_differ_and_have_the_asked_size() {
        let one = file_content(1, 4096);
        assert_eq!(one.len(), 4096);
        assert_ne!(one, file_content(2, 4096));
        assert!(one.starts_with(b"000000000000001\n"));
    }

    #[test]
    fn downtime_is_the_longest_gap_less_the_flows_own_interval() {
        let log = FlowLog {
            longest_gap: Duration::from_millis(1700),
            interval: Duration::from_millis(500),
            ..FlowLog::default()
        };
        assert_eq!(log.downtime(), Duration::from_millis(1200));
    }

    #[test]
    fn the_scenarios_are_reference_sections_rows_in_order() {
        let names: Vec<&str> = SCENARIOS.iter().map(|scenario| scenario.name).collect();
        assert_eq!(
            names,
            [
                "idle",
                "db-every-0.5s",
                "db-bulk",
                "http-every-0.5s",
                "http-bulk",
                "file-every-0.5s",
                "file-bulk"
            ]
        );
    }
}
