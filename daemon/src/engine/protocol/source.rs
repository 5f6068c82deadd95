//! The source's half of the commit protocol (the coordinator). See [`super::super::commit`]
//! for the rules S1–S7 it implements.

use super::{Answer, ReadBack, Sender};
use crate::engine::commit::Decision;
use crate::job::JobStatus;

/// What the source's journal holds for the job, as far as this machine knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JournalView {
    Empty,
    Writing(Decision),
    Durable(Decision),
    /// A commit write failed but the record may be there (read back as commit, or the
    /// journal is unreadable): the source may never resume, and tells nobody "commit"
    /// until a rewrite succeeds (rule S4).
    MaybeCommit,
    /// The abort write failed and no commit is there: rolling back is safe (this
    /// machine never commits after deciding to abort), but no durable promise exists to
    /// answer a query with.
    AbortNotDurable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Delivery {
    NotSent,
    Sent,
    Acked,
    /// No answer, or an error answer: the destination may or may not run.
    Unconfirmed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rollback {
    NotStarted,
    Running,
    Done { ok: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceEvent {
    /// A device barrier started (its transitions run on blocking threads).
    TransitionsStarted,
    /// Every transition of the barrier returned (joined), whatever their results.
    TransitionsSettled,
    /// The destination reported every device loaded (the transfer is over).
    Loaded,
    /// The transfer stopped before "loaded": a device, stream, peer or timeout failure,
    /// or a cancel (`cancelled`).
    TransferFailed {
        cancelled: bool,
    },
    Journaled(Decision),
    JournalFailed {
        wrote: Decision,
        read_back: ReadBack,
    },
    /// The destination answered Commit: its devices run.
    CommitAcked,
    /// Commit got an error answer or none (link lost, timeout): the destination may run.
    CommitUnconfirmed,
    RolledBack {
        ok: bool,
    },
    /// CancelJob from the control API.
    Cancel,
    /// QueryJob from a peer.
    QueryAsked {
        from: Sender,
    },
    /// ResolveJob from the operator.
    ResolveAsked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueryReply {
    Answer(Answer),
    /// Not the job's destination: nothing was journaled.
    PermissionDenied,
    /// The decision is being written; ask again when the machine moves.
    NotYet,
    /// No durable answer can be given (the journal failed): the destination holds.
    Unavailable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceAction {
    /// Stop the transfer task (it reports `TransferFailed` once its work is dropped).
    StopTransfer,
    Journal(Decision),
    /// The devices' state belongs to the destination from now on: mark them so that
    /// no later job claims or resumes them.
    MarkMigratedAway,
    SendCommit,
    SendAbort,
    /// Every device back to the state recorded at claim, along legal arcs.
    Rollback,
    /// After the destination runs: STOP_COPY → STOP, release the claim.
    Cleanup,
    Reply(QueryReply),
    /// Refuse a cancel: the decision is past the point where cancelling can roll back.
    RefuseCancel,
}

/// One source job's commit protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceMachine {
    /// Before "loaded", and until the transfer task returned.
    pub transfer_active: bool,
    pub transitions_in_flight: bool,
    pub loaded: bool,
    pub journal: JournalView,
    pub want_abort: bool,
    pub cancelled: bool,
    pub commit: Delivery,
    pub rollback: Rollback,
    pub marked: bool,
    pub cleaned_up: bool,
    /// Rebuilt after a restart from a journal without a record: the job is unknown.
    pub forgotten: bool,
    #[cfg(test)]
    pub(crate) flaws: super::Flaws,
}

impl Default for SourceMachine {
    fn default() -> Self {
        SourceMachine::new()
    }
}

impl SourceMachine {
    /// A job whose devices were just claimed (each RUNNING, rule S0).
    pub fn new() -> SourceMachine {
        SourceMachine {
            transfer_active: true,
            transitions_in_flight: false,
            loaded: false,
            journal: JournalView::Empty,
            want_abort: false,
            cancelled: false,
            commit: Delivery::NotSent,
            rollback: Rollback::NotStarted,
            marked: false,
            cleaned_up: false,
            forgotten: false,
            #[cfg(test)]
            flaws: super::Flaws::default(),
        }
    }

    /// The machine of a daemon that restarted: memory is gone, the journal is not, and
    /// the devices still hold the state they held (stopped: nobody resumed them).
    pub fn restarted(record: Option<Decision>) -> (SourceMachine, Vec<SourceAction>) {
        let mut m = SourceMachine::new();
        m.transfer_active = false;
        m.loaded = true;
        match record {
            Some(Decision::Commit) => {
                m.journal = JournalView::Durable(Decision::Commit);
                m.commit = Delivery::Unconfirmed;
                m.marked = true;
            }
            Some(Decision::Abort) => {
                // The restarted daemon rolls the devices back (they were claimed
                // RUNNING, rule S0, so that is their recorded state).
                m.journal = JournalView::Durable(Decision::Abort);
                m.want_abort = true;
            }
            None => m.forgotten = true,
        }
        let mut actions = Vec::new();
        m.advance(&mut actions);
        (m, actions)
    }

    /// The devices may be (are being) rolled back: abort decided and no commit possible.
    pub fn rolling_back(&self) -> bool {
        self.rollback != Rollback::NotStarted
    }

    /// True once the machine may resume its devices no more: a commit is or may be on disk.
    pub fn commit_possible(&self) -> bool {
        matches!(
            self.journal,
            JournalView::Writing(Decision::Commit)
                | JournalView::Durable(Decision::Commit)
                | JournalView::MaybeCommit
        )
    }

    /// The status a control plane reads (rule S7): `succeeded` only when the destination
    /// confirmed it runs, `rolled back` only when the source runs in its recorded state,
    /// `in doubt` whenever a commit is or may be on disk and not confirmed.
    pub fn status(&self) -> JobStatus {
        #[cfg(test)]
        if self.flaws.commit_error_fails_job && self.commit == Delivery::Unconfirmed {
            return JobStatus::Failed;
        }
        if self.commit == Delivery::Acked {
            return JobStatus::Succeeded;
        }
        if self.commit_possible() {
            let delivering = matches!(self.commit, Delivery::NotSent | Delivery::Sent);
            return match self.journal {
                JournalView::Writing(_) => JobStatus::Running,
                JournalView::Durable(_) if delivering => JobStatus::Running,
                _ => JobStatus::InDoubt,
            };
        }
        match self.rollback {
            Rollback::Done { ok: true } if self.cancelled => JobStatus::Cancelled,
            Rollback::Done { ok: true } => JobStatus::RolledBack,
            Rollback::Done { ok: false } => JobStatus::Failed,
            _ if self.forgotten => JobStatus::InDoubt,
            _ => JobStatus::Running,
        }
    }

    pub fn on(&mut self, event: SourceEvent) -> Vec<SourceAction> {
        let mut actions = Vec::new();
        match event {
            SourceEvent::TransitionsStarted => self.transitions_in_flight = true,
            SourceEvent::TransitionsSettled => self.transitions_in_flight = false,
            SourceEvent::Loaded => {
                self.transfer_active = false;
                self.loaded = true;
            }
            SourceEvent::TransferFailed { cancelled } => {
                self.transfer_active = false;
                if !self.commit_possible() {
                    self.want_abort = true;
                    self.cancelled |= cancelled;
                }
            }
            SourceEvent::Journaled(decision) => self.journal = JournalView::Durable(decision),
            SourceEvent::JournalFailed { wrote, read_back } => self.journal_failed(wrote, read_back),
            SourceEvent::CommitAcked => self.commit = Delivery::Acked,
            SourceEvent::CommitUnconfirmed => {
                if self.commit != Delivery::Acked {
                    self.commit = Delivery::Unconfirmed;
                }
            }
            SourceEvent::RolledBack { ok } => self.rollback = Rollback::Done { ok },
            SourceEvent::Cancel => {
                // Rule S5: once a commit is or may be on disk, the journal decides.
                if self.commit_possible() {
                    return vec![SourceAction::RefuseCancel];
                }
                if !self.want_abort {
                    self.want_abort = true;
                    self.cancelled = true;
                    if self.transfer_active {
                        actions.push(SourceAction::StopTransfer);
                    }
                }
            }
            SourceEvent::QueryAsked { from } => return self.query(from),
            SourceEvent::ResolveAsked => self.resolve(),
        }
        self.advance(&mut actions);
        actions
    }

    fn journal_failed(&mut self, wrote: Decision, read_back: ReadBack) {
        #[cfg(test)]
        if self.flaws.journal_failure_rolls_back {
            self.journal = JournalView::AbortNotDurable;
            self.want_abort = true;
            return;
        }
        self.journal = match (wrote, read_back) {
            // Rule S4: a commit may be on disk; never resume.
            (_, ReadBack::Commit) | (Decision::Commit, ReadBack::Unreadable) => JournalView::MaybeCommit,
            (Decision::Commit, ReadBack::Nothing) => {
                // Nothing on disk: deciding abort instead is safe.
                self.want_abort = true;
                JournalView::Empty
            }
            (Decision::Abort, ReadBack::Abort) | (Decision::Commit, ReadBack::Abort) => {
                JournalView::Durable(Decision::Abort)
            }
            (Decision::Abort, ReadBack::Nothing | ReadBack::Unreadable) => JournalView::AbortNotDurable,
        };
    }

    fn query(&mut self, from: Sender) -> Vec<SourceAction> {
        if from == Sender::Stranger {
            return vec![SourceAction::Reply(QueryReply::PermissionDenied)];
        }
        if self.forgotten {
            return vec![SourceAction::Reply(QueryReply::Answer(Answer::Unknown))];
        }
        let mut actions = Vec::new();
        match self.journal {
            JournalView::Durable(Decision::Commit) => {
                actions.push(SourceAction::Reply(QueryReply::Answer(Answer::Commit)))
            }
            JournalView::Durable(Decision::Abort) => {
                actions.push(SourceAction::Reply(QueryReply::Answer(Answer::Abort)))
            }
            JournalView::Writing(_) => actions.push(SourceAction::Reply(QueryReply::NotYet)),
            JournalView::MaybeCommit => actions.push(SourceAction::Reply(QueryReply::Unavailable)),
            JournalView::Empty | JournalView::AbortNotDurable => {
                #[cfg(test)]
                if self.flaws.presumed_abort_not_durable {
                    return vec![SourceAction::Reply(QueryReply::Answer(Answer::Abort))];
                }
                // Rule S3: durable presumed abort. The answer waits for the record.
                self.want_abort = true;
                if self.transfer_active {
                    actions.push(SourceAction::StopTransfer);
                }
                self.journal = JournalView::Empty;
                self.advance(&mut actions);
                actions.push(SourceAction::Reply(QueryReply::NotYet));
            }
        }
        actions
    }

    fn resolve(&mut self) {
        if self.forgotten {
            // The operator asks a restarted source to settle a job it lost: no commit
            // is on disk, so abort is the only decision it may take.
            self.forgotten = false;
            self.want_abort = true;
            return;
        }
        match self.journal {
            // Rule S4: the commit may be on disk; writing it again makes it durable.
            JournalView::MaybeCommit => self.journal = JournalView::Empty,
            JournalView::Durable(Decision::Commit) if self.commit == Delivery::Unconfirmed => {
                self.commit = Delivery::NotSent;
            }
            _ => {}
        }
    }

    /// Whatever the machine's state now allows, in rule order.
    fn advance(&mut self, actions: &mut Vec<SourceAction>) {
        if self.forgotten {
            // Rule S3: a job this daemon does not know is never decided on its own.
            return;
        }
        match self.journal {
            JournalView::Durable(Decision::Commit) => {
                if !self.marked {
                    self.marked = true;
                    actions.push(SourceAction::MarkMigratedAway);
                }
                if self.commit == Delivery::NotSent {
                    self.commit = Delivery::Sent;
                    actions.push(SourceAction::SendCommit);
                }
                if self.commit == Delivery::Acked && !self.cleaned_up && !self.transitions_in_flight {
                    self.cleaned_up = true;
                    actions.push(SourceAction::Cleanup);
                }
                return;
            }
            JournalView::Writing(_) => return,
            JournalView::MaybeCommit => {
                if !self.marked {
                    self.marked = true;
                    actions.push(SourceAction::MarkMigratedAway);
                }
                return;
            }
            JournalView::Empty if self.want_abort => {
                self.journal = JournalView::Writing(Decision::Abort);
                actions.push(SourceAction::Journal(Decision::Abort));
                return;
            }
            JournalView::Empty if self.loaded && !self.transfer_active && !self.transitions_in_flight => {
                // Rule S2: the decision point.
                self.journal = JournalView::Writing(Decision::Commit);
                actions.push(SourceAction::Journal(Decision::Commit));
                return;
            }
            JournalView::Empty => return,
            JournalView::Durable(Decision::Abort) | JournalView::AbortNotDurable => {}
        }
        // Abort decided (rule S1): roll back once the transfer stopped and every
        // transition of the last barrier returned (rule S6).
        if self.rollback != Rollback::NotStarted || self.transfer_active {
            return;
        }
        #[cfg(test)]
        let join = !self.flaws.rollback_without_join;
        #[cfg(not(test))]
        let join = true;
        if join && self.transitions_in_flight {
            return;
        }
        self.rollback = Rollback::Running;
        actions.push(SourceAction::SendAbort);
        actions.push(SourceAction::Rollback);
    }
}
