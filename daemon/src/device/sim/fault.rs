//! Fault injection: what can go wrong in a simulated device, and when.
//!
//! A [`Fault`] is an action plus a trigger. Each fault counts its *opportunities* — the
//! calls of its operation, the arcs a SET walks, or the saving sessions opened — that
//! pass its state filter, and fires on every one of them, only on the `nth`, and/or only
//! `once`. Faults come from the configuration (`[[device.faults]]`) or at run time from
//! [`super::SimDevice::inject`]. Faults on the HWPT operations live on the devices
//! attached to the HWPT; their state filter is the device's state.

use std::fmt;
use std::time::Duration;

use nix::errno::Errno;
use serde::Deserialize;

use crate::device::Op;
use crate::fsm::{Arc, State};

/// Operations a fault can be attached to (`op = "..."` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultOp {
    /// `VFIO_DEVICE_FEATURE_MIGRATION` GET ([`crate::device::MigrationDevice::caps`]).
    ProbeMigration,
    GetState,
    /// Every arc a SET walks is one opportunity; `state` matches the arc's end.
    SetState,
    DataSize,
    PrecopyInfo,
    ProbeDmaLogging,
    DmaLoggingStart,
    DmaLoggingStop,
    DmaLoggingReport,
    Reset,
    /// A read of a saving data_fd.
    DataRead,
    /// A write to a resuming data_fd.
    DataWrite,
    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` on the device's HWPT (whichever device's handle
    /// issues it: every device attached to the HWPT sees the opportunity).
    HwptSetDirtyTracking,
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` on the device's HWPT, likewise.
    HwptGetDirtyBitmap,
}

impl FaultOp {
    /// The uAPI operation named in the resulting error.
    pub fn op(self, set_target: State) -> Op {
        match self {
            FaultOp::ProbeMigration => Op::ProbeMigration,
            FaultOp::GetState => Op::GetState,
            FaultOp::SetState => Op::SetState(set_target),
            FaultOp::DataSize => Op::DataSize,
            FaultOp::PrecopyInfo => Op::PrecopyInfo,
            FaultOp::ProbeDmaLogging => Op::ProbeDmaLogging,
            FaultOp::DmaLoggingStart => Op::DmaLoggingStart,
            FaultOp::DmaLoggingStop => Op::DmaLoggingStop,
            FaultOp::DmaLoggingReport => Op::DmaLoggingReport,
            FaultOp::Reset => Op::Reset,
            FaultOp::DataRead => Op::DataRead,
            FaultOp::DataWrite => Op::DataWrite,
            FaultOp::HwptSetDirtyTracking => Op::IommufdSetDirtyTracking,
            FaultOp::HwptGetDirtyBitmap => Op::IommufdGetDirtyBitmap,
        }
    }
}

/// What goes wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// The operation fails with `errno` and has no effect. On SET, the arc is not
    /// walked: the device stays where the walk had got to.
    Errno { op: FaultOp, errno: Errno },
    /// The operation waits, then proceeds (a SET sleeps holding the device lock, as a
    /// driver holds its state mutex during a slow firmware command).
    Stall { op: FaultOp, duration: Duration },
    /// The arc falls into ERROR: every session is disabled and the SET returns EIO.
    FallIntoError,
    /// Reads of the saving session's data_fd return at most `max_bytes` each.
    ShortReads { max_bytes: usize },
    /// The saving session's stream ends (read returns 0) after `after_bytes` bytes.
    EarlyEof { after_bytes: u64 },
    /// Byte `offset` of the saving session's stream is inverted after the device
    /// computed its digests, so only the destination's own checks can catch it.
    Corrupt { offset: u64 },
}

/// A fault and its trigger.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "FaultSpec")]
pub struct Fault {
    pub action: FaultAction,
    /// Only when the device is in this state (operations), the arc enters it (SET), or
    /// the saving session opens in it (session faults).
    pub state: Option<State>,
    /// Only the nth matching opportunity (1-based).
    pub nth: Option<u64>,
    /// Fire at most once.
    pub once: bool,
}

impl Fault {
    fn new(action: FaultAction) -> Fault {
        Fault { action, state: None, nth: None, once: false }
    }

