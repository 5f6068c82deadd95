//! The group plan and the group sequencer, both pure (no I/O).
//!
//! [`plan_group`] decides up front, from the devices' capabilities only, how each device
//! of one VM will be moved. [`switchover`], [`resume`] and [`rollback`] turn each
//! device's capabilities and *current* state into the ordered [`Step`]s a driver executes
//! (`engine/source.rs`, `engine/destination.rs`): which devices move in parallel, to
//! which state, and what must be complete before the next step starts.
//!
//! # The P2P rules and why the steps are ordered as they are
//!
//! `include/uapi/linux/vfio.h` (`enum vfio_device_mig_state`): a device in RUNNING_P2P
//! or PRE_COPY_P2P keeps running and answering MMIO — it may still be the *target* of
//! peer-to-peer DMA — but must not *initiate* P2P DMA; a device in STOP or STOP_COPY must
//! not change its internal state at all, so a P2P write that reaches it is lost (or,
//! worse, changes state that is being serialised). Call a device in RUNNING or PRE_COPY an
//! *initiator* and a device in STOP, STOP_COPY, RESUMING or ERROR *closed*. The one
//! invariant every sequence keeps: **never an initiator while another device of the
//! group is closed**. Everything below follows from it.
//!
//! * Source switchover ([`switchover`]): every P2P device goes to RUNNING_P2P /
//!   PRE_COPY_P2P in parallel (no initiator is left but the devices without P2P, and every
//!   device still accepts their DMA); [`HoldPoint::BeforeStop`]; the device without P2P —
//!   which has no quiesced state: RUNNING → STOP is one arc — stops *alone*, and its SET
//!   returns before anything else moves (until then it may still write into the others);
//!   only then every device goes to STOP_COPY; [`Step::FinalDirtySync`];
//!   [`HoldPoint::AfterStop`]. A device without P2P that is in PRE_COPY goes straight to
//!   STOP_COPY (PRE_COPY → STOP would walk through RUNNING and end its saving session,
//!   `drivers/vfio/vfio_main.c`, `vfio_mig_get_next_state()`).
//! * Destination resume ([`resume`]), the mirror image: every P2P device STOP →
//!   RUNNING_P2P in parallel (they accept DMA but start none); then the device without
//!   P2P STOP → RUNNING (it may write into the others at once, and they accept it); only
//!   then the P2P devices → RUNNING (they may now write into it, and it runs). A device
//!   without P2P that resumed in parallel with the P2P devices' RUNNING could be written
//!   by one of them while still in STOP.
//! * Rollback ([`rollback`]) walks the same ladder upwards from wherever the failure left
//!   each device, towards each device's *recorded* starting state: P2P devices back to
//!   RUNNING_P2P (or their recorded STOP) first; then the devices without P2P; devices
//!   found in ERROR are reset (their state is lost); last, every P2P device to its
//!   recorded state. Every move is one SET whose arcs `fsm::path` (the kernel's
//!   `vfio_mig_get_next_state()`) walks.
//!
//! Two devices without P2P cannot be ordered against each other (whichever stops first
//! may be written by the other), so a group with two or more is refused unless the caller
//! vouches that they never do P2P DMA (QEMU refuses such multi-device migrations
//! outright); when allowed, they stop (and resume) together in one step.

use std::fmt;

use crate::fsm::{Caps, State};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    pub name: String,
    pub caps: Caps,
    /// MIG_DATA_SIZE: the STOP_COPY stream estimate.
    pub data_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOrder {
    /// Quiesced through RUNNING_P2P at the P2P barrier.
    P2pQuiesce,
    /// No P2P state: stopped in one arc, after every other device is quiesced.
    StopAfterBarrier,
}

impl StopOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            StopOrder::P2pQuiesce => "p2p-quiesce",
            StopOrder::StopAfterBarrier => "stop-after-barrier",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    pub name: String,
    pub caps: Caps,
    pub data_size: u64,
    pub stop_order: StopOrder,
    /// The device streams its initial state in PRE_COPY while the VM runs.
    pub pre_copy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    pub devices: Vec<DevicePlan>,
    /// The caller vouched that the group's devices without P2P never do P2P DMA.
    pub allow_multiple_non_p2p: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the group has no devices")]
    Empty,
    #[error("device `{0}` is not migratable (no STOP_COPY capability)")]
    NotMigratable(String),
    #[error(
        "devices {0:?} have no P2P capability and cannot be quiesced against each other; \
         allow it explicitly only if they never do peer-to-peer DMA"
    )]
    MultipleNonP2p(Vec<String>),
}

pub fn plan_group(
    devices: &[DeviceFacts],
    allow_multiple_non_p2p: bool,
    pre_copy_enabled: bool,
) -> Result<GroupPlan, PlanError> {
    if devices.is_empty() {
        return Err(PlanError::Empty);
    }
    if let Some(d) = devices.iter().find(|d| !d.caps.is_migratable()) {
        return Err(PlanError::NotMigratable(d.name.clone()));
    }
    let non_p2p: Vec<String> = devices.iter().filter(|d| !d.caps.has_p2p()).map(|d| d.name.clone()).collect();
    if non_p2p.len() > 1 && !allow_multiple_non_p2p {
        return Err(PlanError::MultipleNonP2p(non_p2p));
    }
    Ok(GroupPlan {
        allow_multiple_non_p2p,
        devices: devices
            .iter()
            .map(|d| DevicePlan {
                name: d.name.clone(),
                caps: d.caps,
                data_size: d.data_size,
                stop_order: if d.caps.has_p2p() {
                    StopOrder::P2pQuiesce
                } else {
                    StopOrder::StopAfterBarrier
                },
                pre_copy: pre_copy_enabled && d.caps.has_pre_copy(),
            })
            .collect(),
    })
}

