//! Dirty-tracking benchmarks: one JSON object per line on stdout, human text on stderr.
//!
//! `cargo run --release -p vfio-migd --example dirty_bench [PAIRS]`

use vfio_migd::dirty::bench::{self, BenchFigure};

fn main() {
    let pairs = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(11);
    type Figure = fn(usize) -> BenchFigure;
    let figures: [(&str, Figure); 2] = [
        ("bitmap_merge_8x32MiB", bench::bitmap_merge_8x32mib),
        ("dirty_report_sparse", bench::dirty_report_sparse),
    ];
    for (name, run) in figures {
        eprintln!("{name}: {pairs} interleaved pairs...");
        let figure = run(pairs);
        eprintln!(
            "{name}: {:.3} {} vs baseline {:.3} {} (ratio {:.2})",
            figure.value, figure.unit, figure.baseline, figure.unit, figure.ratio
        );
        println!("{}", figure.to_json_line());
    }
}
