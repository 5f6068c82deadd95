//! The project's one benchmark command:
//!
//! ```sh
//! cargo run --release -p vfio-migd-tests --bin vfio-migd-bench -- [--only NAME]... [--pairs N] [--quick]
//! ```
//!
//! Prints one JSON object per figure on stdout,
//! `{"bench": NAME, "value": V, "unit": U, "baseline": B, "ratio": R, ...}`, with the
//! baseline measured in the same run, interleaved with the figure, and the ratio oriented
//! so that 1.0 is the baseline and smaller is worse. Progress and summaries go to stderr.
//! `docs/benchmarks.md` explains every figure and what limits it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value, json};
use vfio_migd::config::PeerConfig;
use vfio_migd::dirty::bench::{BenchFigure, bitmap_merge_8x32mib, dirty_report_sparse};
use vfio_migd::fsm::Caps;
use vfio_migd::stream::StreamOptions;
use vfio_migd::stream::bench::{BenchSetup, BenchTls, compare};
use vfio_migd_tests::bench::sim_endpoints::SimEndpoints;
use vfio_migd_tests::bench::switchover::{GroupSpec, engine_against_raw, precopy_against_stop_copy};
use vfio_migd_tests::bench::{BenchError, Better, Pairs, median};

const MIB: u64 = 1 << 20;

const USAGE: &str = "\
usage: vfio-migd-bench [--only NAME]... [--pairs N] [--quick]

  --only NAME  run only this figure (repeatable); figures: stream_1dev, stream_8dev,
               bitmap_merge_8x32MiB, dirty_report_sparse, group_downtime_8dev,
               switchover_overhead_64dev, precopy_downtime_4dev
  --pairs N    interleaved (figure, baseline) pairs per figure, at least 3
               (default: 5 for the stream figures, 11 for the dirty-bitmap ones,
               9 for the downtime ones)
  --quick      smaller device states and 3 pairs: a smoke test, not a measurement";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Figure {
    Stream1Dev,
    Stream1DevTls,
    Stream8Dev,
    BitmapMerge,
    DirtyReportSparse,
    GroupDowntime8Dev,
    SwitchoverOverhead64Dev,
    PrecopyDowntime4Dev,
}

impl Figure {
    const ALL: [Figure; 8] = [
        Figure::Stream1Dev,
        Figure::Stream1DevTls,
        Figure::Stream8Dev,
        Figure::BitmapMerge,
        Figure::DirtyReportSparse,
        Figure::GroupDowntime8Dev,
        Figure::SwitchoverOverhead64Dev,
        Figure::PrecopyDowntime4Dev,
    ];

    fn name(self) -> &'static str {
        match self {
            Figure::Stream1Dev => "stream_1dev",
            Figure::Stream1DevTls => "stream_1dev_tls",
            Figure::Stream8Dev => "stream_8dev",
            Figure::BitmapMerge => "bitmap_merge_8x32MiB",
            Figure::DirtyReportSparse => "dirty_report_sparse",
            Figure::GroupDowntime8Dev => "group_downtime_8dev",
            Figure::SwitchoverOverhead64Dev => "switchover_overhead_64dev",
            Figure::PrecopyDowntime4Dev => "precopy_downtime_4dev",
        }
    }

    fn default_pairs(self) -> usize {
        match self {
            // Milliseconds each: more pairs cost nothing and steady the medians.
            Figure::BitmapMerge | Figure::DirtyReportSparse => 11,
            // Tens of milliseconds each, and downtimes scatter more than rates.
            Figure::GroupDowntime8Dev | Figure::SwitchoverOverhead64Dev | Figure::PrecopyDowntime4Dev => 9,
            Figure::Stream1Dev | Figure::Stream1DevTls | Figure::Stream8Dev => 5,
        }
    }
}

struct Args {
    only: Vec<Figure>,
    pairs: Option<usize>,
    quick: bool,
}

impl Args {
    fn pairs(&self, figure: Figure) -> usize {
        self.pairs.unwrap_or(if self.quick { 3 } else { figure.default_pairs() })
    }

    /// Full size, or the smoke test's.
    fn size(&self, full: u64, quick: u64) -> u64 {
        if self.quick { quick } else { full }
    }
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut args = Args { only: Vec::new(), pairs: None, quick: false };
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--only" => {
                let name = value()?;
                let figure = Figure::ALL
                    .into_iter()
                    .find(|f| f.name() == name)
                    .ok_or_else(|| format!("unknown figure {name:?}"))?;
                args.only.push(figure);
            }
            "--pairs" => {
                let text = value()?;
                let pairs: usize = text.parse().map_err(|_| format!("--pairs {text:?} is not a count"))?;
                if pairs < 3 {
                    return Err("--pairs must be at least 3 (figures are medians of pairs)".into());
                }
                args.pairs = Some(pairs);
            }
            "--quick" => args.quick = true,
            "-h" | "--help" => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Parsed::Run(args))
}

