//! Stream throughput against a plain relay between the same pipes, in the same run.
//!
//! ```sh
//! cargo run --release -p vfio-migd --example stream_bench -- [--pairs N] [--mib-per-trial M]
//!     [--only stream_1dev] [--connections C] [--max-payload-kib K] [--buffers B]
//! ```
//! Prints one JSON object per figure on stdout (`docs/stream-protocol.md` explains what
//! they mean), human text on stderr.

use std::sync::Arc;

use anyhow::{Context, bail};
use vfio_migd::stream::StreamOptions;
use vfio_migd::stream::bench::{BenchSetup, PipeEndpoints, compare};

struct Args {
    pairs: usize,
    mib_per_trial: u64,
    only: Option<String>,
    connections: Option<usize>,
    max_payload_kib: usize,
    buffers: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let defaults = StreamOptions::default();
    let mut args = Args {
        pairs: 5,
        mib_per_trial: 1024,
        only: None,
        connections: None,
        max_payload_kib: defaults.max_payload >> 10,
        buffers: defaults.buffers_per_device,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pairs" => args.pairs = value()?.parse()?,
            "--mib-per-trial" => args.mib_per_trial = value()?.parse()?,
            "--only" => args.only = Some(value()?),
            "--connections" => args.connections = Some(value()?.parse()?),
            "--max-payload-kib" => args.max_payload_kib = value()?.parse()?,
            "--buffers" => args.buffers = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if args.pairs < 3 {
        bail!("--pairs must be at least 3 (medians of pairs)");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let endpoints = Arc::new(PipeEndpoints::new(1 << 20));
    for (name, devices) in [("stream_1dev", 1usize), ("stream_8dev", 8)] {
        if args.only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let connections = args.connections.unwrap_or(devices).min(devices);
        let setup = BenchSetup {
            devices,
            bytes_per_device: (args.mib_per_trial << 20) / devices as u64,
            opts: StreamOptions {
                connections,
                max_payload: args.max_payload_kib << 10,
                buffers_per_device: args.buffers,
                ..StreamOptions::default()
            },
            tls: None,
        };
        let result = runtime.block_on(compare(endpoints.clone(), &setup, args.pairs))?;
        eprintln!(
            "{name}: stream {:.2} GB/s, plain relay {:.2} GB/s, ratio {:.3} ({} devices, {} connections, \
             {} MiB per trial, {} pairs; stream {:.2?}, relay {:.2?}; {:.0} KiB per frame; \
             CPU s/GB stream {:.3}, relay {:.3})",
            result.value,
            result.baseline,
            result.ratio,
            devices,
            connections,
            args.mib_per_trial,
            args.pairs,
            result.values,
            result.baselines,
            result.mean_frame_bytes / 1024.0,
            result.cpu_seconds_per_gb,
            result.baseline_cpu_seconds_per_gb,
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": name,
                "value": result.value,
                "unit": "GB/s",
                "baseline": result.baseline,
                "ratio": result.ratio,
                "devices": devices,
                "connections": connections,
                "bytes_per_trial": setup.bytes_per_device * devices as u64,
                "pairs": args.pairs,
                "mean_frame_bytes": result.mean_frame_bytes.round(),
                "cpu_seconds_per_gb": result.cpu_seconds_per_gb,
                "baseline_cpu_seconds_per_gb": result.baseline_cpu_seconds_per_gb,
            })
        );
    }
    Ok(())
}
