//! How the CLI speaks: one line on failure, JSON when asked, a heading per step.

/// Prints `ferry: <error>: <cause>…` on one line and exits with status 1.
pub fn fail(error: &anyhow::Error) -> ! {
    let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
    let mut line = String::new();
    for part in chain {
        // Library errors often already contain their cause's text; don't say it twice.
        if !line.contains(&part) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&part);
        }
    }
    eprintln!("ferry: {}", line.replace('\n', " "));
    std::process::exit(1);
}

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Writes `value` as pretty JSON to `path` (a benchmark's `--json` file).
pub fn write_json_file(
    path: &std::path::Path,
    value: &impl serde::Serialize,
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Announces the next step of a long command (the tour, a lab's first build).
pub fn step(text: &str) {
    println!("\n==> {text}");
}