impl GroupPlan {
    pub fn total_data_size(&self) -> u64 {
        self.devices.iter().map(|d| d.data_size).sum()
    }

    pub fn any_pre_copy(&self) -> bool {
        self.devices.iter().any(|d| d.pre_copy)
    }

    /// The switchover's steps ([`switchover`]) for this plan, made before the downtime
    /// starts from what the plan already knows: each device is in PRE_COPY if it
    /// pre-copies, else in RUNNING. Device indexes are positions in [`GroupPlan::devices`].
    pub fn switchover(&self) -> Result<Vec<Step>, SequenceError> {
        let members: Vec<Member> = self
            .devices
            .iter()
            .map(|d| Member::new(&d.name, d.caps, if d.pre_copy { State::PreCopy } else { State::Running }))
            .collect();
        switchover(&members, self.allow_multiple_non_p2p)
    }

    /// The phases this plan walks, for logs, the job and the dry-run API.
    pub fn steps(&self) -> Vec<String> {
        let names = |pred: &dyn Fn(&DevicePlan) -> bool| {
            self.devices.iter().filter(|d| pred(d)).map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
        };
        let mut steps =
            vec!["handshake: destination checks mapping and compatibility, devices -> RESUMING".into()];
        if self.any_pre_copy() {
            steps.push(format!(
                "pre-copy: {} -> PRE_COPY, initial data streamed while running",
                names(&|d| d.pre_copy)
            ));
        }
        let p2p = names(&|d| d.stop_order == StopOrder::P2pQuiesce);
        if !p2p.is_empty() {
            steps.push(format!("p2p barrier: {p2p} -> RUNNING_P2P / PRE_COPY_P2P in parallel"));
        }
        steps.push("hold before-stop: the control plane's go (the VMM pauses vCPUs)".into());
        let late = names(&|d| d.stop_order == StopOrder::StopAfterBarrier);
        if !late.is_empty() {
            steps.push(format!(
                "stop after barrier: {late} -> STOP alone, confirmed before any device leaves its P2P state (no P2P state)"
            ));
        }
        steps.push("stop-copy barrier: every device -> STOP_COPY".into());
        steps.push("drain: every data_fd read to EOF in parallel, framed and checksummed".into());
        steps.push("final dirty sync: the last dirty-page read while every device is stopped".into());
        steps.push("hold after-stop: the VMM sends the rest of the guest's RAM".into());
        steps.push("await loaded: destination verifies every stream, devices RESUMING -> STOP".into());
        steps.push("commit: decision journaled (fsync) on the source, then sent".into());
        if late.is_empty() {
            steps.push("resume: destination devices -> RUNNING_P2P (barrier) -> RUNNING".into());
        } else {
            steps.push(format!(
                "resume: destination P2P devices -> RUNNING_P2P (barrier), then {late} -> RUNNING, then the rest -> RUNNING"
            ));
        }
        steps.push("cleanup: source devices STOP_COPY -> STOP".into());
        steps
    }
}

impl fmt::Display for GroupPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{}[{}; {}{}; {} B]",
                    d.name,
                    d.caps,
                    d.stop_order.as_str(),
                    if d.pre_copy { "; pre-copy" } else { "" },
                    d.data_size
                )
            })
            .collect();
        f.write_str(&parts.join(" "))
    }
}

/// One device as the sequencer sees it: its capabilities and the state it is in now (or,
/// for a plan made ahead of time, the state it will be in when the plan starts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub caps: Caps,
    pub state: State,
}

impl Member {
    pub fn new(name: impl Into<String>, caps: Caps, state: State) -> Member {
        Member { name: name.into(), caps, state }
    }
}

/// Where the control plane may hold a switchover (issue #15 gives them a body; until then
/// the drivers execute them as no-ops, but they are in every plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldPoint {
    /// After the P2P barrier, before any device stops: the VMM pauses its vCPUs here.
    BeforeStop,
    /// After every device reached STOP_COPY and the final dirty sync: the VMM sends the
    /// rest of the guest's RAM here.
    AfterStop,
}

impl HoldPoint {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldPoint::BeforeStop => "before-stop",
            HoldPoint::AfterStop => "after-stop",
        }
    }
}

/// What a barrier is for: drivers map it to their job phase and error wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarrierKind {
    /// Source: every P2P device RUNNING → RUNNING_P2P, PRE_COPY → PRE_COPY_P2P.
    P2pQuiesce,
    /// Source: the device(s) without P2P RUNNING → STOP (PRE_COPY → STOP_COPY), confirmed
    /// before anything else moves.
    StopNonP2p,
    /// Source: every device → STOP_COPY.
    StopCopy,
    /// Destination: every P2P device STOP → RUNNING_P2P.
    ResumeP2p,
    /// Destination: the device(s) without P2P STOP → RUNNING.
    ResumeNonP2p,
    /// Destination: every P2P device RUNNING_P2P → RUNNING.
    Resume,
    /// Rollback: P2P devices back to RUNNING_P2P (or to a recorded STOP).
    RollbackP2p,
    /// Rollback: the device(s) without P2P back to their recorded state.
    RollbackNonP2p,
    /// Rollback: every P2P device to its recorded state.
    RollbackResume,
}

