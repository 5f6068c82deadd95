//! The two-phase commit between source and destination, and the source's journal.
//!
//! # The invariant
//! A source device and its destination device never both run with the VM's state.
//! (A destination device that was reset is back in its power-on state and holds no
//! migrated state; what must never happen is a destination device reaching RUNNING_P2P or
//! RUNNING from loaded state while the source may still resume.)
//!
//! # Phases
//! ```text
//!  source                                   destination
//!  ------                                   -----------
//!  Handshake ───────────────────────────▶  check mapping+identity, devices → RESUMING
//!  [PreCopy], P2P barrier, StopCopy
//!  Drain: frames + END records ─────────▶  verify every frame, write into data_fds
//!  AwaitLoaded ─────────────────────────▶  verify END records, devices RESUMING → STOP
//!              ◀───────────────────────── "loaded"   (destination now HOLDS: rule D2)
//!  journal "commit" (fsync)   ← the decision point (rule S2; S4 if the write fails)
//!              ◀───────────────────────── QueryJob (hold expired): "abort" journaled
//!                                          first if undecided (S3), else the record
//!  Commit ──────────────────────────────▶  devices → RUNNING_P2P (barrier) → RUNNING
//!  Cleanup: STOP_COPY → STOP
//! ```
//!
//! # Rules
//! The rules are implemented by the pure machines of [`super::protocol`] (the drivers
//! only perform their actions) and model-checked there.
//! - **S0** A device is claimed only while RUNNING, and never once its state migrated away
//!   (marked in the registry when a commit is or may be on disk; releasing the device
//!   clears the mark). Each device's state at claim is recorded.
//! - **S1** Before a commit record exists, any failure (device errno, network, peer crash,
//!   timeout, cancel) makes the source journal "abort", tell the destination (best effort)
//!   and return every device to its recorded state along legal arcs.
//! - **S2** The source journals "commit" (written, fsync'd, renamed, directory fsync'd)
//!   before it sends Commit. From then on it never resumes its devices.
//! - **S3** Presumed abort is durable: QueryJob from the job's own destination about an
//!   undecided job journals "abort" before the answer; the job is never committed after
//!   it. Anyone else is refused (PermissionDenied) and nothing is journaled. A job the
//!   source does not know is answered `unknown`.
//! - **S4** A journal write that fails is read back: if "commit" is there (or the journal
//!   cannot be read), the job holds in doubt and never resumes; `ResolveJob` writes the
//!   commit again and delivers it. If nothing is there, the source decides abort (S1).
//! - **S5** Cancel is refused once a commit is or may be on disk.
//! - **S6** Every barrier's transitions are joined before a rollback reads a state: a
//!   timed-out or cancelled barrier never leaves a SET that moves a device afterwards.
//! - **S7** The job status is the machine's: `succeeded` only when the destination
//!   confirmed it runs, `rolled back` only when the devices are back in their recorded
//!   state, `in doubt` whenever a commit is or may be on disk and not confirmed — never
//!   `failed` after a commit (a control plane would restart the VM on the source).
//! - **D1** The destination resets every device (power-on state, no migrated state) on any
//!   failure or Abort before it reported "loaded".
//! - **D2** After reporting "loaded" the destination never resumes without Commit and
//!   never resets on its own (the source may already have journaled commit): if the link
//!   dies it holds, *in doubt*, until Commit, Abort, or `ResolveJob`.
//! - **D3** `ResolveJob` without a decision asks the source: commit → resume, abort →
//!   reset, `unknown` or no answer → hold. A source announced on an unspecified address
//!   (0.0.0.0) is asked at the IP its handshake came from.
//! - **D4** A failure after Commit leaves the destination with the VM's state; a device that
//!   failed to resume makes Commit answer an error, so the source stays in doubt.
//! - **D5** Commit and Abort come only from the address the job's handshake came from
//!   (the operator's own `ResolveJob` aside); the machine serialises them, so one that
//!   arrives after the other was obeyed is refused, whatever the lock order.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The source's durable decision for a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Decision {
    Commit,
    Abort,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal record {path} is corrupt: {content:?}")]
    Corrupt { path: PathBuf, content: String },
    #[error("job id `{0}` cannot name a journal record (use letters, digits, '-', '_', '.')")]
    BadJobId(String),
    #[error("job `{job}` already has the decision {existing:?}; refusing to record {new:?}")]
    Conflict { job: String, existing: Decision, new: Decision },
}

