//! The tally the real-kernel guest programs keep: one `ok NAME` / `FAIL NAME: WHY` line per
//! check as it completes, and a final `N passed, M failed` line that
//! `tests/real-kernel/run.sh` reads from the serial log.

/// The running tally.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
}

impl Report {
    pub fn check(&mut self, name: &str, outcome: Result<(), String>) -> bool {
        match outcome {
            Ok(()) => {
                self.passed += 1;
                println!("ok {name}");
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("FAIL {name}: {why}");
                false
            }
        }
    }

    /// Records `outcome` and hands its value on, so a failed step ends its scenario.
    pub fn step<T>(&mut self, name: &str, outcome: Result<T, String>) -> Option<T> {
        match outcome {
            Ok(value) => {
                self.check(name, Ok(()));
                Some(value)
            }
            Err(why) => {
                self.check(name, Err(why));
                None
            }
        }
    }

    /// The count line.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

pub fn ensure(condition: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if condition { Ok(()) } else { Err(why()) }
}