fn extra(fields: Value) -> Map<String, Value> {
    match fields {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

async fn stream(
    figure: Figure,
    devices: usize,
    tls: Option<BenchTls>,
    args: &Args,
) -> Result<BenchFigure, BenchError> {
    let with_tls = tls.is_some();
    let bytes_per_trial = args.size(1024 * MIB, 64 * MIB);
    let bytes_per_device = bytes_per_trial / devices as u64;
    // The relay always uses one connection per device: the stream does too, like for like.
    let setup = BenchSetup {
        devices,
        bytes_per_device,
        opts: StreamOptions { connections: devices, ..StreamOptions::default() },
        tls,
    };
    let endpoints = Arc::new(SimEndpoints::new(bytes_per_device));
    let result = compare(endpoints.clone(), &setup, args.pairs(figure)).await?;
    let pairs = Pairs { values: result.values, baselines: result.baselines };
    let direct = tokio::task::spawn_blocking(move || {
        (0..3).map(|_| endpoints.direct_trial(devices as u32)).collect::<Result<Vec<f64>, _>>()
    })
    .await
    .map_err(|_| BenchError::Panicked)??;
    let direct = median(&direct);
    eprintln!(
        "{}: the simulated devices alone (copied directly, no network) reach {direct:.3} GB/s",
        figure.name()
    );
    Ok(pairs.figure(
        figure.name(),
        "GB/s",
        Better::Higher,
        extra(json!({
            "devices": devices,
            "connections": devices,
            "tls": with_tls,
            "bytes_per_trial": bytes_per_device * devices as u64,
            "endpoints": "simulated devices: STOP_COPY source, RESUMING sink verifying every byte",
            "endpoints_direct_gbps": direct,
            "baseline_name": "plain relay (read/write, no framing, no checksum) between the same \
                              simulated devices, one TCP connection per device",
            "quick": args.quick,
        })),
    ))
}

async fn switchover(figure: Figure, group: GroupSpec, args: &Args) -> Result<BenchFigure, BenchError> {
    let result = engine_against_raw(&group, args.pairs(figure)).await?;
    eprintln!(
        "{}: engine downtime phases (median ms) {:.2?}; raw stages end at (median ms) {:.2?}",
        figure.name(),
        result.engine_phases_ms,
        result.raw_stages_ms
    );
    Ok(result.pairs.figure(
        figure.name(),
        "ms",
        Better::Lower,
        extra(json!({
            "devices": group.devices,
            "state_bytes_per_device": group.state_size,
            "caps": group.caps.to_string(),
            "data_connections": PeerConfig::default().data_connections,
            "engine_phase_ms": result.engine_phases_ms,
            "baseline_stage_ms": result.raw_stages_ms,
            "baseline_name": "the same device work without the orchestrator: threads, barriers \
                              and a plain TCP relay per device",
            "quick": args.quick,
        })),
    ))
}

async fn precopy(figure: Figure, group: GroupSpec, args: &Args) -> Result<BenchFigure, BenchError> {
    let result = precopy_against_stop_copy(&group, args.pairs(figure)).await?;
    eprintln!(
        "{}: downtime phases (median ms) with pre-copy {:.2?}, without {:.2?}; \
         handshake to running {:.1} ms with, {:.1} ms without",
        figure.name(),
        result.with_phases_ms,
        result.without_phases_ms,
        result.total_with_ms,
        result.total_without_ms
    );
    Ok(result.pairs.figure(
        figure.name(),
        "ms",
        Better::Lower,
        extra(json!({
            "devices": group.devices,
            "state_bytes_per_device": group.state_size,
            "dirty_rate_bytes_per_sec": group.dirty_rate,
            "caps": group.caps.to_string(),
            "phase_ms_with_pre_copy": result.with_phases_ms,
            "phase_ms_without_pre_copy": result.without_phases_ms,
            "total_ms_with_pre_copy": result.total_with_ms,
            "total_ms_without_pre_copy": result.total_without_ms,
            "baseline_name": "the same engine migration with [migration] pre_copy = false",
            "quick": args.quick,
        })),
    ))
}

fn run(figure: Figure, args: &Args, runtime: &tokio::runtime::Runtime) -> Result<BenchFigure, BenchError> {
    let p2p = Caps::STOP_COPY.union(Caps::P2P);
    match figure {
        Figure::Stream1Dev => runtime.block_on(stream(figure, 1, None, args)),
        Figure::Stream1DevTls => runtime.block_on(stream(figure, 1, Some(bench_tls()?), args)),
        Figure::Stream8Dev => runtime.block_on(stream(figure, 8, None, args)),
        Figure::BitmapMerge => Ok(bitmap_merge_8x32mib(args.pairs(figure))),
        Figure::DirtyReportSparse => Ok(dirty_report_sparse(args.pairs(figure))),
        Figure::GroupDowntime8Dev => {
            let group =
                GroupSpec { devices: 8, state_size: args.size(8 * MIB, MIB), caps: p2p, dirty_rate: 0 };
            runtime.block_on(switchover(figure, group, args))
        }
        Figure::SwitchoverOverhead64Dev => {
            let group = GroupSpec { devices: 64, state_size: 4096, caps: p2p, dirty_rate: 0 };
            runtime.block_on(switchover(figure, group, args))
        }
        Figure::PrecopyDowntime4Dev => {
            let group = GroupSpec {
                devices: 4,
                state_size: args.size(32 * MIB, 4 * MIB),
                caps: p2p.union(Caps::PRE_COPY),
                // A guest that keeps touching a little of its device state: the pages it
                // dirties during pre-copy still travel in the downtime.
                dirty_rate: MIB,
            };
            runtime.block_on(precopy(figure, group, args))
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("vfio-migd-bench: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vfio-migd-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let selected: Vec<Figure> =
        Figure::ALL.into_iter().filter(|f| args.only.is_empty() || args.only.contains(f)).collect();
    let mut failed = BTreeMap::new();
    let started = Instant::now();
    for figure in selected {
        eprintln!("{}: {} interleaved pairs...", figure.name(), args.pairs(figure));
        let figure_started = Instant::now();
        match run(figure, &args, &runtime) {
            Ok(result) => {
                eprintln!(
                    "{}: {:.3} {} against baseline {:.3} {}: ratio {:.3} ({:.1?})",
                    result.bench,
                    result.value,
                    result.unit,
                    result.baseline,
                    result.unit,
                    result.ratio,
                    figure_started.elapsed()
                );
                println!("{}", result.to_json_line());
            }
            Err(e) => {
                eprintln!("{}: FAILED: {e}", figure.name());
                failed.insert(figure.name(), e.to_string());
            }
        }
    }
    eprintln!("all figures in {:.1?}", started.elapsed());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "vfio-migd-bench: {} figure(s) failed: {:?}",
            failed.len(),
            failed.keys().collect::<Vec<_>>()
        );
        ExitCode::FAILURE
    }
}

/// A throw-away fleet CA and one certificate (rcgen) for both ends of the TLS stream,
/// loaded the way the daemon loads `[peer.tls]`.
fn bench_tls() -> Result<BenchTls, BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Tls(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| failed(&e))?;
    let ca_key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| failed(&e))?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).map_err(|e| failed(&e))?.pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
    let leaf = rcgen::CertificateParams::new(vec!["bench.vfio-migd".to_owned()]).map_err(|e| failed(&e))?;
    let cert_pem = leaf.signed_by(&key, &issuer).map_err(|e| failed(&e))?.pem();
    let paths = vfio_migd::tls::PeerTlsConfig {
        cert: dir.path().join("bench.crt"),
        key: dir.path().join("bench.key"),
        ca: dir.path().join("ca.crt"),
    };
    for (path, pem) in [(&paths.cert, cert_pem), (&paths.key, key.serialize_pem()), (&paths.ca, ca_pem)] {
        std::fs::write(path, pem).map_err(|e| failed(&e))?;
    }
    let material = vfio_migd::tls::load_material(&paths).map_err(|e| failed(&e))?;
    let name = vfio_migd::tls::server_name("bench.vfio-migd:0", "").map_err(|e| failed(&e))?;
    Ok(BenchTls { server: material.server, client: material.client, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_select_figures_pairs_and_sizes() {
        let Ok(Parsed::Run(args)) =
            parse(&["--only", "stream_8dev", "--only", "precopy_downtime_4dev", "--pairs", "7"])
        else {
            panic!("valid flags refused")
        };
        assert_eq!(args.only, vec![Figure::Stream8Dev, Figure::PrecopyDowntime4Dev]);
        assert_eq!(args.pairs(Figure::BitmapMerge), 7);
        assert_eq!(args.size(8, 1), 8);

        let Ok(Parsed::Run(quick)) = parse(&["--quick"]) else { panic!("--quick refused") };
        assert!(quick.only.is_empty());
        assert_eq!((quick.pairs(Figure::BitmapMerge), quick.size(8, 1)), (3, 1));
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        for (args, why) in [
            (&["--only", "stream_2dev"][..], "unknown figure"),
            (&["--pairs", "2"][..], "at least 3"),
            (&["--pairs", "many"][..], "not a count"),
            (&["--pairs"][..], "needs a value"),
            (&["--fast"][..], "unknown argument"),
        ] {
            let err = parse(args).err().unwrap_or_default();
            assert!(err.contains(why), "{args:?}: {err:?}");
        }
    }

    #[test]
    fn every_figure_has_its_design_name() {
        let names: Vec<&str> = Figure::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            [
                "stream_1dev",
                "stream_1dev_tls",
                "stream_8dev",
                "bitmap_merge_8x32MiB",
                "dirty_report_sparse",
                "group_downtime_8dev",
                "switchover_overhead_64dev",
                "precopy_downtime_4dev"
            ]
        );
    }
}
