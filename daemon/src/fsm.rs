//! The VFIO migration v2 state machine, exactly as the kernel walks it.
//!
//! A `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET names only a target; the driver walks
//! the kernel's `vfio_mig_get_next_state()` one arc at a time until it gets there. What
//! the daemon needs to know before it issues a SET is therefore which arcs will be walked
//! for the device's capability set, whether the request is refused, and whether the last
//! arc opens a transfer session (a new `data_fd`). This module answers those questions
//! without touching a device; the simulator walks the same paths, and the exhaustive test
//! compares every (capabilities, from, to) row against the table produced by compiling
//! the kernel's own function (`daemon/tests/data/kernel-fsm-paths.tsv`).
//!
//! One deliberate difference from kernels before the 2026 loop fix: a blocked arc
//! (STOP_COPY → PRE_COPY / PRE_COPY_P2P) is refused here with [`FsmError::Blocked`]
//! instead of spinning. The daemon never issues a request this module refuses, so it
//! never triggers that kernel soft lockup.

use std::fmt;

/// `enum vfio_device_mig_state` (the numeric values are the uAPI's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum State {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Error,
        State::Stop,
        State::Running,
        State::StopCopy,
        State::Resuming,
        State::RunningP2p,
        State::PreCopy,
        State::PreCopyP2p,
    ];

    /// The uAPI value written into `vfio_device_feature_mig_state.device_state`.
    pub const fn as_raw(self) -> u32 {
        self as u32
    }

    pub const fn from_raw(raw: u32) -> Option<State> {
        match raw {
            0 => Some(State::Error),
            1 => Some(State::Stop),
            2 => Some(State::Running),
            3 => Some(State::StopCopy),
            4 => Some(State::Resuming),
            5 => Some(State::RunningP2p),
            6 => Some(State::PreCopy),
            7 => Some(State::PreCopyP2p),
            _ => None,
        }
    }

    /// The kernel's spelling (`VFIO_DEVICE_STATE_<NAME>`), used in logs, the arc log and
    /// the API.
    pub const fn kernel_name(self) -> &'static str {
        match self {
            State::Error => "ERROR",
            State::Stop => "STOP",
            State::Running => "RUNNING",
            State::StopCopy => "STOP_COPY",
            State::Resuming => "RESUMING",
            State::RunningP2p => "RUNNING_P2P",
            State::PreCopy => "PRE_COPY",
            State::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    pub fn from_kernel_name(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.kernel_name() == name)
    }

    /// Capabilities a device must have for this state to exist on it
    /// (`state_flags_table` in the kernel). ERROR exists nowhere as a *requestable* state.
    const fn required_caps(self) -> Option<Caps> {
        match self {
            State::Error => None,
            State::Stop | State::Running | State::StopCopy | State::Resuming => Some(Caps::STOP_COPY),
            State::RunningP2p => Some(Caps(Caps::STOP_COPY.0 | Caps::P2P.0)),
            State::PreCopy => Some(Caps(Caps::STOP_COPY.0 | Caps::PRE_COPY.0)),
            State::PreCopyP2p => Some(Caps(Caps::STOP_COPY.0 | Caps::P2P.0 | Caps::PRE_COPY.0)),
        }
    }

    /// True where the device runs: its internal state may change, it may DMA to memory
    /// and it answers MMIO, so it may be the *target* of peer-to-peer DMA. The P2P states
    /// run too (`include/uapi/linux/vfio.h`: RUNNING_P2P only forbids *initiating* P2P
    /// DMA). These are the states a source and destination device must never share while
    /// both hold the VM's state.
    pub const fn is_running(self) -> bool {
        matches!(self, State::Running | State::PreCopy | State::RunningP2p | State::PreCopyP2p)
    }

    /// True where the device may initiate peer-to-peer DMA: RUNNING and PRE_COPY. A device
    /// in RUNNING_P2P / PRE_COPY_P2P has completed its outstanding P2P DMA and starts none
    /// (the P2P quiescing of a multi-device switchover).
    pub const fn may_initiate_p2p(self) -> bool {
        matches!(self, State::Running | State::PreCopy)
    }

    /// True inside the saving group, where one data_fd streams the device's state out.
    pub const fn is_saving(self) -> bool {
        matches!(self, State::PreCopy | State::PreCopyP2p | State::StopCopy)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// `vfio_device_feature_migration.flags`: what a device's driver implements.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Caps(u64);

impl Caps {
    pub const STOP_COPY: Caps = Caps(1 << 0);
    pub const P2P: Caps = Caps(1 << 1);
    pub const PRE_COPY: Caps = Caps(1 << 2);
    const KNOWN: u64 = 0b111;

    /// The four capability sets a migratable device can have (STOP_COPY is mandatory).
    pub const MIGRATABLE: [Caps; 4] = [Caps(1), Caps(1 | 2), Caps(1 | 4), Caps(1 | 2 | 4)];

    /// From the raw flags the kernel returns. Unknown bits (future capabilities) are kept
    /// out: the FSM must not believe in states it does not know.
    pub const fn from_bits(bits: u64) -> Caps {
        Caps(bits & Self::KNOWN)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }

    pub const fn is_migratable(self) -> bool {
        self.contains(Caps::STOP_COPY)
    }

    pub const fn has_p2p(self) -> bool {
        self.contains(Caps::P2P)
    }

    pub const fn has_pre_copy(self) -> bool {
        self.contains(Caps::PRE_COPY)
    }

    /// Whether `state` exists on a device with these capabilities.
    pub const fn supports(self, state: State) -> bool {
        match state.required_caps() {
            Some(req) => self.contains(req),
            None => false,
        }
    }

    /// Parses the spelling used by the kernel FSM table and the configuration:
    /// `STOP_COPY|P2P|PRE_COPY` (any order, `|` or `,` separated, case-insensitive).
    pub fn parse(text: &str) -> Option<Caps> {
        let mut caps = Caps::default();
        for word in text.split(['|', ',']).map(str::trim).filter(|w| !w.is_empty()) {
            caps = caps.union(match word.to_ascii_uppercase().as_str() {
                "STOP_COPY" => Caps::STOP_COPY,
                "P2P" => Caps::P2P,
                "PRE_COPY" => Caps::PRE_COPY,
                _ => return None,
            });
        }
        Some(caps)
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(Caps::STOP_COPY) {
            names.push("STOP_COPY");
        }
        if self.contains(Caps::P2P) {
            names.push("P2P");
        }
        if self.contains(Caps::PRE_COPY) {
            names.push("PRE_COPY");
        }
        if names.is_empty() { f.write_str("NONE") } else { f.write_str(&names.join("|")) }
    }
}

impl fmt::Debug for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Caps({self})")
    }
}