    pub fn errno(op: FaultOp, errno: Errno) -> Fault {
        Fault::new(FaultAction::Errno { op, errno })
    }

    pub fn stall(op: FaultOp, duration: Duration) -> Fault {
        Fault::new(FaultAction::Stall { op, duration })
    }

    pub fn fall_into_error() -> Fault {
        Fault::new(FaultAction::FallIntoError)
    }

    pub fn short_reads(max_bytes: usize) -> Fault {
        Fault::new(FaultAction::ShortReads { max_bytes: max_bytes.max(1) })
    }

    pub fn early_eof(after_bytes: u64) -> Fault {
        Fault::new(FaultAction::EarlyEof { after_bytes })
    }

    pub fn corrupt(offset: u64) -> Fault {
        Fault::new(FaultAction::Corrupt { offset })
    }

    pub fn in_state(mut self, state: State) -> Fault {
        self.state = Some(state);
        self
    }

    pub fn nth(mut self, n: u64) -> Fault {
        self.nth = Some(n);
        self
    }

    pub fn once(mut self) -> Fault {
        self.once = true;
        self
    }

    fn opportunity(&self) -> Opportunity {
        match self.action {
            FaultAction::Errno { op: FaultOp::SetState, .. }
            | FaultAction::Stall { op: FaultOp::SetState, .. }
            | FaultAction::FallIntoError => Opportunity::Arc,
            FaultAction::Errno { op, .. } | FaultAction::Stall { op, .. } => Opportunity::Op(op),
            FaultAction::ShortReads { .. } | FaultAction::EarlyEof { .. } | FaultAction::Corrupt { .. } => {
                Opportunity::SaveSession
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            FaultAction::Errno { op, errno } => write!(f, "errno {errno} on {op:?}")?,
            FaultAction::Stall { op, duration } => write!(f, "stall {} ms on {op:?}", duration.as_millis())?,
            FaultAction::FallIntoError => f.write_str("fall into ERROR")?,
            FaultAction::ShortReads { max_bytes } => write!(f, "short reads of {max_bytes} bytes")?,
            FaultAction::EarlyEof { after_bytes } => write!(f, "early EOF after {after_bytes} bytes")?,
            FaultAction::Corrupt { offset } => write!(f, "corrupt stream byte {offset}")?,
        }
        if let Some(state) = self.state {
            write!(f, " in {state}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opportunity {
    Op(FaultOp),
    Arc,
    SaveSession,
}

/// The configuration spelling of a fault (one flat table, validated into a [`Fault`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    kind: FaultKind,
    #[serde(default)]
    op: Option<FaultOp>,
    #[serde(default, deserialize_with = "super::spec::de_opt_state")]
    state: Option<State>,
    #[serde(default, deserialize_with = "de_opt_errno")]
    errno: Option<Errno>,
    #[serde(default)]
    ms: Option<u64>,
    #[serde(default, deserialize_with = "super::spec::de_opt_byte_size")]
    bytes: Option<u64>,
    #[serde(default)]
    nth: Option<u64>,
    #[serde(default)]
    once: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FaultKind {
    Errno,
    Stall,
    FallIntoError,
    ShortReads,
    EarlyEof,
    Corrupt,
}

impl TryFrom<FaultSpec> for Fault {
    type Error = String;

    fn try_from(spec: FaultSpec) -> Result<Fault, String> {
        let unused = |name: &str, present: bool| {
            if present { Err(format!("fault kind {:?} takes no `{name}`", spec.kind)) } else { Ok(()) }
        };
        let action = match spec.kind {
            FaultKind::Errno => {
                unused("ms", spec.ms.is_some())?;
                unused("bytes", spec.bytes.is_some())?;
                FaultAction::Errno {
                    op: spec.op.ok_or("an errno fault needs `op`")?,
                    errno: spec.errno.ok_or("an errno fault needs `errno`")?,
                }
            }
            FaultKind::Stall => {
                unused("errno", spec.errno.is_some())?;
                unused("bytes", spec.bytes.is_some())?;
                FaultAction::Stall {
                    op: spec.op.ok_or("a stall fault needs `op`")?,
                    duration: Duration::from_millis(spec.ms.ok_or("a stall fault needs `ms`")?),
                }
            }
            FaultKind::FallIntoError => {
                if spec.op.is_some_and(|op| op != FaultOp::SetState) {
                    return Err("fall_into_error only happens on set_state".into());
                }
                unused("errno", spec.errno.is_some())?;
                unused("ms", spec.ms.is_some())?;
                unused("bytes", spec.bytes.is_some())?;
                FaultAction::FallIntoError
            }
            kind @ (FaultKind::ShortReads | FaultKind::EarlyEof | FaultKind::Corrupt) => {
                unused("op", spec.op.is_some())?;
                unused("errno", spec.errno.is_some())?;
                unused("ms", spec.ms.is_some())?;
                let bytes = spec.bytes.ok_or_else(|| format!("fault kind {kind:?} needs `bytes`"))?;
                match kind {
                    FaultKind::ShortReads if bytes == 0 => return Err("short_reads needs bytes >= 1".into()),
                    FaultKind::ShortReads => FaultAction::ShortReads { max_bytes: bytes as usize },
                    FaultKind::EarlyEof => FaultAction::EarlyEof { after_bytes: bytes },
                    _ => FaultAction::Corrupt { offset: bytes },
                }
            }
        };
        if spec.nth == Some(0) {
            return Err("`nth` counts from 1".into());
        }
        Ok(Fault { action, state: spec.state, nth: spec.nth, once: spec.once })
    }
}

/// Errno names accepted in the configuration (numbers are accepted too).
const ERRNO_NAMES: &[(&str, Errno)] = &[
    ("EPERM", Errno::EPERM),
    ("ENOENT", Errno::ENOENT),
    ("EINTR", Errno::EINTR),
    ("EIO", Errno::EIO),
    ("ENXIO", Errno::ENXIO),
    ("E2BIG", Errno::E2BIG),
    ("EBADF", Errno::EBADF),
    ("EAGAIN", Errno::EAGAIN),
    ("ENOMEM", Errno::ENOMEM),
    ("EACCES", Errno::EACCES),
    ("EFAULT", Errno::EFAULT),
    ("EBUSY", Errno::EBUSY),
    ("EEXIST", Errno::EEXIST),
    ("ENODEV", Errno::ENODEV),
    ("EINVAL", Errno::EINVAL),
    ("ENFILE", Errno::ENFILE),
    ("EMFILE", Errno::EMFILE),
    ("ENOTTY", Errno::ENOTTY),
    ("ENOSPC", Errno::ENOSPC),
    ("ESPIPE", Errno::ESPIPE),
    ("ENOMSG", Errno::ENOMSG),
    ("EOVERFLOW", Errno::EOVERFLOW),
    ("EOPNOTSUPP", Errno::EOPNOTSUPP),
    ("ENOTCONN", Errno::ENOTCONN),
    ("ETIMEDOUT", Errno::ETIMEDOUT),
];

/// Parses `EIO`, `eio` or `5`.
pub fn parse_errno(text: &str) -> Option<Errno> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i32>() {
        return (n > 0).then(|| Errno::from_raw(n));
    }
    ERRNO_NAMES.iter().find(|(name, _)| name.eq_ignore_ascii_case(text)).map(|&(_, e)| e)
}

fn de_opt_errno<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Errno>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Errno;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an errno name such as \"EIO\" or a positive number")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Errno, E> {
            parse_errno(v).ok_or_else(|| E::custom(format!("unknown errno {v:?}")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Errno, E> {
            i32::try_from(v)
                .ok()
                .filter(|&n| n > 0)
                .map(Errno::from_raw)
                .ok_or_else(|| E::custom("errno out of range"))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Errno, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(-1))
        }
    }
    de.deserialize_any(V).map(Some)
}

/// Stalls and an errno to apply to one opportunity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Fired {
    pub stall: Duration,
    pub errno: Option<Errno>,
    pub fall_into_error: bool,
    pub short_reads: Option<usize>,
    pub early_eof: Option<u64>,
    pub corrupt: Option<u64>,
    /// What fired, for the arc log.
    pub descriptions: Vec<String>,
}

impl Fired {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.descriptions.is_empty()
    }
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    seen: u64,
    fired: u64,
}

