//! An explicit-state model check of the two commit machines (breadth-first, every
//! interleaving): one source device and one destination device stand for the group, a
//! network that loses, reorders and duplicates messages, a durable journal that a crash
//! keeps (a record whose directory sync failed is lost in a crash), crashes and restarts
//! of either daemon (memory lost; device state kept on the source, reset on reopen on
//! the destination unless it runs), timeouts, cancels, operator resolution on either
//! side at any time, strangers sending Commit, Abort and QueryJob, and a second job
//! started on the source after the first one ended.
//!
//! Checked in every reachable state:
//! - **never both**: the source device runs the VM's state while the destination's does;
//! - **rolled back means running**: a source job reported rolled back or cancelled has its
//!   device in its recorded state (RUNNING);
//! - **a failed job is safe to restart**: a control plane restarts a VM whose source job
//!   reports failed, rolled back or cancelled on the source, so the destination must not
//!   run it;
//!   and, in every state where nothing is in flight:
//! - **exactly one, after resolution**: with a reliable network, the operator's resolve on
//!   both sides brings the VM to run on exactly one side — unless the destination lost
//!   the job in a crash while the source holds a commit: then the source holds the state,
//!   stopped and in doubt (no rule can prove the destination never ran it).

use std::collections::{HashMap, VecDeque};

