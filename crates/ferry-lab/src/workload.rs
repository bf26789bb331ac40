//! A client of ferry-guest outside the VM, the way the downtime experiments drive it:
//! one write every interval, each with its own timeout; every acknowledged write is
//! logged, so that afterwards `/kv?since=0` shows whether any was lost, and the gaps
//! between successes show how long the service was away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What the writer saw.
#[derive(Clone, Debug, Default)]
pub struct WriterLog {
    /// Keys and values the guest acknowledged (HTTP 200), in order.
    pub acked: Vec<(String, String)>,
    /// One line per failed write: the key and why.
    pub failures: Vec<String>,
    /// The longest time between two successful writes (or from the start to the first).
    pub longest_gap: Duration,
    pub interval: Duration,
}

impl WriterLog {
    /// The client-observed pause: the longest gap minus the workload's own interval.
    pub fn pause(&self) -> Duration {
        self.longest_gap.saturating_sub(self.interval)
    }
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WriterLog>,
}

impl Writer {
    /// Writes `{prefix}{n}` = `n` to `http://{ip}:8080/kv/…` every `interval`, each
    /// request giving up after `timeout`.
    pub fn start(ip: &str, prefix: &str, interval: Duration, timeout: Duration) -> Writer {
        Writer::run(ip, Some(prefix.to_string()), interval, timeout)
    }

    /// Reads `/health` every `interval`: a probe that barely touches the guest's memory,
    /// for measuring the pause of an otherwise idle guest.
    pub fn probe(ip: &str, interval: Duration, timeout: Duration) -> Writer {
        Writer::run(ip, None, interval, timeout)
    }

    fn run(ip: &str, prefix: Option<String>, interval: Duration, timeout: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let base = format!("http://{ip}:8080");
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default();
            let mut log = WriterLog {
                interval,
                ..WriterLog::default()
            };
            let mut last_success = Instant::now();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                ticker.tick().await;
                n += 1;
                let (key, request) = match &prefix {
                    Some(prefix) => {
                        let key = format!("{prefix}{n}");
                        let request = http.put(format!("{base}/kv/{key}")).body(n.to_string());
                        (key, request)
                    }
                    None => (format!("health-{n}"), http.get(format!("{base}/health"))),
                };
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        log.longest_gap = log.longest_gap.max(last_success.elapsed());
                        last_success = Instant::now();
                        if prefix.is_some() {
                            log.acked.push((key, n.to_string()));
                        }
                    }
                    Ok(response) => log
                        .failures
                        .push(format!("{key}: HTTP {}", response.status())),
                    Err(error) => log.failures.push(format!("{key}: {}", error_chain(&error))),
                }
            }
            log
        });
        Writer { stop, task }
    }

    pub async fn stop(self) -> WriterLog {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// An error with its causes, e.g. `error sending request: connection refused`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[derive(Deserialize)]
struct Write {
    key: String,
    value: String,
}

/// Every key and value the guest's store holds now.
pub async fn stored(ip: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let url = format!("http://{ip}:8080/kv?since=0");
    let writes: Vec<Write> = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|error| format!("{url}: {error}"))?
        .json()
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    Ok(writes
        .into_iter()
        .map(|write| (write.key, write.value))
        .collect())
}

/// The acknowledged writes the guest no longer has.
pub async fn lost_writes(ip: &str, log: &WriterLog) -> Result<Vec<String>, String> {
    let stored = stored(ip).await?;
    Ok(log
        .acked
        .iter()
        .filter(|(key, value)| stored.get(key) != Some(value))
        .map(|(key, _)| key.clone())
        .collect())
}

/// The guest's boot id (changes only when the guest OS boots).
pub async fn boot_id(ip: &str) -> Result<String, String> {
    let url = format!("http://{ip}:8080/health");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match answer {
            Ok(response) => {
                let health: serde_json::Value = response
                    .json()
                    .await
                    .map_err(|error| format!("{url}: {error}"))?;
                return health["boot_id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{url}: no boot_id in {health}"));
            }
            // ferry-guest starts a moment after the guest agent answers.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(error) => return Err(format!("{url}: {error}")),
        }
    }
}