/// Why the kernel would refuse a SET (it answers EINVAL for all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsmError {
    #[error("the device is in {0}, which does not exist with capabilities {1}")]
    CurrentUnsupported(State, Caps),
    #[error("{0} cannot be requested on a device with capabilities {1}")]
    TargetUnsupported(State, Caps),
    #[error("the arc {from} -> {to} is blocked by the kernel (and hangs kernels before 7.2)")]
    Blocked { from: State, to: State },
}

/// What the last arc of a path does to the transfer session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    /// The arc opens a saving session: the SET returns a new read-only data_fd.
    OpensSaving,
    /// The arc opens a resuming session: the SET returns a new write-only data_fd.
    OpensResuming,
    /// No new data_fd (an open saving session, if any, continues or ends).
    None,
}

/// One arc the kernel walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arc {
    pub from: State,
    pub to: State,
}

impl Arc {
    /// The session effect of walking this single arc.
    pub const fn session(self) -> Session {
        match (self.from, self.to) {
            (State::Stop, State::StopCopy)
            | (State::Running, State::PreCopy)
            | (State::RunningP2p, State::PreCopyP2p) => Session::OpensSaving,
            (State::Stop, State::Resuming) => Session::OpensResuming,
            _ => Session::None,
        }
    }

    /// True when the arc closes a saving session the device had open (the data_fd is
    /// disabled: further reads return ENODEV).
    pub const fn ends_saving(self) -> bool {
        self.from.is_saving() && !self.to.is_saving()
    }
}

