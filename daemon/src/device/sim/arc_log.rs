//! The arc log: every arc a simulated device walks, every reset and every fault that
//! fired, one line each, kept in memory and (optionally) appended to a file.
//!
//! ```text
//! <CLOCK_MONOTONIC ns>\t<device>\t<FROM>\t<TO>
//! <CLOCK_MONOTONIC ns>\t<device>\t<FROM>\tRESET
//! <CLOCK_MONOTONIC ns>\t<device>\t<STATE>\tFAULT\t<what fired>
//! ```
//!
//! Each line is written with one `write(2)` on an `O_APPEND` file, so lines from several
//! devices and processes never interleave, and a test in another process can read the
//! file at any time. CLOCK_MONOTONIC is system wide: logs of two daemons merge by time.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::time::{ClockId, clock_gettime};

use crate::fsm::{self, State};

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArcEvent {
    /// An arc to this state (ERROR when a fault made the device fall into it).
    Arc(State),
    /// `VFIO_DEVICE_RESET`: back to RUNNING.
    Reset,
    /// An injected fault fired.
    Fault(String),
}

/// One line of the arc log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArcLogEntry {
    /// CLOCK_MONOTONIC, nanoseconds.
    pub time_ns: u64,
    pub device: String,
    /// The device's state when it happened.
    pub from: State,
    pub event: ArcEvent,
}

impl ArcLogEntry {
    /// The arc, for an [`ArcEvent::Arc`] line.
    pub fn arc(&self) -> Option<fsm::Arc> {
        match self.event {
            ArcEvent::Arc(to) => Some(fsm::Arc { from: self.from, to }),
            _ => None,
        }
    }
}

impl fmt::Display for ArcLogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\t{}\t{}\t", self.time_ns, self.device, self.from)?;
        match &self.event {
            ArcEvent::Arc(to) => write!(f, "{to}"),
            ArcEvent::Reset => f.write_str("RESET"),
            ArcEvent::Fault(what) => write!(f, "FAULT\t{what}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArcLogError {
    #[error("cannot read arc log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("arc log line {line}: {reason}")]
    Malformed { line: usize, reason: String },
}

/// Parses arc log text (blank lines are skipped).
pub fn parse_arc_log(text: &str) -> Result<Vec<ArcLogEntry>, ArcLogError> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ArcLogError::Malformed { line: index + 1, reason };
        let fields: Vec<&str> = line.splitn(5, '\t').collect();
        if fields.len() < 4 {
            return Err(bad(format!("expected at least 4 tab-separated fields: {line:?}")));
        }
        let time_ns = fields[0].parse().map_err(|_| bad(format!("bad time {:?}", fields[0])))?;
        let state =
            |name: &str| State::from_kernel_name(name).ok_or_else(|| bad(format!("unknown state {name:?}")));
        let from = state(fields[2])?;
        let event = match (fields[3], fields.get(4)) {
            ("RESET", None) => ArcEvent::Reset,
            ("FAULT", Some(what)) => ArcEvent::Fault(what.to_string()),
            (to, None) => ArcEvent::Arc(state(to)?),
            _ => return Err(bad(format!("unexpected fields: {line:?}"))),
        };
        entries.push(ArcLogEntry { time_ns, device: fields[1].to_string(), from, event });
    }
    Ok(entries)
}

/// Reads and parses an arc log file (possibly written by another process).
pub fn read_arc_log(path: &Path) -> Result<Vec<ArcLogEntry>, ArcLogError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ArcLogError::Io { path: path.to_path_buf(), source })?;
    parse_arc_log(&text)
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Lines kept in memory per device; the oldest are dropped beyond this (the file keeps all).
const KEPT: usize = 1 << 16;

#[derive(Debug)]
pub(crate) struct ArcLog {
    device: String,
    file: Option<Mutex<File>>,
    entries: Mutex<VecDeque<ArcLogEntry>>,
}

impl ArcLog {
    pub fn new(device: &str, path: Option<&Path>) -> std::io::Result<ArcLog> {
        let file = match path {
            Some(path) => Some(Mutex::new(OpenOptions::new().create(true).append(true).open(path)?)),
            None => None,
        };
        Ok(ArcLog { device: device.to_string(), file, entries: Mutex::new(VecDeque::new()) })
    }

    pub fn record(&self, from: State, event: ArcEvent) {
        let event = match event {
            ArcEvent::Fault(what) => ArcEvent::Fault(what.replace(['\t', '\n', '\r'], " ")),
            other => other,
        };
        let entry = ArcLogEntry { time_ns: monotonic_ns(), device: self.device.clone(), from, event };
        if let Some(file) = &self.file {
            let line = format!("{entry}\n");
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(err) = file.write_all(line.as_bytes()) {
                tracing::warn!(device = %self.device, %err, "cannot append to the arc log");
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() == KEPT {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    pub fn entries(&self) -> Vec<ArcLogEntry> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arcs.tsv");
        let a = ArcLog::new("nic0", Some(&path)).unwrap();
        let b = ArcLog::new("gpu0", Some(&path)).unwrap();
        a.record(State::Running, ArcEvent::Arc(State::RunningP2p));
        b.record(State::Stop, ArcEvent::Reset);
        a.record(State::Stop, ArcEvent::Fault("errno\tEIO\non arc".into()));
        let read = read_arc_log(&path).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].device, "nic0");
        assert_eq!(read[0].arc(), Some(fsm::Arc { from: State::Running, to: State::RunningP2p }));
        assert_eq!(read[1].event, ArcEvent::Reset);
        assert_eq!(read[1].from, State::Stop);
        assert_eq!(read[2].event, ArcEvent::Fault("errno EIO on arc".into()));
        assert!(read.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
        let mut memory = a.entries();
        memory.extend(b.entries());
        memory.sort_by_key(|e| e.time_ns);
        assert_eq!(memory, read);
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let err = parse_arc_log("1\tx\tRUNNING\tSTOP\n2\tx\tRUNNING\n").unwrap_err();
        assert!(matches!(err, ArcLogError::Malformed { line: 2, .. }), "{err}");
        assert!(parse_arc_log("1\tx\tRUNNING\tFLYING\n").is_err());
        assert!(parse_arc_log("t\tx\tRUNNING\tSTOP\n").is_err());
        assert_eq!(parse_arc_log("\n").unwrap(), vec![]);
    }
}
