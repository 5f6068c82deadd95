//! The project's benchmark (`vfio-migd-bench`): every figure against a baseline measured
//! in the same run, interleaved with it (pairs, the order flipped every pair), reported as
//! medians because the machines this runs on are noisy. `docs/benchmarks.md` explains the
//! figures and what limits each ratio.
//!
//! - [`sim_endpoints`]: simulated devices at both ends of the stream benchmark;
//! - [`switchover`]: group migrations through two in-process daemons against the same
//!   device work done by bare threads and a plain relay.

pub mod sim_endpoints;
pub mod switchover;

use std::io;

use vfio_migd::config::ConfigError;
use vfio_migd::device::DeviceError;
use vfio_migd::device::sim::SimSpecError;
use vfio_migd::dirty::bench::BenchFigure;
use vfio_migd::engine::EngineError;

/// Why a benchmark trial produced no figure. A trial whose migration did not move every
/// byte faithfully is an error, never a number. (Large sources are boxed: results of
/// every trial step carry this type.)
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Device(Box<DeviceError>),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Stream(Box<vfio_migd::stream::bench::BenchError>),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Config(Box<ConfigError>),
    #[error(transparent)]
    Sim(Box<SimSpecError>),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("job {job} on the {side}: {what}")]
    Migration { job: String, side: &'static str, what: String },
    #[error("device {device} was not migrated faithfully: {what}")]
    Verification { device: String, what: String },
    #[error("another device of the trial failed first")]
    Abandoned,
    #[error("a trial thread panicked")]
    Panicked,
}

impl From<DeviceError> for BenchError {
    fn from(e: DeviceError) -> BenchError {
        BenchError::Device(Box::new(e))
    }
}

impl From<vfio_migd::stream::bench::BenchError> for BenchError {
    fn from(e: vfio_migd::stream::bench::BenchError) -> BenchError {
        BenchError::Stream(Box::new(e))
    }
}

impl From<ConfigError> for BenchError {
    fn from(e: ConfigError) -> BenchError {
        BenchError::Config(Box::new(e))
    }
}

impl From<SimSpecError> for BenchError {
    fn from(e: SimSpecError) -> BenchError {
        BenchError::Sim(Box::new(e))
    }
}

/// Which way a figure improves, which decides how its ratio is oriented: 1.0 is the
/// baseline and smaller is always worse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Rates: `ratio = value / baseline`.
    Higher,
    /// Times: `ratio = baseline / value`.
    Lower,
}

impl Better {
    pub fn ratio(self, value: f64, baseline: f64) -> f64 {
        match self {
            Better::Higher => value / baseline,
            Better::Lower => baseline / value,
        }
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Interleaved measurements of a figure and its baseline, one entry per pair.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pairs {
    pub values: Vec<f64>,
    pub baselines: Vec<f64>,
}

impl Pairs {
    /// The figure line: medians of each side, their ratio, and the raw pairs (with the
    /// median of the per-pair ratios, which is less sensitive to slow drifts of the machine).
    pub fn figure(
        &self,
        bench: &'static str,
        unit: &'static str,
        better: Better,
        mut extra: serde_json::Map<String, serde_json::Value>,
    ) -> BenchFigure {
        let value = median(&self.values);
        let baseline = median(&self.baselines);
        let pair_ratios: Vec<f64> =
            self.values.iter().zip(&self.baselines).map(|(v, b)| better.ratio(*v, *b)).collect();
        extra.insert("pairs".into(), self.values.len().into());
        extra.insert("values".into(), self.values.clone().into());
        extra.insert("baselines".into(), self.baselines.clone().into());
        extra.insert("pair_ratio_median".into(), median(&pair_ratios).into());
        BenchFigure { bench, value, unit, baseline, ratio: better.ratio(value, baseline), extra }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_oriented_so_that_smaller_is_worse() {
        // A rate half the baseline and a time twice the baseline are both 0.5.
        assert_eq!(Better::Higher.ratio(1.0, 2.0), 0.5);
        assert_eq!(Better::Lower.ratio(20.0, 10.0), 0.5);
    }

    #[test]
    fn a_figure_carries_medians_and_every_pair() {
        let pairs = Pairs { values: vec![30.0, 10.0, 20.0], baselines: vec![10.0, 10.0, 40.0] };
        let figure = pairs.figure("x", "ms", Better::Lower, serde_json::Map::new());
        assert_eq!((figure.value, figure.baseline, figure.ratio), (20.0, 10.0, 0.5));
        let line: serde_json::Value = serde_json::from_str(&figure.to_json_line()).unwrap();
        assert_eq!(line["bench"], "x");
        assert_eq!(line["unit"], "ms");
        assert_eq!(line["pairs"], 3);
        assert_eq!(line["values"], serde_json::json!([30.0, 10.0, 20.0]));
        // Per-pair ratios 1/3, 1, 2: their median is 1.
        assert_eq!(line["pair_ratio_median"], 1.0);
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