/// `vfio_from_fsm_table` from `drivers/vfio/vfio_main.c`: the next step from `cur` towards
/// `target` for a device with every capability. ERROR marks a blocked arc.
const fn raw_step(cur: State, target: State) -> State {
    use State::*;
    if matches!(cur, Error) || matches!(target, Error) {
        return Error;
    }
    if cur as u32 == target as u32 {
        return cur;
    }
    match cur {
        Stop => match target {
            StopCopy => StopCopy,
            Resuming => Resuming,
            _ => RunningP2p,
        },
        Running => match target {
            PreCopy => PreCopy,
            _ => RunningP2p,
        },
        PreCopy => match target {
            PreCopyP2p | StopCopy => PreCopyP2p,
            _ => Running,
        },
        PreCopyP2p => match target {
            PreCopy => PreCopy,
            StopCopy => StopCopy,
            _ => RunningP2p,
        },
        StopCopy => match target {
            PreCopy | PreCopyP2p => Error,
            _ => Stop,
        },
        Resuming => Stop,
        RunningP2p => match target {
            Running | PreCopy => Running,
            PreCopyP2p => PreCopyP2p,
            _ => Stop,
        },
        Error => Error,
    }
}

/// The single next arc the kernel takes from `cur` towards `target`
/// (`vfio_mig_get_next_state()`, with the 7.2 loop fix).
pub fn next_step(caps: Caps, cur: State, target: State) -> Result<State, FsmError> {
    if !caps.supports(cur) {
        return Err(FsmError::CurrentUnsupported(cur, caps));
    }
    if !caps.supports(target) {
        return Err(FsmError::TargetUnsupported(target, caps));
    }
    let mut next = raw_step(cur, target);
    // States this device lacks are skipped by stepping on from them; ERROR (a blocked
    // arc) is never supported, and the fixed kernel stops there instead of spinning.
    while next != State::Error && !caps.supports(next) {
        next = raw_step(next, target);
    }
    if next == State::Error {
        return Err(FsmError::Blocked { from: cur, to: target });
    }
    Ok(next)
}

/// Every arc one SET from `from` to `to` walks, in order (empty when `from == to`).
pub fn path(caps: Caps, from: State, to: State) -> Result<Vec<Arc>, FsmError> {
    if to == State::Error {
        return Err(FsmError::TargetUnsupported(to, caps));
    }
    let mut arcs = Vec::new();
    let mut cur = from;
    while cur != to {
        let next = next_step(caps, cur, to)?;
        arcs.push(Arc { from: cur, to: next });
        cur = next;
        // Every path in the kernel table is at most 4 arcs; anything longer is a bug here.
        assert!(arcs.len() <= State::ALL.len(), "FSM walk from {from} to {to} does not terminate");
    }
    Ok(arcs)
}

