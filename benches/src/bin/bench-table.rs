//! Prints the Markdown table of the last criterion run: steps/s and cells·steps/s per
//! backend and workload, with the ratio to the fastest backend.
//!
//! `cargo run -p nca-benches --bin bench-table [-- target/criterion]`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/criterion"));
    if !root.is_dir() {
        eprintln!(
            "{}: no criterion results; run `cargo bench -p nca-benches` first",
            root.display()
        );
        std::process::exit(1);
    }
    for group in [
        "train_step",
        "forward",
        "train_step_picture",
        "forward_picture",
        "train_step_sized",
        "forward_sized",
    ] {
        let results = collect(&root.join(group));
        if results.is_empty() {
            continue;
        }
        println!("\n### {group}\n");
        println!("| workload | backend | steps/s | Mcells·steps/s | vs fastest |");
        println!("|---|---|---:|---:|---:|");
        let mut workloads: Vec<_> = results.iter().collect();
        // Smallest grid first: order by cells, then by side.
        workloads.sort_by(|a, b| {
            cells_of(a.0)
                .total_cmp(&cells_of(b.0))
                .then(a.0.len().cmp(&b.0.len()))
        });
        for (workload, backends) in workloads {
            let best = backends.values().cloned().fold(0.0, f64::max);
            let mut rows: Vec<_> = backends.iter().collect();
            rows.sort_by(|a, b| b.1.total_cmp(a.1));
            let cells = cells_of(workload);
            for (backend, steps) in rows {
                println!(
                    "| {workload} | {backend} | {steps:.1} | {:.1} | {:.2}× |",
                    steps * cells / 1e6,
                    steps / best
                );
            }
        }
    }
}

/// workload → backend → steps per second.
fn collect(group: &Path) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let Ok(backends) = std::fs::read_dir(group) else {
        return out;
    };
    for backend in backends.flatten() {
        let Ok(workloads) = std::fs::read_dir(backend.path()) else {
            continue;
        };
        for workload in workloads.flatten() {
            let file = workload.path().join("new/estimates.json");
            let Some(mean_ns) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["mean"]["point_estimate"].as_f64())
            else {
                continue;
            };
            out.entry(workload.file_name().to_string_lossy().into_owned())
                .or_default()
                .insert(
                    backend.file_name().to_string_lossy().into_owned(),
                    1e9 / mean_ns,
                );
        }
    }
    out
}

fn cells_of(workload: &str) -> f64 {
    workload
        .split('x')
        .filter_map(|p| p.parse::<f64>().ok())
        .product()
}
