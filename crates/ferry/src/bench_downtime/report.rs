//! The downtime benchmark's HTML report: for each mode a bar chart (inline SVG, log
//! scale, so 0.1 s and 60 s both read) of Ferry's median downtime per workload next to
//! the reference's, then the runs as a table. One self-contained file, no scripts.

use ferry_lab::flows::SCENARIOS;
use ferry_lab::harness::downtime::{mode_title, subject, DowntimeRun};
use ferry_lab::harness::reference::downtime_reference;
use ferry_lab::harness::stats::median;

const WIDTH: f64 = 760.0;
const LABEL: f64 = 150.0;
const ROW: f64 = 34.0;
const BAR: f64 = 12.0;
/// The axis: 0.01 s to 100 s.
const DECADES: [f64; 5] = [0.01, 0.1, 1.0, 10.0, 100.0];

fn x_of(seconds: f64) -> f64 {
    let low = DECADES[0].log10();
    let high = DECADES[DECADES.len() - 1].log10();
    let clamped = seconds.clamp(DECADES[0], DECADES[DECADES.len() - 1]);
    LABEL + (clamped.log10() - low) / (high - low) * (WIDTH - LABEL - 20.0)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One mode's chart: per workload, Ferry's median (green) over the reference's (grey).
fn chart(mode: &str, runs: &[DowntimeRun]) -> String {
    let rows: Vec<(&str, f64, f64, bool)> = SCENARIOS
        .iter()
        .filter_map(|scenario| {
            let ours: Vec<&DowntimeRun> = runs
                .iter()
                .filter(|run| run.mode == mode && run.scenario == scenario.name)
                .collect();
            if ours.is_empty() {
                return None;
            }
            let failed = ours.iter().any(|run| run.failed_ops > 0);
            let theirs = downtime_reference(mode, scenario.name);
            Some((
                scenario.name,
                median(ours.iter().map(|run| run.downtime_s)),
                median(theirs.iter().map(|(seconds, _)| *seconds)),
                failed,
            ))
        })
        .collect();
    let height = 40.0 + ROW * rows.len() as f64 + 30.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    for decade in DECADES {
        let x = x_of(decade);
        svg.push_str(&format!(
            r##"<line x1="{x:.1}" y1="20" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{decade} s</text>"##,
            height - 25.0,
            height - 10.0));
    }
    for (index, (name, ours, theirs, failed)) in rows.iter().enumerate() {
        let y = 30.0 + ROW * index as f64;
        svg.push_str(&format!(
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LABEL - 8.0,
            y + BAR + 2.0,
            escape(name)
        ));
        svg.push_str(&format!(
            r##"<rect x="{LABEL}" y="{y:.1}" width="{:.1}" height="{BAR}" fill="{}"><title>{} median {ours:.2} s</title></rect><text x="{:.1}" y="{:.1}" fill="#222">{ours:.2} s{}</text>"##,
            x_of(*ours) - LABEL,
            if *failed { "#d98c1f" } else { "#2a9d5c" },
            subject(mode),
            x_of(*ours) + 4.0,
            y + BAR - 2.0,
            if *failed { " (failed ops)" } else { "" }));
        svg.push_str(&format!(
            r##"<rect x="{LABEL}" y="{:.1}" width="{:.1}" height="{BAR}" fill="#9aa3ad"><title>reference median {theirs:.2} s</title></rect><text x="{:.1}" y="{:.1}" fill="#555">{theirs:.2} s</text>"##,
            y + BAR + 2.0,
            x_of(*theirs) - LABEL,
            x_of(*theirs) + 4.0,
            y + 2.0 * BAR));
    }
    svg.push_str("</svg>");
    svg
}

fn runs_table(mode: &str, runs: &[DowntimeRun]) -> String {
    let mut html = String::from(
        "<table><tr><th>workload</th><th>run</th><th>from → to</th><th>downtime s</th><th>failed ops</th><th>lost writes</th><th>rebooted</th><th>QEMU downtime ms</th><th>Ferry overhead ms</th></tr>",
    );
    for run in runs.iter().filter(|run| run.mode == mode) {
        let shown = |value: Option<u64>| value.map_or("–".to_string(), |value| value.to_string());
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{} → {}</td><td>{:.2}</td><td>{} of {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&run.scenario),
            run.run,
            escape(&run.from),
            escape(&run.to),
            run.downtime_s,
            run.failed_ops,
            run.operations,
            run.lost_writes,
            if run.rebooted { "yes" } else { "no" },
            shown(run.qemu_downtime_ms),
            shown(run.ferry_overhead_ms)));
    }
    html.push_str("</table>");
    html
}

/// The whole report.
pub fn render(
    modes: &[String],
    runs: &[DowntimeRun],
    machine: &str,
    accel: &str,
    memory: &str,
) -> String {
    let mut html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Ferry downtime benchmark</title>
<style>body{{font-family:sans-serif;max-width:820px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0 2em}}td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}}
.key span{{display:inline-block;width:12px;height:12px;margin:0 4px 0 14px;vertical-align:middle}}</style></head><body>
<h1>Ferry downtime benchmark</h1>
<p>REFERENCE §1 reproduced: the client-observed downtime of each workload while its VM is moved or its host dies,
Ferry against the reference (Hyper-V 2.0, 3 runs). Machine: {}; accelerator {}; VM memory {}.</p>
<p class="key"><span style="background:#2a9d5c"></span>Ferry (or bare QEMU), median<span style="background:#d98c1f"></span>some operations failed<span style="background:#9aa3ad"></span>reference, median</p>"#,
        escape(machine),
        escape(accel),
        escape(memory)
    );
    for mode in modes {
        let title = mode_title(mode);
        html.push_str(&format!(
            "<h2>{title}</h2>{}{}",
            chart(mode, runs),
            runs_table(mode, runs)
        ));
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_axis_is_logarithmic_and_clamped() {
        assert!((x_of(1.0) - x_of(0.1) - (x_of(10.0) - x_of(1.0))).abs() < 1e-9);
        assert_eq!(x_of(0.0001), x_of(0.01));
        assert_eq!(x_of(1000.0), x_of(100.0));
    }

    #[test]
    fn the_report_has_a_chart_per_mode_and_escapes_text() {
        let run = DowntimeRun {
            mode: "live".into(),
            scenario: "idle".into(),
            run: 1,
            from: "host1".into(),
            to: "<host2>".into(),
            downtime_s: 0.27,
            failed_ops: 0,
            operations: 50,
            lost_writes: 0,
            rebooted: false,
            qemu_downtime_ms: Some(30),
            ferry_overhead_ms: Some(100),
        };
        let html = render(&["live".into()], &[run], "2 CPUs", "tcg", "256M");
        assert_eq!(html.matches("<svg").count(), 1);
        assert!(html.contains("Ferry median 0.27 s"));
        assert!(html.contains("reference median 1.08 s"));
        assert!(html.contains("&lt;host2&gt;"));
    }
}