/// The faults of one device and their counters.
#[derive(Debug, Default)]
pub(crate) struct FaultTable {
    armed: Vec<Armed>,
}

impl FaultTable {
    pub fn new(faults: &[Fault]) -> FaultTable {
        let mut table = FaultTable::default();
        for fault in faults {
            table.inject(fault.clone());
        }
        table
    }

    pub fn inject(&mut self, fault: Fault) {
        self.armed.push(Armed { fault, seen: 0, fired: 0 });
    }

    pub fn clear(&mut self) {
        self.armed.clear();
    }

    /// A call of `op` while the device is in `state`.
    pub fn on_op(&mut self, op: FaultOp, state: State) -> Fired {
        self.fire(Opportunity::Op(op), state)
    }

    /// One arc of a SET.
    pub fn on_arc(&mut self, arc: Arc) -> Fired {
        self.fire(Opportunity::Arc, arc.to)
    }

    /// A saving session opening in `state`.
    pub fn on_save_session(&mut self, state: State) -> Fired {
        self.fire(Opportunity::SaveSession, state)
    }

    fn fire(&mut self, opportunity: Opportunity, state: State) -> Fired {
        let mut fired = Fired::default();
        for armed in &mut self.armed {
            if armed.fault.opportunity() != opportunity || armed.fault.state.is_some_and(|s| s != state) {
                continue;
            }
            armed.seen += 1;
            if armed.fault.nth.is_some_and(|n| n != armed.seen) || (armed.fault.once && armed.fired > 0) {
                continue;
            }
            armed.fired += 1;
            fired.descriptions.push(armed.fault.to_string());
            match armed.fault.action {
                FaultAction::Errno { errno, .. } => {
                    fired.errno.get_or_insert(errno);
                }
                FaultAction::Stall { duration, .. } => fired.stall += duration,
                FaultAction::FallIntoError => fired.fall_into_error = true,
                FaultAction::ShortReads { max_bytes } => fired.short_reads = Some(max_bytes),
                FaultAction::EarlyEof { after_bytes } => fired.early_eof = Some(after_bytes),
                FaultAction::Corrupt { offset } => fired.corrupt = Some(offset),
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_and_once_select_opportunities() {
        let mut table = FaultTable::new(&[
            Fault::errno(FaultOp::DataSize, Errno::EIO).nth(2),
            Fault::errno(FaultOp::Reset, Errno::EAGAIN).once(),
            Fault::errno(FaultOp::GetState, Errno::EBUSY).in_state(State::Stop),
        ]);
        let hits: Vec<_> = (0..4).map(|_| table.on_op(FaultOp::DataSize, State::Running).errno).collect();
        assert_eq!(hits, [None, Some(Errno::EIO), None, None]);
        let hits: Vec<_> = (0..3).map(|_| table.on_op(FaultOp::Reset, State::Running).errno).collect();
        assert_eq!(hits, [Some(Errno::EAGAIN), None, None]);
        assert_eq!(table.on_op(FaultOp::GetState, State::Running).errno, None);
        assert_eq!(table.on_op(FaultOp::GetState, State::Stop).errno, Some(Errno::EBUSY));
        assert_eq!(table.on_op(FaultOp::GetState, State::Stop).errno, Some(Errno::EBUSY));
    }

    #[test]
    fn set_faults_match_arcs_by_their_end() {
        let mut table =
            FaultTable::new(&[Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::StopCopy)]);
        let stop = Arc { from: State::Running, to: State::Stop };
        let copy = Arc { from: State::Stop, to: State::StopCopy };
        assert!(table.on_arc(stop).is_empty());
        assert_eq!(table.on_arc(copy).errno, Some(Errno::EIO));
        assert!(table.on_op(FaultOp::SetState, State::StopCopy).is_empty(), "SET faults are per arc");
    }

    #[test]
    fn errno_names_and_numbers_parse() {
        assert_eq!(parse_errno("EIO"), Some(Errno::EIO));
        assert_eq!(parse_errno("enomsg"), Some(Errno::ENOMSG));
        assert_eq!(parse_errno("22"), Some(Errno::EINVAL));
        assert_eq!(parse_errno("EWHATEVER"), None);
        assert_eq!(parse_errno("0"), None);
    }
}