/// The session effect of a whole SET: only the last arc of a path can open a session
/// (drivers WARN and fail if one in the middle would).
pub fn session_of(arcs: &[Arc]) -> Session {
    arcs.last().map_or(Session::None, |arc| arc.session())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL_TABLE: &str = include_str!("../tests/data/kernel-fsm-paths.tsv");

    fn describe(result: &Result<Vec<Arc>, FsmError>, from: State, to: State) -> String {
        match result {
            Ok(arcs) if arcs.is_empty() && from == to => "-".to_string(),
            Ok(arcs) => arcs.iter().map(|a| a.to.kernel_name()).collect::<Vec<_>>().join(" "),
            Err(_) => "EINVAL".to_string(),
        }
    }

    /// Every one of the 256 rows the kernel's own code produced.
    #[test]
    fn every_kernel_row_matches() {
        let mut rows = 0;
        let mut failures = Vec::new();
        for (lineno, line) in KERNEL_TABLE.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 4, "malformed row {}: {line}", lineno + 1);
            let caps = Caps::parse(cols[0]).expect("capability column");
            let from = State::from_kernel_name(cols[1]).expect("from column");
            let to = State::from_kernel_name(cols[2]).expect("to column");
            let expected = if cols[3].starts_with("EINVAL") { "EINVAL" } else { cols[3] };
            let got = describe(&path(caps, from, to), from, to);
            if got != expected {
                failures.push(format!(
                    "row {} ({caps} {from} -> {to}): kernel walks `{expected}`, fsm.rs walks `{got}`",
                    lineno + 1
                ));
            }
            rows += 1;
        }
        assert_eq!(rows, 256, "the kernel table must have 4 capability sets x 8 x 8 rows");
        assert!(failures.is_empty(), "{} rows differ:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn sessions_open_only_on_the_documented_arcs() {
        let full = Caps::MIGRATABLE[3];
        let cases = [
            (State::Running, State::StopCopy, Session::OpensSaving),
            (State::RunningP2p, State::StopCopy, Session::OpensSaving),
            (State::Running, State::PreCopy, Session::OpensSaving),
            (State::RunningP2p, State::PreCopyP2p, Session::OpensSaving),
            (State::PreCopy, State::PreCopyP2p, Session::None),
            (State::PreCopyP2p, State::StopCopy, Session::None),
            (State::Running, State::Resuming, Session::OpensResuming),
            (State::Resuming, State::Stop, Session::None),
            (State::StopCopy, State::Stop, Session::None),
        ];
        for (from, to, expected) in cases {
            let arcs = path(full, from, to).unwrap();
            assert_eq!(session_of(&arcs), expected, "{from} -> {to}");
        }
        // Without PRE_COPY, PRE_COPY -> STOP_COPY cannot happen, and STOP_COPY needs a new fd.
        let hisi = Caps::MIGRATABLE[2];
        assert_eq!(session_of(&path(hisi, State::PreCopy, State::StopCopy).unwrap()), Session::None);
    }

    #[test]
    fn pre_copy_to_stop_abandons_the_saving_session() {
        let arcs = path(Caps::MIGRATABLE[3], State::PreCopy, State::Stop).unwrap();
        assert!(arcs[0].ends_saving(), "PRE_COPY -> RUNNING must end the saving session");
    }

    #[test]
    fn blocked_and_unsupported_requests_are_refused_by_kind() {
        let full = Caps::MIGRATABLE[3];
        assert_eq!(
            path(full, State::StopCopy, State::PreCopy),
            Err(FsmError::Blocked { from: State::StopCopy, to: State::PreCopy })
        );
        assert_eq!(
            path(Caps::STOP_COPY, State::Running, State::RunningP2p),
            Err(FsmError::TargetUnsupported(State::RunningP2p, Caps::STOP_COPY))
        );
        assert!(matches!(path(full, State::Error, State::Running), Err(FsmError::CurrentUnsupported(..))));
        assert!(path(full, State::Running, State::Error).is_err());
    }

    #[test]
    fn p2p_states_run_but_initiate_no_p2p_dma() {
        let running: Vec<State> = State::ALL.into_iter().filter(|s| s.is_running()).collect();
        assert_eq!(running, [State::Running, State::RunningP2p, State::PreCopy, State::PreCopyP2p]);
        let initiating: Vec<State> = State::ALL.into_iter().filter(|s| s.may_initiate_p2p()).collect();
        assert_eq!(initiating, [State::Running, State::PreCopy]);
    }

    #[test]
    fn raw_values_round_trip() {
        for state in State::ALL {
            assert_eq!(State::from_raw(state.as_raw()), Some(state));
            assert_eq!(State::from_kernel_name(state.kernel_name()), Some(state));
        }
        assert_eq!(State::from_raw(8), None);
        assert_eq!(Caps::from_bits(0xff).bits(), 0b111);
        assert_eq!(Caps::parse("stop_copy, p2p"), Some(Caps::MIGRATABLE[1]));
        assert_eq!(Caps::parse("STOP_COPY|BOGUS"), None);
        assert_eq!(Caps::MIGRATABLE[3].to_string(), "STOP_COPY|P2P|PRE_COPY");
    }
}