impl BarrierKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BarrierKind::P2pQuiesce => "p2p barrier",
            BarrierKind::StopNonP2p => "stop devices without p2p",
            BarrierKind::StopCopy => "stop-copy barrier",
            BarrierKind::ResumeP2p => "resume p2p barrier",
            BarrierKind::ResumeNonP2p => "resume devices without p2p",
            BarrierKind::Resume => "resume barrier",
            BarrierKind::RollbackP2p => "rollback p2p barrier",
            BarrierKind::RollbackNonP2p => "rollback devices without p2p",
            BarrierKind::RollbackResume => "rollback resume barrier",
        }
    }
}

/// One device's SET inside a barrier: `device` indexes the members the plan was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub device: usize,
    pub target: State,
}

/// One step of a group sequence. A step starts only after the previous one completed
/// for every device it named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Every move in parallel (one SET each); all must succeed before the next step.
    /// Never empty.
    Barrier { kind: BarrierKind, moves: Vec<Move> },
    /// `VFIO_DEVICE_RESET` each listed device (found in ERROR: its state is lost; the
    /// device comes back in RUNNING with its power-on state). Never empty.
    Reset { devices: Vec<usize> },
    /// A point where the control plane may hold the switchover (no-op until issue #15).
    Hold(HoldPoint),
    /// The last DMA-logging / HWPT read while every device is stopped (no-op until
    /// issue #15).
    FinalDirtySync,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Barrier { kind, moves } => {
                let moves: Vec<String> =
                    moves.iter().map(|m| format!("#{}->{}", m.device, m.target)).collect();
                write!(f, "{}: {}", kind.as_str(), moves.join(" "))
            }
            Step::Reset { devices } => write!(f, "reset {devices:?}"),
            Step::Hold(point) => write!(f, "hold {}", point.as_str()),
            Step::FinalDirtySync => f.write_str("final dirty sync"),
        }
    }
}

/// Why no sequence can be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error("the group has no devices")]
    Empty,
    #[error("device `{device}` is not migratable (capabilities {caps})")]
    NotMigratable { device: String, caps: Caps },
    #[error(
        "devices {0:?} have no P2P capability and cannot be quiesced against each other; \
         allow it explicitly only if they never do peer-to-peer DMA"
    )]
    MultipleNonP2p(Vec<String>),
    #[error("device `{device}` is in {state}, which does not exist with capabilities {caps}")]
    Unsupported { device: String, state: State, caps: Caps },
    #[error("device `{device}` is in {state}; a switchover starts from RUNNING or PRE_COPY")]
    NotSwitchable { device: String, state: State },
    #[error("device `{device}` is in {state}; only a loaded device (STOP) can be resumed")]
    NotResumable { device: String, state: State },
    #[error("device `{device}` was recorded in {state}; a rollback restores RUNNING, RUNNING_P2P or STOP")]
    NotRestorable { device: String, state: State },
    #[error("{got} recorded states for {expected} devices")]
    RecordedMismatch { expected: usize, got: usize },
}

/// True where a device may initiate P2P DMA (RUNNING, PRE_COPY).
pub const fn initiates_p2p(state: State) -> bool {
    state.may_initiate_p2p()
}

/// True where a P2P write into the device is lost or corrupts state being serialised:
/// every state but the four running ones.
pub const fn closed_to_p2p(state: State) -> bool {
    !state.is_running()
}

fn check_members(members: &[Member], allow_multiple_non_p2p: bool) -> Result<(), SequenceError> {
    if members.is_empty() {
        return Err(SequenceError::Empty);
    }
    for m in members {
        if !m.caps.is_migratable() {
            return Err(SequenceError::NotMigratable { device: m.name.clone(), caps: m.caps });
        }
        // ERROR exists on no device (it cannot be requested) but a device can be found in it.
        if m.state != State::Error && !m.caps.supports(m.state) {
            return Err(SequenceError::Unsupported { device: m.name.clone(), state: m.state, caps: m.caps });
        }
    }
    let non_p2p: Vec<String> = members.iter().filter(|m| !m.caps.has_p2p()).map(|m| m.name.clone()).collect();
    if non_p2p.len() > 1 && !allow_multiple_non_p2p {
        return Err(SequenceError::MultipleNonP2p(non_p2p));
    }
    Ok(())
}

fn push_barrier(steps: &mut Vec<Step>, kind: BarrierKind, moves: Vec<Move>) {
    if !moves.is_empty() {
        steps.push(Step::Barrier { kind, moves });
    }
}

