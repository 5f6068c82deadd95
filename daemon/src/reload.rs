//! Live reload (SIGHUP): the configuration file is read again and offered to every part
//! that registered as reloadable; each says what it put in force, that nothing changed for
//! it, or why it refused. A refusal leaves that part as it was and the others reload anyway.
//!
//! Parts register with [`Reloader::register`]: logging (level and format), the keys that
//! only a restart can change (it refuses, naming them), and whatever else can change live
//! (TLS material, once it exists, registers its own part).

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::config::Config;

/// What one part did with a new configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Put in force; what changed, one entry per change.
    Reloaded(Vec<String>),
    /// The new configuration changes nothing this part owns.
    Unchanged,
    /// Not put in force, and why (the part keeps what it had).
    Refused(String),
}

/// A part of the running daemon that can take a new configuration without a restart.
pub trait Reloadable: Send + Sync {
    /// Names the part in logs (`logging`, `tls`).
    fn name(&self) -> &'static str;
    /// Takes what it can from `new`; must not block for long (it runs on the runtime).
    fn reload(&self, new: &Config) -> Outcome;
}

/// The registered parts, in registration order.
#[derive(Default)]
pub struct Reloader {
    parts: Mutex<Vec<Arc<dyn Reloadable>>>,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_list().entries(parts.iter().map(|p| p.name())).finish()
    }
}

impl Reloader {
    pub fn register(&self, part: Arc<dyn Reloadable>) {
        self.parts.lock().unwrap_or_else(|p| p.into_inner()).push(part);
    }

    /// Offers `new` to every part; one outcome per part.
    pub fn reload(&self, new: &Config) -> Vec<(&'static str, Outcome)> {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        parts.iter().map(|part| (part.name(), part.reload(new))).collect()
    }
}

/// Logging: level (unless `VFIO_MIGD_LOG` overrides it) and format.
impl Reloadable for crate::telemetry::LogHandle {
    fn name(&self) -> &'static str {
        "logging"
    }
    fn reload(&self, new: &Config) -> Outcome {
        match self.apply(&new.log) {
            Ok(changed) if changed.is_empty() => Outcome::Unchanged,
            Ok(changed) => Outcome::Reloaded(changed),
            Err(e) => Outcome::Refused(e.to_string()),
        }
    }
}

/// The keys the daemon reads once at start (listeners, directories, devices, migration
/// parameters captured by running jobs): a change is refused, naming the keys, until the
/// daemon is restarted.
#[derive(Debug)]
pub struct RestartOnly {
    started_with: Config,
}

impl RestartOnly {
    pub fn new(started_with: Config) -> RestartOnly {
        RestartOnly { started_with }
    }

    /// The top-level sections (and `state_dir`) whose values differ from the running ones.
    /// Compared by their printed form: every configuration struct prints all its fields,
    /// and that stays true when sections gain keys.
    pub fn changed_keys(&self, new: &Config) -> Vec<&'static str> {
        let (old, new) = (&self.started_with, new);
        let mut changed = Vec::new();
        let mut compare = |key, a: String, b: String| {
            if a != b {
                changed.push(key);
            }
        };
        compare("control", format!("{:?}", old.control), format!("{:?}", new.control));
        compare("handoff", format!("{:?}", old.handoff), format!("{:?}", new.handoff));
        compare("peer", format!("{:?}", old.peer), format!("{:?}", new.peer));
        compare("state_dir", format!("{:?}", old.state_dir), format!("{:?}", new.state_dir));
        compare("migration", format!("{:?}", old.migration), format!("{:?}", new.migration));
        compare("metrics", format!("{:?}", old.metrics), format!("{:?}", new.metrics));
        compare("device", format!("{:?}", old.devices), format!("{:?}", new.devices));
        compare("test", format!("{:?}", old.test), format!("{:?}", new.test));
        changed
    }
}

impl Reloadable for RestartOnly {
    fn name(&self) -> &'static str {
        "restart-only keys"
    }
    fn reload(&self, new: &Config) -> Outcome {
        let changed = self.changed_keys(new);
        if changed.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Refused(format!(
                "[{}] changed, which only a restart puts in force (the running values stay)",
                changed.join("], [")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(&'static str, Mutex<u32>);
    impl Reloadable for Counting {
        fn name(&self) -> &'static str {
            self.0
        }
        fn reload(&self, _: &Config) -> Outcome {
            let mut n = self.1.lock().unwrap();
            *n += 1;
            Outcome::Reloaded(vec![format!("round {n}")])
        }
    }

    #[test]
    fn every_part_is_offered_the_new_configuration_even_after_a_refusal() {
        let reloader = Reloader::default();
        let started = Config::from_toml("", false).unwrap();
        reloader.register(Arc::new(RestartOnly::new(started)));
        reloader.register(Arc::new(Counting("tls", Mutex::new(0))));
        let moved = Config::from_toml("[peer]\nlisten = \"127.0.0.1:7999\"\n", false).unwrap();
        let outcomes = reloader.reload(&moved);
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[0].0, "restart-only keys");
        match &outcomes[0].1 {
            Outcome::Refused(why) => assert!(why.contains("[peer]") && why.contains("restart"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(outcomes[1], ("tls", Outcome::Reloaded(vec!["round 1".into()])));
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let started = Config::from_toml("[migration]\nretained_jobs = 7\n", false).unwrap();
        let part = RestartOnly::new(started.clone());
        assert_eq!(part.reload(&started), Outcome::Unchanged);
        let log_only =
            Config::from_toml("[migration]\nretained_jobs = 7\n[log]\nlevel = \"debug\"\n", false).unwrap();
        assert_eq!(part.reload(&log_only), Outcome::Unchanged);
        let fewer = Config::from_toml("[migration]\nretained_jobs = 3\n", false).unwrap();
        assert_eq!(part.changed_keys(&fewer), ["migration"]);
    }
}
