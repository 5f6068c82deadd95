//! The destination's half of the commit protocol. See [`super::super::commit`] for the
//! rules D1–D5 it implements.

use super::{Answer, Sender};
use crate::engine::commit::Decision;
use crate::job::JobStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationPhase {
    /// Prepared: no device touched.
    Prepared,
    /// Devices in RESUMING, the streams arriving.
    Receiving,
    /// Every device loaded (STOP with the VM's state): holding, obeying only the source.
    Loaded,
    Resuming,
    Running,
    /// Commit was obeyed but a device failed to resume: the VM's state is here (rule D4).
    ResumeFailed,
    Resetting,
    /// Every device reset: no migrated state kept.
    Reset {
        ok: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationEvent {
    /// The source's handshake was accepted: every device is in RESUMING.
    HandshakeAccepted,
    /// The streams or the load failed before "loaded".
    ReceiveFailed,
    /// Every device moved RESUMING → STOP: the drivers loaded the state.
    Loaded,
    CommitReceived {
        from: Sender,
    },
    AbortReceived {
        from: Sender,
    },
    /// The source said neither commit nor abort in time after "loaded".
    HoldExpired,
    Cancel,
    /// ResolveJob: the operator's decision, or `None` to ask the source.
    ResolveAsked {
        decision: Option<Decision>,
    },
    /// The source's answer to QueryJob; `None`: no usable answer (unreachable, refused,
    /// not decided yet).
    SourceAnswered(Option<Answer>),
    Resumed {
        ok: bool,
    },
    ResetDone {
        ok: bool,
    },
}

/// What a Commit or Abort request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationReply {
    /// Done (idempotent: repeated requests get the same answer).
    Done,
    /// Not the job's source: nothing moved.
    PermissionDenied,
    /// Too early (the devices are not loaded yet) for a Commit.
    NotReady,
    /// Refused: the job went the other way (reset before a Commit, running before an Abort).
    Refused,
    /// Commit obeyed, but a device failed to resume.
    ResumeFailed,
    /// The transition is under way: ask again when the machine moves.
    Wait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationAction {
    /// Every P2P device to RUNNING_P2P (barrier), then every device to RUNNING.
    Resume,
    /// Every device reset to its power-on state.
    Reset,
    /// Ask the source's journal (QueryJob).
    AskSource,
    Reply(DestinationReply),
    RefuseCancel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationMachine {
    pub phase: DestinationPhase,
    /// Holding past the source's deadline, or the source could not say.
    pub in_doubt: bool,
    pub cancelled: bool,
    pub asking: bool,
    #[cfg(test)]
    pub(crate) flaws: super::Flaws,
}

impl Default for DestinationMachine {
    fn default() -> Self {
        DestinationMachine::new()
    }
}

impl DestinationMachine {
    pub fn new() -> DestinationMachine {
        DestinationMachine {
            phase: DestinationPhase::Prepared,
            in_doubt: false,
            cancelled: false,
            asking: false,
            #[cfg(test)]
            flaws: super::Flaws::default(),
        }
    }

    pub fn status(&self) -> JobStatus {
        match self.phase {
            DestinationPhase::Loaded if self.in_doubt => JobStatus::InDoubt,
            DestinationPhase::Running => JobStatus::Succeeded,
            DestinationPhase::ResumeFailed | DestinationPhase::Reset { ok: false } => JobStatus::Failed,
            DestinationPhase::Reset { ok: true } if self.cancelled => JobStatus::Cancelled,
            DestinationPhase::Reset { ok: true } => JobStatus::RolledBack,
            _ => JobStatus::Running,
        }
    }

    /// The devices hold loaded state that must not be thrown away on the machine's own
    /// initiative (rule D2).
    pub fn holding(&self) -> bool {
        self.phase == DestinationPhase::Loaded
    }

    fn trusted(&self, from: Sender) -> bool {
        #[cfg(test)]
        if self.flaws.trust_any_peer {
            return true;
        }
        from == Sender::JobPeer
    }

    pub fn on(&mut self, event: DestinationEvent) -> Vec<DestinationAction> {
        use DestinationAction as A;
        use DestinationPhase as P;
        match event {
            DestinationEvent::HandshakeAccepted => {
                if self.phase == P::Prepared {
                    self.phase = P::Receiving;
                }
                vec![]
            }
            DestinationEvent::ReceiveFailed => self.reset_before_loaded(),
            DestinationEvent::Loaded => {
                if self.phase == P::Receiving {
                    self.phase = P::Loaded;
                }
                vec![]
            }
            DestinationEvent::CommitReceived { from } => {
                if !self.trusted(from) {
                    return vec![A::Reply(DestinationReply::PermissionDenied)];
                }
                self.commit()
            }
            DestinationEvent::AbortReceived { from } => {
                if !self.trusted(from) {
                    return vec![A::Reply(DestinationReply::PermissionDenied)];
                }
                self.abort()
            }
            DestinationEvent::HoldExpired => {
                if self.phase == P::Loaded {
                    self.in_doubt = true;
                    return self.ask();
                }
                vec![]
            }
            DestinationEvent::Cancel => match self.phase {
                P::Prepared | P::Receiving => {
                    self.cancelled = true;
                    self.phase = P::Resetting;
                    vec![A::Reset]
                }
                P::Resetting | P::Reset { .. } => vec![],
                _ => vec![A::RefuseCancel],
            },
            DestinationEvent::ResolveAsked { decision } => match decision {
                Some(Decision::Commit) => self.commit(),
                Some(Decision::Abort) => self.abort(),
                None if self.phase == P::Loaded => self.ask(),
                None => vec![],
            },
            DestinationEvent::SourceAnswered(answer) => {
                self.asking = false;
                match answer {
                    Some(Answer::Commit) => self.commit(),
                    Some(Answer::Abort) => self.abort(),
                    #[cfg(test)]
                    Some(Answer::Unknown) if self.flaws.presumed_abort_not_durable => self.abort(),
                    // Rule D3: an unknown job or no answer holds, never resets.
                    Some(Answer::Unknown) | None => {
                        if self.phase == P::Loaded {
                            self.in_doubt = true;
                        }
                        vec![]
                    }
                }
            }
            DestinationEvent::Resumed { ok } => {
                if self.phase == P::Resuming {
                    self.phase = if ok { P::Running } else { P::ResumeFailed };
                }
                vec![]
            }
            DestinationEvent::ResetDone { ok } => {
                if self.phase == P::Resetting {
                    self.phase = P::Reset { ok };
                }
                vec![]
            }
        }
    }

    fn ask(&mut self) -> Vec<DestinationAction> {
        if self.asking {
            return vec![];
        }
        self.asking = true;
        vec![DestinationAction::AskSource]
    }

    fn reset_before_loaded(&mut self) -> Vec<DestinationAction> {
        match self.phase {
            DestinationPhase::Prepared | DestinationPhase::Receiving => {
                self.phase = DestinationPhase::Resetting;
                vec![DestinationAction::Reset]
            }
            _ => vec![],
        }
    }

    fn commit(&mut self) -> Vec<DestinationAction> {
        use DestinationAction as A;
        use DestinationPhase as P;
        match self.phase {
            P::Loaded => {
                self.phase = P::Resuming;
                vec![A::Resume, A::Reply(DestinationReply::Wait)]
            }
            P::Resuming => vec![A::Reply(DestinationReply::Wait)],
            P::Running => vec![A::Reply(DestinationReply::Done)],
            P::ResumeFailed => vec![A::Reply(DestinationReply::ResumeFailed)],
            P::Prepared | P::Receiving => vec![A::Reply(DestinationReply::NotReady)],
            P::Resetting | P::Reset { .. } => vec![A::Reply(DestinationReply::Refused)],
        }
    }

    fn abort(&mut self) -> Vec<DestinationAction> {
        use DestinationAction as A;
        use DestinationPhase as P;
        match self.phase {
            // Rule D1 before "loaded"; after it, only the source's Abort (journaled
            // first, rule S1) or the operator lets go of the state.
            P::Prepared | P::Receiving | P::Loaded => {
                self.phase = P::Resetting;
                vec![A::Reset, A::Reply(DestinationReply::Wait)]
            }
            P::Resetting => vec![A::Reply(DestinationReply::Wait)],
            P::Reset { .. } => vec![A::Reply(DestinationReply::Done)],
            P::Resuming | P::Running | P::ResumeFailed => vec![A::Reply(DestinationReply::Refused)],
        }
    }
}