/// The source's switchover, from each device's current state (RUNNING or PRE_COPY, or
/// already quiesced in RUNNING_P2P / PRE_COPY_P2P) to every device in STOP_COPY:
/// P2P barrier, hold before-stop, the device(s) without P2P stopped, STOP_COPY barrier,
/// final dirty sync, hold after-stop (see the module documentation for why).
pub fn switchover(members: &[Member], allow_multiple_non_p2p: bool) -> Result<Vec<Step>, SequenceError> {
    check_members(members, allow_multiple_non_p2p)?;
    for m in members {
        let switchable = match m.state {
            State::Running | State::PreCopy => true,
            State::RunningP2p | State::PreCopyP2p => m.caps.has_p2p(),
            _ => false,
        };
        if !switchable {
            return Err(SequenceError::NotSwitchable { device: m.name.clone(), state: m.state });
        }
    }
    let mut steps = Vec::new();
    let quiesce = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.caps.has_p2p())
        .filter_map(|(device, m)| match m.state {
            State::Running => Some(Move { device, target: State::RunningP2p }),
            State::PreCopy => Some(Move { device, target: State::PreCopyP2p }),
            _ => None,
        })
        .collect();
    push_barrier(&mut steps, BarrierKind::P2pQuiesce, quiesce);
    steps.push(Step::Hold(HoldPoint::BeforeStop));
    let stop_alone = members
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.caps.has_p2p())
        .map(|(device, m)| Move {
            device,
            // PRE_COPY -> STOP would walk through RUNNING and end the saving session.
            target: if m.state == State::PreCopy { State::StopCopy } else { State::Stop },
        })
        .collect();
    push_barrier(&mut steps, BarrierKind::StopNonP2p, stop_alone);
    let stop_copy = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.caps.has_p2p() || m.state != State::PreCopy)
        .map(|(device, _)| Move { device, target: State::StopCopy })
        .collect();
    push_barrier(&mut steps, BarrierKind::StopCopy, stop_copy);
    steps.push(Step::FinalDirtySync);
    steps.push(Step::Hold(HoldPoint::AfterStop));
    Ok(steps)
}

/// The destination's resume after Commit, every device loaded (STOP) to RUNNING: P2P
/// devices to RUNNING_P2P, then the device(s) without P2P to RUNNING, then the P2P devices
/// to RUNNING. A driver stops at the first failed step: if any P2P device fails STOP →
/// RUNNING_P2P, no device goes to RUNNING. A resume retried after such a failure starts
/// from where the devices are (STOP, RUNNING_P2P, or already RUNNING) and moves only those
/// not yet running.
pub fn resume(members: &[Member]) -> Result<Vec<Step>, SequenceError> {
    // The source refused a group it could not order; the destination moves what it got.
    check_members(members, true)?;
    if let Some(m) =
        members.iter().find(|m| !matches!(m.state, State::Stop | State::RunningP2p | State::Running))
    {
        return Err(SequenceError::NotResumable { device: m.name.clone(), state: m.state });
    }
    let mut steps = Vec::new();
    let pick = |p2p: bool, from: &[State], target: State| -> Vec<Move> {
        members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.caps.has_p2p() == p2p && from.contains(&m.state))
            .map(|(device, _)| Move { device, target })
            .collect()
    };
    push_barrier(&mut steps, BarrierKind::ResumeP2p, pick(true, &[State::Stop], State::RunningP2p));
    push_barrier(&mut steps, BarrierKind::ResumeNonP2p, pick(false, &[State::Stop], State::Running));
    push_barrier(
        &mut steps,
        BarrierKind::Resume,
        pick(true, &[State::Stop, State::RunningP2p], State::Running),
    );
    Ok(steps)
}