use super::source::{Delivery, JournalView};
use super::{
    Answer, DestinationAction, DestinationEvent, DestinationMachine, DestinationReply, Flaws, QueryReply,
    Sender, SourceAction, SourceEvent, SourceMachine,
};
use crate::engine::commit::Decision;
use crate::engine::protocol::destination::DestinationPhase;
use crate::job::JobStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum SrcDev {
    Running,
    StopCopy,
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum DstDev {
    /// Power-on state: no VM state.
    Blank,
    Resuming,
    /// STOP with the VM's state.
    Loaded,
    /// Runs the VM's state.
    Running,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Stage {
    /// The stop-copy barrier is next.
    Start,
    Barrier,
    Streaming,
    Over,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    // to the destination
    Commit(Sender),
    Abort(Sender),
    Answer(Option<Answer>),
    // to the source
    Loaded,
    CommitReply { ok: bool },
    Query(Sender),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Budget {
    src_crash: u8,
    dst_crash: u8,
    duplicate: u8,
    stranger: u8,
    journal_fault: u8,
    cancel: u8,
    second_job: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct World {
    src: SourceMachine,
    /// `None`: the destination restarted and lost the job.
    dst: Option<DestinationMachine>,
    src_dev: SrcDev,
    /// A SET issued by a barrier that has not returned yet.
    src_pending: Option<SrcDev>,
    migrated_away: bool,
    dst_dev: DstDev,
    stage: Stage,
    /// The record on disk and whether it survives a crash.
    journal: Option<(Decision, bool)>,
    /// The journal write in progress.
    writing: Option<Decision>,
    net: Vec<Msg>,
    budget: Budget,
}

const NET_CAP: usize = 3;

impl World {
    fn initial(flaws: Flaws) -> World {
        let mut src = SourceMachine::new();
        src.flaws = flaws;
        let mut dst = DestinationMachine::new();
        dst.flaws = flaws;
        dst.on(DestinationEvent::HandshakeAccepted);
        World {
            src,
            dst: Some(dst),
            src_dev: SrcDev::Running,
            src_pending: None,
            migrated_away: false,
            dst_dev: DstDev::Resuming,
            stage: Stage::Start,
            journal: None,
            writing: None,
            net: Vec::new(),
            budget: Budget {
                src_crash: 1,
                dst_crash: 1,
                duplicate: 1,
                stranger: 1,
                journal_fault: 1,
                cancel: 1,
                second_job: 1,
            },
        }
    }

    fn flaws(&self) -> Flaws {
        self.src.flaws
    }

    fn send(&mut self, msg: Msg) {
        if self.net.len() < NET_CAP {
            self.net.push(msg);
            self.net.sort();
        }
    }

    fn take(&mut self, i: usize) -> Msg {
        self.net.remove(i)
    }

    fn src_event(&mut self, event: SourceEvent) {
        let actions = self.src.on(event);
        self.src_actions(actions, None);
    }

    /// Performs the source's actions; a query's reply goes to `asker`.
    fn src_actions(&mut self, actions: Vec<SourceAction>, asker: Option<Sender>) {
        let mut follow = Vec::new();
        for action in actions {
            match action {
                SourceAction::StopTransfer => {
                    if self.stage != Stage::Over {
                        self.stage = Stage::Over;
                        follow.push(SourceEvent::TransferFailed { cancelled: false });
                    }
                }
                SourceAction::Journal(d) => self.writing = Some(d),
                SourceAction::MarkMigratedAway => self.migrated_away = true,
                SourceAction::SendCommit => self.send(Msg::Commit(Sender::JobPeer)),
                SourceAction::SendAbort => self.send(Msg::Abort(Sender::JobPeer)),
                SourceAction::Rollback => {
                    // The recorded state: RUNNING (rule S0 claims nothing else).
                    self.src_dev = SrcDev::Running;
                    follow.push(SourceEvent::RolledBack { ok: true });
                }
                SourceAction::Cleanup => self.src_dev = SrcDev::Stop,
                SourceAction::Reply(reply) => {
                    if asker == Some(Sender::JobPeer) {
                        match reply {
                            QueryReply::Answer(a) => self.send(Msg::Answer(Some(a))),
                            QueryReply::NotYet => self.send(Msg::Query(Sender::JobPeer)),
                            QueryReply::PermissionDenied | QueryReply::Unavailable => {
                                self.send(Msg::Answer(None))
                            }
                        }
                    }
                }
                SourceAction::RefuseCancel => {}
            }
        }
        for event in follow {
            self.src_event(event);
        }
    }

    fn dst_event(&mut self, event: DestinationEvent) -> Vec<DestinationReply> {
        let Some(dst) = self.dst.as_mut() else { return vec![] };
        let actions = dst.on(event);
        let mut replies = Vec::new();
        for action in actions {
            match action {
                DestinationAction::Resume => {
                    self.dst_dev = DstDev::Running;
                    self.dst_event(DestinationEvent::Resumed { ok: true });
                }
                DestinationAction::Reset => {
                    self.dst_dev = DstDev::Blank;
                    self.dst_event(DestinationEvent::ResetDone { ok: true });
                }
                DestinationAction::AskSource => self.send(Msg::Query(Sender::JobPeer)),
                DestinationAction::Reply(r) => replies.push(r),
                DestinationAction::RefuseCancel => {}
            }
        }
        replies
    }

    /// The final answer to a Commit or Abort (the driver waits out `Wait`).
    fn dst_request(&mut self, event: DestinationEvent) -> Option<DestinationReply> {
        self.dst.as_ref()?;
        let mut replies = self.dst_event(event);
        if replies.contains(&DestinationReply::Wait) {
            replies = self.dst_event(event);
        }
        replies.first().copied()
    }

    fn src_runs(&self) -> bool {
        self.src_dev == SrcDev::Running
    }

    fn dst_runs(&self) -> bool {
        self.dst_dev == DstDev::Running
    }

    /// Every successor with a label saying what happened.
    fn successors(&self) -> Vec<(String, World)> {
        let mut out = Vec::new();
        let mut push = |label: String, w: World| out.push((label, w));

        // The source's transfer.
        if self.src.transfer_active {
            match self.stage {
                Stage::Start => {
                    let mut w = self.clone();
                    w.stage = Stage::Barrier;
                    w.src_pending = Some(SrcDev::StopCopy);
                    w.src_event(SourceEvent::TransitionsStarted);
                    push("source: stop-copy barrier issues its SETs".into(), w);
                }
                Stage::Streaming => {
                    if self.dst.as_ref().is_some_and(|d| d.phase == DestinationPhase::Receiving) {
                        let mut w = self.clone();
                        w.stage = Stage::Over;
                        w.dst_dev = DstDev::Loaded;
                        w.dst_event(DestinationEvent::Loaded);
                        w.send(Msg::Loaded);
                        push("destination: streams verified, devices loaded".into(), w);
                    }
                }
                Stage::Barrier | Stage::Over => {}
            }
            let mut w = self.clone();
            w.stage = Stage::Over;
            w.src_event(SourceEvent::TransferFailed { cancelled: false });
            push("source: transfer fails (device, stream, timeout)".into(), w);
        }
        if let Some(target) = self.src_pending {
            let mut w = self.clone();
            w.src_dev = target;
            w.src_pending = None;
            if w.stage == Stage::Barrier {
                w.stage = Stage::Streaming;
            }
            w.src_event(SourceEvent::TransitionsSettled);
            push(format!("source: barrier SET lands ({target:?}), joined"), w);
        }
        if let Some(decision) = self.writing {
            let existing = self.journal.map(|(d, _)| d);
            let mut w = self.clone();
            w.writing = None;
            match existing {
                Some(e) if e != decision => {
                    let read_back = match e {
                        Decision::Commit => super::ReadBack::Commit,
                        Decision::Abort => super::ReadBack::Abort,
                    };
                    w.src_event(SourceEvent::JournalFailed { wrote: decision, read_back });
                    push(format!("journal: {decision:?} conflicts with {e:?}"), w);
                }
                _ => {
                    w.journal = Some((decision, true));
                    w.src_event(SourceEvent::Journaled(decision));
                    push(format!("journal: {decision:?} durable"), w);
                    if self.budget.journal_fault > 0 && existing.is_none() {
                        let mut w = self.clone();
                        w.writing = None;
                        w.budget.journal_fault -= 1;
                        w.src_event(SourceEvent::JournalFailed {
                            wrote: decision,
                            read_back: super::ReadBack::Nothing,
                        });
                        push(format!("journal: {decision:?} write fails, nothing written"), w);
                        for survives_a_crash in [false, true] {
                            let mut w = self.clone();
                            w.writing = None;
                            w.budget.journal_fault -= 1;
                            w.journal = Some((decision, survives_a_crash));
                            let read_back = match decision {
                                Decision::Commit => super::ReadBack::Commit,
                                Decision::Abort => super::ReadBack::Abort,
                            };
                            w.src_event(SourceEvent::JournalFailed { wrote: decision, read_back });
                            push(
                                format!(
                                    "journal: {decision:?} renamed in place, directory sync fails (record {} a crash)",
                                    if survives_a_crash { "survives" } else { "is lost in" }
                                ),
                                w,
                            );
                        }
                    }
                }
            }
        }
        if self.src.commit == Delivery::Sent {
            let mut w = self.clone();
            w.src_event(SourceEvent::CommitUnconfirmed);
            push("source: Commit times out".into(), w);
        }

        // The network.
        for (i, &msg) in self.net.iter().enumerate() {
            if i > 0 && self.net[i - 1] == msg {
                continue;
            }
            let mut lost = self.clone();
            lost.take(i);
            push(format!("network: {msg:?} lost"), lost);
            if self.budget.duplicate > 0 && self.net.len() < NET_CAP {
                let mut w = self.clone();
                w.budget.duplicate -= 1;
                w.send(msg);
                push(format!("network: {msg:?} duplicated"), w);
            }
            let mut w = self.clone();
            w.take(i);
            w.deliver(msg);
            push(format!("network: {msg:?} delivered"), w);
        }

        // The destination's clock, the operators, the control plane, strangers, crashes.
        if self.dst.as_ref().is_some_and(|d| d.phase == DestinationPhase::Receiving) {
            let mut w = self.clone();
            w.dst_event(DestinationEvent::ReceiveFailed);
            push("destination: receive fails or times out".into(), w);
        }
        if self.dst.as_ref().is_some_and(|d| d.holding() && !d.in_doubt) {
            let mut w = self.clone();
            w.dst_event(DestinationEvent::HoldExpired);
            push("destination: hold expires".into(), w);
        }
        // Operators resolve jobs that report in doubt.
        if self.src.status() == JobStatus::InDoubt {
            let mut w = self.clone();
            w.src_event(SourceEvent::ResolveAsked);
            if w != *self {
                push("operator: resolve on the source".into(), w);
            }
        }
        if self.dst.as_ref().is_some_and(|d| d.status() == JobStatus::InDoubt) {
            let mut w = self.clone();
            w.dst_event(DestinationEvent::ResolveAsked { decision: None });
            if w != *self {
                push("operator: resolve on the destination".into(), w);
            }
        }
        if self.budget.cancel > 0 {
            let mut w = self.clone();
            w.budget.cancel -= 1;
            w.src_event(SourceEvent::Cancel);
            push("control plane: cancel on the source".into(), w);
            let mut w = self.clone();
            w.budget.cancel -= 1;
            w.dst_event(DestinationEvent::Cancel);
            push("control plane: cancel on the destination".into(), w);
        }
        if self.budget.stranger > 0 {
            for msg in
                [Msg::Commit(Sender::Stranger), Msg::Abort(Sender::Stranger), Msg::Query(Sender::Stranger)]
            {
                let mut w = self.clone();
                w.budget.stranger -= 1;
                w.deliver(msg);
                push(format!("stranger: {msg:?}"), w);
            }
        }
        if self.budget.second_job > 0 && !matches!(self.src.status(), JobStatus::Running) {
            let mut w = self.clone();
            w.budget.second_job -= 1;
            let state = match w.src_dev {
                SrcDev::Running => crate::fsm::State::Running,
                SrcDev::StopCopy => crate::fsm::State::StopCopy,
                SrcDev::Stop => crate::fsm::State::Stop,
            };
            let away = w.migrated_away.then_some("first");
            let claimed = super::check_claim("dev", state, away).is_ok() || w.flaws().claim_any_state;
            if claimed {
                // The second job fails before its commit and rolls back: to its recorded
                // state, which the old engine took to be RUNNING whatever it was.
                w.src_dev = SrcDev::Running;
            }
            push(format!("control plane: second job on the source devices (claimed: {claimed})"), w);
        }
        if self.budget.src_crash > 0 {
            let mut w = self.clone();
            w.budget.src_crash -= 1;
            w.writing = None;
            w.journal = w.journal.filter(|(_, durable)| *durable);
            w.stage = Stage::Over;
            // A process dies only after its ioctls returned: the SET has landed.
            if let Some(target) = w.src_pending.take() {
                w.src_dev = target;
            }
            let flaws = w.flaws();
            let (mut src, actions) = SourceMachine::restarted(w.journal.map(|(d, _)| d));
            src.flaws = flaws;
            w.src = src;
            w.net.retain(|m| !matches!(m, Msg::Loaded | Msg::CommitReply { .. } | Msg::Query(_)));
            w.src_actions(actions, None);
            push("source daemon crashes and restarts".into(), w);
        }
        if self.budget.dst_crash > 0 && self.dst.is_some() {
            let mut w = self.clone();
            w.budget.dst_crash -= 1;
            w.dst = None;
            if w.dst_dev != DstDev::Running {
                // Reopening a VFIO device resets it: loaded state is lost.
                w.dst_dev = DstDev::Blank;
            }
            w.net.retain(|m| !matches!(m, Msg::Commit(_) | Msg::Abort(_) | Msg::Answer(_)));
            push("destination daemon crashes and restarts".into(), w);
        }
        out
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Commit(from) => {
                let reply = self.dst_request(DestinationEvent::CommitReceived { from });
                if from == Sender::JobPeer {
                    self.send(Msg::CommitReply { ok: reply == Some(DestinationReply::Done) });
                }
            }
            Msg::Abort(from) => {
                self.dst_request(DestinationEvent::AbortReceived { from });
            }
            Msg::Answer(answer) => {
                self.dst_event(DestinationEvent::SourceAnswered(answer));
            }
            Msg::Loaded => {
                if self.src.transfer_active {
                    self.src_event(SourceEvent::Loaded);
                }
            }
            Msg::CommitReply { ok } => {
                if self.src.commit == Delivery::Sent {
                    self.src_event(if ok {
                        SourceEvent::CommitAcked
                    } else {
                        SourceEvent::CommitUnconfirmed
                    });
                }
            }
            Msg::Query(from) => {
                let actions = self.src.on(SourceEvent::QueryAsked { from });
                self.src_actions(actions, Some(from));
            }
        }
    }

    fn invariant(&self) -> Result<(), String> {
        if self.src_runs() && self.dst_runs() {
            return Err("the VM's state runs on both hosts".into());
        }
        let status = self.src.status();
        if matches!(status, JobStatus::RolledBack | JobStatus::Cancelled) && !self.src_runs() {
            return Err(format!("the source job reports {status:?} but its device is {:?}", self.src_dev));
        }
        if matches!(status, JobStatus::Failed | JobStatus::RolledBack | JobStatus::Cancelled)
            && self.dst_runs()
        {
            return Err(format!(
                "the source job reports {status:?} (a control plane restarts the VM there) while the destination runs it"
            ));
        }
        Ok(())
    }

    fn quiet(&self) -> bool {
        self.net.is_empty() && self.writing.is_none() && self.src_pending.is_none()
    }

    /// Good conditions from here on: every message delivered, every write durable, the
    /// transfer timing out, the hold expiring, and the operator resolving both sides.
    fn settle(&self) -> Result<(), String> {
        let mut w = self.clone();
        for _ in 0..24 {
            if let Some(target) = w.src_pending.take() {
                w.src_dev = target;
                w.src_event(SourceEvent::TransitionsSettled);
            }
            if w.src.transfer_active {
                w.stage = Stage::Over;
                w.src_event(SourceEvent::TransferFailed { cancelled: false });
            }
            if let Some(decision) = w.writing.take() {
                match w.journal {
                    Some((e, _)) if e != decision => {
                        let read_back = match e {
                            Decision::Commit => super::ReadBack::Commit,
                            Decision::Abort => super::ReadBack::Abort,
                        };
                        w.src_event(SourceEvent::JournalFailed { wrote: decision, read_back });
                    }
                    _ => {
                        w.journal = Some((decision, true));
                        w.src_event(SourceEvent::Journaled(decision));
                    }
                }
            }
            // A query answered "not yet" is asked again: deliver what is in flight now,
            // then let the journal write land in the next round.
            for _ in 0..w.net.len() {
                let msg = w.take(0);
                w.deliver(msg);
                w.invariant()?;
            }
            if w.dst.as_ref().is_some_and(|d| d.phase == DestinationPhase::Receiving) {
                w.dst_event(DestinationEvent::ReceiveFailed);
            }
            if w.dst.as_ref().is_some_and(|d| d.holding() && !d.in_doubt) {
                w.dst_event(DestinationEvent::HoldExpired);
            }
            if w.src.commit == Delivery::Sent && w.net.is_empty() {
                w.src_event(SourceEvent::CommitUnconfirmed);
            }
            w.src_event(SourceEvent::ResolveAsked);
            w.dst_event(DestinationEvent::ResolveAsked { decision: None });
            w.invariant()?;
        }
        if w.src_runs() != w.dst_runs() {
            return Ok(());
        }
        let destination_lost_it = self.dst.is_none() || w.dst.is_none();
        let source_holds_commit = matches!(w.src.journal, JournalView::Durable(Decision::Commit))
            && w.src_dev != SrcDev::Running
            && matches!(w.src.status(), JobStatus::InDoubt | JobStatus::Running);
        if destination_lost_it && source_holds_commit {
            return Ok(());
        }
        Err(format!(
            "after resolution the VM runs on {} (source device {:?}, source {:?}, destination device {:?}, destination {:?})",
            if w.src_runs() { "both hosts" } else { "neither host" },
            w.src_dev,
            w.src.status(),
            w.dst_dev,
            w.dst.as_ref().map(|d| (d.phase, d.status())),
        ))
    }
}

/// What the check found: the states explored, and the first violation with its trace.
#[derive(Debug)]
pub(super) struct Outcome {
    pub states: usize,
    pub violation: Option<(String, Vec<String>)>,
}

pub(super) fn check(flaws: Flaws) -> Outcome {
    let initial = World::initial(flaws);
    let mut seen: HashMap<World, usize> = HashMap::new();
    let mut parents: Vec<(usize, String)> = vec![(usize::MAX, "start".into())];
    seen.insert(initial.clone(), 0);
    let mut queue = VecDeque::from([(initial, 0usize)]);
    let trace = |parents: &Vec<(usize, String)>, mut at: usize, last: String| {
        let mut steps = vec![last];
        while at != usize::MAX {
            let (parent, label) = &parents[at];
            steps.push(label.clone());
            at = *parent;
        }
        steps.reverse();
        steps
    };
    while let Some((world, index)) = queue.pop_front() {
        let verdict = world.invariant().and_then(|()| {
            if world.quiet() {
                world.settle().map_err(|why| {
                    format!("then, with a reliable network and both operators resolving: {why}")
                })
            } else {
                Ok(())
            }
        });
        if let Err(why) = verdict {
            return Outcome {
                states: seen.len(),
                violation: Some((why, trace(&parents, index, "(violation)".into()))),
            };
        }
        for (label, next) in world.successors() {
            if seen.contains_key(&next) {
                continue;
            }
            let id = parents.len();
            parents.push((index, label));
            seen.insert(next.clone(), id);
            queue.push_back((next, id));
        }
    }
    Outcome { states: seen.len(), violation: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect_violation(flaws: Flaws, case: &str) {
        let started = std::time::Instant::now();
        let outcome = check(flaws);
        let (why, trace) = outcome
            .violation
            .unwrap_or_else(|| panic!("{case}: the checker found no violation in {} states", outcome.states));
        println!("{case}: violation after {} states ({:?}): {why}", outcome.states, started.elapsed());
        for (i, step) in trace.iter().enumerate() {
            println!("  {i:2}. {step}");
        }
    }

    #[test]
    fn the_commit_protocol_never_runs_a_vm_twice_or_loses_it() {
        let started = std::time::Instant::now();
        let outcome = check(Flaws::default());
        println!("model check: {} states explored in {:?}", outcome.states, started.elapsed());
        if let Some((why, trace)) = &outcome.violation {
            panic!("{why}\n{}", trace.join("\n"));
        }
        assert!(outcome.states > 1000, "the model explored only {} states", outcome.states);
    }

    #[test]
    fn case1_claiming_a_device_that_migrated_away_is_caught() {
        expect_violation(Flaws { claim_any_state: true, ..Flaws::default() }, "case 1");
    }

    #[test]
    fn case2_rolling_back_after_a_failed_commit_write_is_caught() {
        expect_violation(Flaws { journal_failure_rolls_back: true, ..Flaws::default() }, "case 2");
    }

    #[test]
    fn case3_presumed_abort_that_is_not_durable_is_caught() {
        expect_violation(Flaws { presumed_abort_not_durable: true, ..Flaws::default() }, "case 3");
    }

    #[test]
    fn case4_obeying_a_stranger_after_loaded_is_caught() {
        expect_violation(Flaws { trust_any_peer: true, ..Flaws::default() }, "case 4");
    }

    #[test]
    fn case6_rolling_back_without_joining_the_barrier_is_caught() {
        expect_violation(Flaws { rollback_without_join: true, ..Flaws::default() }, "case 6");
    }

    #[test]
    fn case9_a_committed_job_reported_failed_is_caught() {
        expect_violation(Flaws { commit_error_fails_job: true, ..Flaws::default() }, "case 9");
    }
}