/// Decision records in `<state_dir>/journal/<job_id>.decision`.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Fault injection (tests): how many of the next directory syncs fail after the
    /// rename put a record in place — the failure that leaves a record on disk while
    /// `record` reports an error.
    failing_directory_syncs: Arc<AtomicU32>,
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join("journal");
        fs::create_dir_all(&dir).map_err(|source| JournalError::Io { path: dir.clone(), source })?;
        Ok(Journal { dir, failing_directory_syncs: Arc::default() })
    }

    pub fn path_of(&self, job_id: &str) -> Result<PathBuf, JournalError> {
        let valid = !job_id.is_empty()
            && job_id.len() <= 128
            && !job_id.starts_with('.')
            && job_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(JournalError::BadJobId(job_id.to_string()));
        }
        Ok(self.dir.join(format!("{job_id}.decision")))
    }

    /// Records a decision durably. Recording the same decision again is a no-op; a
    /// different one is refused (a commit can never be turned into an abort).
    pub fn record(&self, job_id: &str, decision: Decision) -> Result<(), JournalError> {
        let path = self.path_of(job_id)?;
        if let Some(existing) = self.read(job_id)? {
            if existing == decision {
                return Ok(());
            }
            return Err(JournalError::Conflict { job: job_id.into(), existing, new: decision });
        }
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        let tmp = path.with_extension("decision.tmp");
        let mut file =
            OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io_err(&tmp))?;
        file.write_all(format!("{}\n", decision.as_str()).as_bytes()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        // The rename is durable only once the directory entry is.
        let injected = self
            .failing_directory_syncs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected {
            return Err(io_err(&self.dir)(io::Error::from_raw_os_error(nix::libc::EIO)));
        }
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))?;
        Ok(())
    }

    /// Fault injection for tests: the next directory sync fails with EIO after the
    /// record was renamed into place (as a failing disk does).
    pub fn fail_next_directory_sync(&self) {
        self.failing_directory_syncs.fetch_add(1, Ordering::SeqCst);
    }

    pub fn read(&self, job_id: &str) -> Result<Option<Decision>, JournalError> {
        let path = self.path_of(job_id)?;
        match fs::read_to_string(&path) {
            Ok(content) => match content.trim() {
                "commit" => Ok(Some(Decision::Commit)),
                "abort" => Ok(Some(Decision::Abort)),
                _ => Err(JournalError::Corrupt { path, content }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_is_durable_and_final() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.read("job-1").unwrap(), None);
        journal.record("job-1", Decision::Commit).unwrap();
        // A fresh handle (a restarted daemon) sees the same decision.
        let reopened = Journal::open(dir.path()).unwrap();
        assert_eq!(reopened.read("job-1").unwrap(), Some(Decision::Commit));
        reopened.record("job-1", Decision::Commit).unwrap();
        let err = reopened.record("job-1", Decision::Abort).unwrap_err();
        assert!(matches!(err, JournalError::Conflict { .. }), "{err}");
        assert!(!dir.path().join("journal/job-1.decision.tmp").exists());
    }

    #[test]
    fn job_ids_cannot_escape_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "x y"] {
            assert!(
                matches!(journal.record(bad, Decision::Abort), Err(JournalError::BadJobId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_corrupt_record_is_reported_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        fs::write(journal.path_of("j").unwrap(), "comm").unwrap();
        assert!(matches!(journal.read("j"), Err(JournalError::Corrupt { .. })));
    }
}