/// A rollback from wherever each device is now (`members[i].state`) to the state it was
/// recorded in when the job claimed it (`recorded[i]`: RUNNING, RUNNING_P2P or STOP).
///
/// Steps: (1) every P2P device that is not running back to RUNNING_P2P (or its recorded
/// STOP) — quiesced devices accept DMA and start none, so this can happen while the
/// devices without P2P are still stopped; (2) the device(s) without P2P to their recorded
/// state, after every P2P device accepts their DMA and before any P2P device may initiate
/// some; (3) devices found in ERROR are reset (back to RUNNING in their power-on state:
/// the VM's state in them is lost); (4) every P2P device to its recorded state. A device
/// already in its recorded state is not moved; one that is running (RUNNING, PRE_COPY)
/// moves only in (4), so a rollback never stops a running device to start it again. A
/// reset device comes back with bus mastering off (PCI function reset clears the command
/// register), so it starts no DMA until the VM's driver sets it up again.
pub fn rollback(members: &[Member], recorded: &[State]) -> Result<Vec<Step>, SequenceError> {
    check_members(members, true)?;
    if recorded.len() != members.len() {
        return Err(SequenceError::RecordedMismatch { expected: members.len(), got: recorded.len() });
    }
    for (m, &r) in members.iter().zip(recorded) {
        let restorable =
            matches!(r, State::Running | State::Stop) || (r == State::RunningP2p && m.caps.has_p2p());
        if !restorable {
            return Err(SequenceError::NotRestorable { device: m.name.clone(), state: r });
        }
    }
    let mut current: Vec<State> = members.iter().map(|m| m.state).collect();
    let mut steps = Vec::new();
    let p2p = |i: usize| members[i].caps.has_p2p();

    let mut quiesce = Vec::new();
    for (i, &state) in current.iter().enumerate() {
        // A running device that is to run again moves only at the end; one recorded
        // quiesced or stopped stops initiating now.
        if !p2p(i)
            || state == State::Error
            || state == recorded[i]
            || initiates_p2p(state) && initiates_p2p(recorded[i])
        {
            continue;
        }
        // A stopped device goes straight to a recorded STOP; anything open (or to be
        // resumed) waits in RUNNING_P2P, where it accepts DMA and starts none.
        let target =
            if recorded[i] == State::Stop && closed_to_p2p(state) { State::Stop } else { State::RunningP2p };
        if state != target {
            quiesce.push(Move { device: i, target });
        }
    }
    for m in &quiesce {
        current[m.device] = m.target;
    }
    push_barrier(&mut steps, BarrierKind::RollbackP2p, quiesce);

    let alone: Vec<Move> = (0..members.len())
        .filter(|&i| !p2p(i) && current[i] != State::Error && current[i] != recorded[i])
        .map(|i| Move { device: i, target: recorded[i] })
        .collect();
    for m in &alone {
        current[m.device] = m.target;
    }
    push_barrier(&mut steps, BarrierKind::RollbackNonP2p, alone);

    let broken: Vec<usize> = (0..members.len()).filter(|&i| current[i] == State::Error).collect();
    if !broken.is_empty() {
        for &i in &broken {
            current[i] = State::Running;
        }
        steps.push(Step::Reset { devices: broken });
    }

    let last: Vec<Move> = (0..members.len())
        .filter(|&i| current[i] != recorded[i])
        .map(|i| Move { device: i, target: recorded[i] })
        .collect();
    push_barrier(&mut steps, BarrierKind::RollbackResume, last);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str, caps: &str) -> DeviceFacts {
        DeviceFacts { name: name.into(), caps: Caps::parse(caps).unwrap(), data_size: 100 }
    }

    #[test]
    fn plans_by_capability() {
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, Result<&'a [(StopOrder, bool)], PlanError>);
        let cases: &[Case] = &[
            (&[("a", "STOP_COPY|P2P|PRE_COPY")], false, Ok(&[(StopOrder::P2pQuiesce, true)])),
            (
                &[("a", "STOP_COPY|P2P"), ("b", "STOP_COPY")],
                false,
                Ok(&[(StopOrder::P2pQuiesce, false), (StopOrder::StopAfterBarrier, false)]),
            ),
            (
                &[("a", "STOP_COPY|PRE_COPY"), ("b", "STOP_COPY")],
                false,
                Err(PlanError::MultipleNonP2p(vec!["a".into(), "b".into()])),
            ),
            (
                &[("a", "STOP_COPY|PRE_COPY"), ("b", "STOP_COPY")],
                true,
                Ok(&[(StopOrder::StopAfterBarrier, true), (StopOrder::StopAfterBarrier, false)]),
            ),
            (&[("a", "P2P")], false, Err(PlanError::NotMigratable("a".into()))),
            (&[], false, Err(PlanError::Empty)),
        ];
        for (devices, allow, expected) in cases {
            let facts: Vec<DeviceFacts> = devices.iter().map(|(n, c)| facts(n, c)).collect();
            let got = plan_group(&facts, *allow, true)
                .map(|p| p.devices.iter().map(|d| (d.stop_order, d.pre_copy)).collect::<Vec<_>>());
            assert_eq!(got, expected.clone().map(|e| e.to_vec()), "{devices:?} allow={allow}");
        }
    }

    #[test]
    fn pre_copy_can_be_disabled() {
        let plan = plan_group(&[facts("a", "STOP_COPY|P2P|PRE_COPY")], false, false).unwrap();
        assert!(!plan.any_pre_copy());
        assert!(!plan.steps().iter().any(|s| s.starts_with("pre-copy")));
    }

    #[test]
    fn a_plan_switches_over_from_the_states_it_leaves_devices_in() {
        let plan =
            plan_group(&[facts("nic", "STOP_COPY|P2P|PRE_COPY"), facts("acc", "STOP_COPY")], false, true)
                .unwrap();
        let steps = plan.switchover().unwrap();
        assert_eq!(
            steps[0],
            Step::Barrier {
                kind: BarrierKind::P2pQuiesce,
                moves: vec![Move { device: 0, target: State::PreCopyP2p }]
            }
        );
        assert_eq!(
            steps[2],
            Step::Barrier {
                kind: BarrierKind::StopNonP2p,
                moves: vec![Move { device: 1, target: State::Stop }]
            }
        );
    }

    #[test]
    fn steps_name_the_late_stopper() {
        let plan =
            plan_group(&[facts("gpu", "STOP_COPY|P2P"), facts("acc", "STOP_COPY")], false, true).unwrap();
        let steps = plan.steps();
        assert!(steps.iter().any(|s| s.contains("p2p barrier: gpu")));
        assert!(steps.iter().any(|s| s.contains("stop after barrier: acc")));
        assert_eq!(plan.total_data_size(), 200);
        assert!(plan.to_string().contains("acc[STOP_COPY; stop-after-barrier; 100 B]"));
    }

    // ---- The sequencer: every combination, every emitted step checked -------------------

    use crate::fsm;

    /// What executing a sequence did, for the ordering checks.
    struct Trace {
        /// States at the start of each step, and the step.
        before: Vec<(Vec<State>, Step)>,
        end: Vec<State>,
    }

    /// A device that may initiate P2P DMA in `state`: in a group with two or more devices
    /// without P2P the caller vouched that those never do P2P DMA.
    fn initiator(members: &[Member], i: usize, state: State) -> bool {
        let vouched = members.iter().filter(|m| !m.caps.has_p2p()).count() > 1 && !members[i].caps.has_p2p();
        initiates_p2p(state) && !vouched
    }

    /// Executes `steps` over the kernel FSM. A barrier's SETs run in parallel, so any
    /// state on one device's path can coincide with any state on another's: the invariant
    /// (never an initiator while another device is closed) must hold for every such pair,
    /// unless that pair was already so before the step (a failure left it; the step must
    /// not create it).
    fn execute(members: &[Member], steps: &[Step]) -> Result<Trace, String> {
        execute_checked(members, steps, true)
    }

    /// `check_p2p`: whether to check the P2P invariant (a rollback to a recorded set of
    /// states that itself breaks it cannot keep it). Devices found in ERROR hold no state
    /// worth protecting; reset devices start no DMA (bus mastering is off after reset).
    fn execute_checked(members: &[Member], steps: &[Step], check_p2p: bool) -> Result<Trace, String> {
        let mut states: Vec<State> = members.iter().map(|m| m.state).collect();
        let mut was_reset = vec![false; members.len()];
        let mut before = Vec::new();
        for step in steps {
            before.push((states.clone(), step.clone()));
            match step {
                Step::Barrier { kind, moves } => {
                    if moves.is_empty() {
                        return Err(format!("{kind:?}: empty barrier"));
                    }
                    let mut visited: Vec<Vec<State>> = states.iter().map(|&s| vec![s]).collect();
                    let mut seen = vec![false; members.len()];
                    for m in moves {
                        if std::mem::replace(&mut seen[m.device], true) {
                            return Err(format!("{kind:?}: device {} moved twice", m.device));
                        }
                        let caps = members[m.device].caps;
                        let arcs = fsm::path(caps, states[m.device], m.target)
                            .map_err(|e| format!("{kind:?}: device {} {}: {e}", m.device, caps))?;
                        if arcs.is_empty() {
                            return Err(format!("{kind:?}: device {} moved to where it is", m.device));
                        }
                        visited[m.device].extend(arcs.iter().map(|a| a.to));
                    }
                    let writes = |i: usize, s: State| !was_reset[i] && initiator(members, i, s);
                    // A reset device's state is power-on: nothing in it to lose either.
                    let loses = |j: usize, s: State| !was_reset[j] && closed_to_p2p(s) && s != State::Error;
                    for i in (0..members.len()).filter(|_| check_p2p) {
                        for j in (0..members.len()).filter(|&j| j != i) {
                            let inherited = writes(i, states[i]) && loses(j, states[j]);
                            let writer = visited[i].iter().find(|&&s| writes(i, s));
                            let victim = visited[j].iter().find(|&&s| loses(j, s));
                            if let (Some(w), Some(v)) = (writer, victim)
                                && !inherited
                            {
                                return Err(format!(
                                    "{kind:?}: device {i} may write P2P DMA in {w} while device {j} is in {v}"
                                ));
                            }
                        }
                    }
                    for m in moves {
                        states[m.device] = m.target;
                    }
                }
                Step::Reset { devices } => {
                    for &i in devices {
                        if states[i] != State::Error {
                            return Err(format!("reset of device {i} in {}", states[i]));
                        }
                        states[i] = State::Running;
                        was_reset[i] = true;
                    }
                }
                Step::Hold(_) | Step::FinalDirtySync => {}
            }
        }
        Ok(Trace { before, end: states })
    }

    fn all_p2p_quiesced(members: &[Member], states: &[State]) -> bool {
        members
            .iter()
            .zip(states)
            .all(|(m, s)| !m.caps.has_p2p() || matches!(s, State::RunningP2p | State::PreCopyP2p))
    }

    /// Every (caps, state) a device can be in, from `states`.
    fn configurations(states: &[State]) -> Vec<(Caps, State)> {
        Caps::MIGRATABLE
            .into_iter()
            .flat_map(|caps| states.iter().map(move |&s| (caps, s)))
            .filter(|(caps, s)| *s == State::Error || caps.supports(*s))
            .collect()
    }

    /// Every group of 1..=max devices over `configs` (as multisets: the sequencer treats
    /// devices by their facts, not by their position, and the checks are symmetric).
    fn groups<T: Clone>(configs: &[T], max: usize) -> Vec<Vec<T>> {
        fn extend<T: Clone>(
            configs: &[T],
            from: usize,
            left: usize,
            cur: &mut Vec<T>,
            out: &mut Vec<Vec<T>>,
        ) {
            if !cur.is_empty() {
                out.push(cur.clone());
            }
            if left == 0 {
                return;
            }
            for k in from..configs.len() {
                cur.push(configs[k].clone());
                extend(configs, k, left - 1, cur, out);
                cur.pop();
            }
        }
        let mut out = Vec::new();
        extend(configs, 0, max, &mut Vec::new(), &mut out);
        out
    }

    fn members_of(group: &[(Caps, State)]) -> Vec<Member> {
        group
            .iter()
            .enumerate()
            .map(|(i, &(caps, state))| Member::new(format!("d{i}"), caps, state))
            .collect()
    }

    fn non_p2p_count(members: &[Member]) -> usize {
        members.iter().filter(|m| !m.caps.has_p2p()).count()
    }

    #[test]
    fn switchover_keeps_the_p2p_rules_for_every_group_of_up_to_four() {
        let configs = configurations(&[State::Running, State::PreCopy, State::RunningP2p, State::PreCopyP2p]);
        let mut checked = 0;
        for group in groups(&configs, 4) {
            let members = members_of(&group);
            for allow in [false, true] {
                let plan = switchover(&members, allow);
                let quiesced_non_p2p = members.iter().any(|m| !m.caps.has_p2p() && !initiates_p2p(m.state));
                if non_p2p_count(&members) > 1 && !allow {
                    assert!(matches!(plan, Err(SequenceError::MultipleNonP2p(_))), "{members:?}");
                    continue;
                }
                if quiesced_non_p2p {
                    assert!(matches!(plan, Err(SequenceError::NotSwitchable { .. })), "{members:?}");
                    continue;
                }
                let steps = plan.unwrap_or_else(|e| panic!("{members:?}: {e}"));
                let trace =
                    execute(&members, &steps).unwrap_or_else(|e| panic!("{members:?} {steps:?}: {e}"));
                assert!(
                    trace.end.iter().all(|&s| s == State::StopCopy),
                    "{members:?}: ends in {:?}",
                    trace.end
                );
                let position =
                    |wanted: &Step| trace.before.iter().position(|(_, s)| s == wanted).expect("step");
                let before_stop = position(&Step::Hold(HoldPoint::BeforeStop));
                let sync = position(&Step::FinalDirtySync);
                let after_stop = position(&Step::Hold(HoldPoint::AfterStop));
                assert!(before_stop < sync && sync < after_stop && after_stop == steps.len() - 1);
                // At the hold before-stop every P2P device is quiesced and nothing stopped.
                let (at_hold, _) = &trace.before[before_stop];
                assert!(all_p2p_quiesced(&members, at_hold), "{members:?}: {at_hold:?}");
                assert!(at_hold.iter().all(|&s| !closed_to_p2p(s)), "{members:?}: stopped before the hold");
                // The final dirty sync sees every device stopped.
                assert!(trace.before[sync].0.iter().all(|&s| s == State::StopCopy));
                for (states, step) in &trace.before {
                    let Step::Barrier { kind, moves } = step else { continue };
                    // No device leaves RUNNING before all P2P devices are in *_P2P.
                    if *kind != BarrierKind::P2pQuiesce {
                        assert!(
                            all_p2p_quiesced(&members, states) || states.iter().any(|&s| closed_to_p2p(s))
                        );
                    }
                    // Devices without P2P are confirmed stopped before any P2P device moves on.
                    if moves.iter().any(|m| members[m.device].caps.has_p2p() && m.target == State::StopCopy) {
                        for (m, s) in members.iter().zip(states) {
                            assert!(
                                m.caps.has_p2p() || matches!(s, State::Stop | State::StopCopy),
                                "{members:?}: {} still in {s} at {kind:?}",
                                m.name
                            );
                        }
                    }
                    // The devices without P2P stop in a step of their own.
                    if *kind == BarrierKind::StopNonP2p {
                        assert!(moves.iter().all(|m| !members[m.device].caps.has_p2p()));
                    }
                    // A pre-copy session is never ended (that would throw away what was sent).
                    for m in moves {
                        let arcs = fsm::path(members[m.device].caps, states[m.device], m.target).unwrap();
                        assert!(!arcs.iter().any(|a| a.ends_saving()), "{members:?}: {:?} ends a session", m);
                    }
                }
                checked += 1;
            }
        }
        println!("switchover: {checked} groups checked");
        assert!(checked > 1_000, "only {checked} groups checked");
    }

    #[test]
    fn resume_keeps_the_p2p_rules_for_every_group_of_up_to_four() {
        let mut checked = 0;
        // STOP: loaded; RUNNING_P2P and RUNNING: a resume retried after a failed one.
        for group in groups(&configurations(&[State::Stop, State::RunningP2p, State::Running]), 4) {
            let members = members_of(&group);
            let steps = resume(&members).unwrap_or_else(|e| panic!("{members:?}: {e}"));
            let trace = execute(&members, &steps).unwrap_or_else(|e| panic!("{members:?} {steps:?}: {e}"));
            assert!(trace.end.iter().all(|&s| s == State::Running), "{members:?}: {:?}", trace.end);
            for (states, step) in &trace.before {
                let Step::Barrier { moves, .. } = step else { continue };
                if moves.iter().any(|m| m.target == State::Running) {
                    // No device reaches RUNNING before all P2P devices are in RUNNING_P2P.
                    assert!(
                        members.iter().zip(states).all(
                            |(m, s)| !m.caps.has_p2p() || matches!(s, State::RunningP2p | State::Running)
                        ),
                        "{members:?}: {states:?}"
                    );
                }
                if moves.iter().any(|m| m.target == State::Running && members[m.device].caps.has_p2p()) {
                    // No P2P device runs before every device accepts its DMA.
                    assert!(states.iter().all(|&s| !closed_to_p2p(s)), "{members:?}: {states:?}");
                }
            }
            checked += 1;
        }
        println!("resume: {checked} groups checked");
        assert_eq!(checked, 1_000, "every multiset of 1..=4 out of 10 (caps, state) pairs");
        let not_loaded = [Member::new("a", Caps::MIGRATABLE[1], State::Resuming)];
        assert!(matches!(resume(&not_loaded), Err(SequenceError::NotResumable { .. })));
    }

    fn rollback_cases(max: usize, recorded_choices: &[State]) -> usize {
        let configs: Vec<(Caps, State, State)> = configurations(&State::ALL)
            .into_iter()
            .flat_map(|(caps, s)| recorded_choices.iter().map(move |&r| (caps, s, r)))
            .collect();
        let mut checked = 0;
        for group in groups(&configs, max) {
            let members = members_of(&group.iter().map(|&(c, s, _)| (c, s)).collect::<Vec<_>>());
            let recorded: Vec<State> = group.iter().map(|&(_, _, r)| r).collect();
            let plan = rollback(&members, &recorded);
            if let Some((m, r)) =
                members.iter().zip(&recorded).find(|(m, r)| **r == State::RunningP2p && !m.caps.has_p2p())
            {
                assert!(matches!(plan, Err(SequenceError::NotRestorable { .. })), "{}: {r}", m.name);
                continue;
            }
            let steps = plan.unwrap_or_else(|e| panic!("{members:?} -> {recorded:?}: {e}"));
            let recorded_safe = (0..members.len()).all(|i| {
                !initiator(&members, i, recorded[i])
                    || (0..members.len()).all(|j| j == i || !closed_to_p2p(recorded[j]))
            });
            let trace = execute_checked(&members, &steps, recorded_safe)
                .unwrap_or_else(|e| panic!("{members:?} -> {recorded:?} {steps:?}: {e}"));
            assert_eq!(trace.end, recorded, "{members:?}: {steps:?}");
            // A device already where it belongs is never touched.
            for (i, m) in members.iter().enumerate().filter(|(i, m)| m.state == recorded[*i]) {
                assert!(
                    !steps.iter().any(
                        |s| matches!(s, Step::Barrier { moves, .. } if moves.iter().any(|mv| mv.device == i))
                    ),
                    "{} moved although already in {}",
                    m.name,
                    m.state
                );
            }
            // P2P devices are all accepting before a device without P2P resumes.
            for (states, step) in &trace.before {
                let Step::Barrier { kind: BarrierKind::RollbackNonP2p, moves } = step else { continue };
                if moves.iter().any(|m| initiates_p2p(m.target)) {
                    for (i, (m, s)) in members.iter().zip(states).enumerate() {
                        let accepting =
                            !closed_to_p2p(*s) || *s == State::Error || recorded[i] == State::Stop;
                        assert!(
                            !m.caps.has_p2p() || accepting,
                            "{members:?} -> {recorded:?}: {} in {s} when a device without P2P resumed",
                            m.name
                        );
                    }
                }
            }
            checked += 1;
        }
        checked
    }

    #[test]
    fn rollback_restores_every_recorded_state_along_legal_arcs_for_groups_up_to_three() {
        let checked = rollback_cases(3, &[State::Running, State::RunningP2p, State::Stop]);
        println!("rollback: {checked} groups of up to three checked");
        assert!(checked > 40_000, "{checked}");
    }

    #[test]
    fn rollback_to_running_keeps_the_p2p_rules_for_groups_of_four() {
        let checked = rollback_cases(4, &[State::Running]);
        println!("rollback to RUNNING: {checked} groups of up to four checked");
        assert!(checked > 20_000, "{checked}");
    }

    /// The checker catches what main did: the device without P2P sent to STOP_COPY in
    /// the same barrier as the quiesced devices (case 5), and a destination that resumed
    /// it in parallel with the P2P devices' RUNNING.
    #[test]
    fn the_checker_refuses_the_unordered_sequences_of_case_5() {
        let members = [
            Member::new("gpu", Caps::MIGRATABLE[1], State::Running),
            Member::new("acc", Caps::STOP_COPY, State::Running),
        ];
        let unordered = [
            Step::Barrier {
                kind: BarrierKind::P2pQuiesce,
                moves: vec![Move { device: 0, target: State::RunningP2p }],
            },
            Step::Barrier {
                kind: BarrierKind::StopCopy,
                moves: vec![
                    Move { device: 0, target: State::StopCopy },
                    Move { device: 1, target: State::StopCopy },
                ],
            },
        ];
        let error = execute(&members, &unordered).err().expect("the checker must refuse it");
        assert!(error.contains("device 1 may write P2P DMA in RUNNING while device 0 is in STOP"), "{error}");
        let ordered = switchover(&members, false).unwrap();
        assert!(execute(&members, &ordered).is_ok());

        let loaded = [
            Member::new("gpu", Caps::MIGRATABLE[1], State::Stop),
            Member::new("acc", Caps::STOP_COPY, State::Stop),
        ];
        let unordered = [
            Step::Barrier {
                kind: BarrierKind::ResumeP2p,
                moves: vec![Move { device: 0, target: State::RunningP2p }],
            },
            Step::Barrier {
                kind: BarrierKind::Resume,
                moves: vec![
                    Move { device: 0, target: State::Running },
                    Move { device: 1, target: State::Running },
                ],
            },
        ];
        assert!(execute(&loaded, &unordered).is_err());
        assert!(execute(&loaded, &resume(&loaded).unwrap()).is_ok());
    }

    #[test]
    fn a_mixed_group_switches_over_in_the_documented_order() {
        let members = [
            Member::new("nic", Caps::MIGRATABLE[3], State::PreCopy),
            Member::new("gpu", Caps::MIGRATABLE[1], State::Running),
            Member::new("acc", Caps::MIGRATABLE[2], State::PreCopy),
        ];
        let steps: Vec<String> =
            switchover(&members, false).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(
            steps,
            [
                "p2p barrier: #0->PRE_COPY_P2P #1->RUNNING_P2P",
                "hold before-stop",
                "stop devices without p2p: #2->STOP_COPY",
                "stop-copy barrier: #0->STOP_COPY #1->STOP_COPY",
                "final dirty sync",
                "hold after-stop",
            ]
        );
        let rollback_steps: Vec<String> = rollback(
            &[
                Member::new("nic", Caps::MIGRATABLE[3], State::StopCopy),
                Member::new("gpu", Caps::MIGRATABLE[1], State::Error),
                Member::new("acc", Caps::MIGRATABLE[2], State::Stop),
            ],
            &[State::Running; 3],
        )
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            rollback_steps,
            [
                "rollback p2p barrier: #0->RUNNING_P2P",
                "rollback devices without p2p: #2->RUNNING",
                "reset [1]",
                "rollback resume barrier: #0->RUNNING",
            ]
        );
    }
}
