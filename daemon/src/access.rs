//! Who may use the daemon's local sockets (control and handoff): one policy, decided from
//! the kernel's `SO_PEERCRED` of each connection (`net/core/sock.c`, the credentials of
//! the process that called `connect`). Pure: the listeners hand in the credentials, this
//! module says yes or no and why.
//!
//! Two classes of call: [`AccessClass::Read`] (list, get, watch, plan) and
//! [`AccessClass::Admin`] (everything that changes a device, a group or a job). Root and
//! the daemon's own uid are always allowed; everyone else must be named by uid or by
//! primary gid in the configuration (`[control] read_uids/read_gids/admin_uids/admin_gids`,
//! `[handoff] admin_uids/admin_gids`). Admin implies read. An unknown control method is
//! admin: a method added to the proto later is closed until classified here.

use std::fmt;

use crate::config::AccessConfig;

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessClass {
    /// Looks without changing anything.
    Read,
    /// Changes a device, a group or a job.
    Admin,
}

impl fmt::Display for AccessClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessClass::Read => "read-only (read_uids/read_gids or admin)",
            AccessClass::Admin => "mutating (admin_uids/admin_gids)",
        })
    }
}

/// The peer credentials of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl From<tokio::net::unix::UCred> for Caller {
    fn from(cred: tokio::net::unix::UCred) -> Caller {
        Caller { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} (gid {}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        f.write_str(")")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessDenied {
    #[error("{what}: permission denied for {caller}: it needs {class} access")]
    NotAllowed { what: String, caller: Caller, class: AccessClass },
    #[error("{what}: permission denied: the caller's credentials (SO_PEERCRED) are unknown")]
    NoCredentials { what: String },
}

/// The decision table of one socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    /// The daemon's own uid: whoever runs as the daemon already holds everything it holds.
    daemon_uid: u32,
    lists: AccessConfig,
}

impl AccessPolicy {
    pub fn new(daemon_uid: u32, lists: AccessConfig) -> AccessPolicy {
        AccessPolicy { daemon_uid, lists }
    }

    /// The policy for a socket of this process.
    pub fn for_this_process(lists: AccessConfig) -> AccessPolicy {
        AccessPolicy::new(nix::unistd::geteuid().as_raw(), lists)
    }

    pub fn allows(&self, caller: &Caller, class: AccessClass) -> bool {
        let l = &self.lists;
        let admin = caller.uid == 0
            || caller.uid == self.daemon_uid
            || l.admin_uids.contains(&caller.uid)
            || l.admin_gids.contains(&caller.gid);
        match class {
            AccessClass::Admin => admin,
            AccessClass::Read => {
                admin || l.read_uids.contains(&caller.uid) || l.read_gids.contains(&caller.gid)
            }
        }
    }

    /// `Ok` if `caller` may do `what` (which needs `class`); without credentials, no.
    pub fn check(&self, caller: Option<&Caller>, class: AccessClass, what: &str) -> Result<(), AccessDenied> {
        match caller {
            None => Err(AccessDenied::NoCredentials { what: what.to_string() }),
            Some(c) if self.allows(c, class) => Ok(()),
            Some(c) => Err(AccessDenied::NotAllowed { what: what.to_string(), caller: *c, class }),
        }
    }
}

/// The class of a method of `vfio_migd.v1.Control` (by its proto name).
pub fn control_method_class(method: &str) -> AccessClass {
    match method {
        "ListDevices" | "GetDevice" | "GetGroup" | "ListGroups" | "PlanMigration" | "GetJob" | "ListJobs"
        | "WatchJob" | "GetDirtyTracking" => AccessClass::Read,
        // GetDirtyPages reads DMA_LOGGING_REPORT / GET_DIRTY_BITMAP, which clear the bits
        // they report (include/uapi/linux/vfio.h, include/uapi/linux/iommufd.h): a reader
        // would steal dirty pages from the VMM.
        _ => AccessClass::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMON: u32 = 990;

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid, pid: Some(42) }
    }

    fn policy() -> AccessPolicy {
        AccessPolicy::new(
            DAEMON,
            AccessConfig {
                read_uids: vec![1000],
                read_gids: vec![500],
                admin_uids: vec![1001],
                admin_gids: vec![600],
            },
        )
    }

    #[test]
    fn who_may_do_what() {
        use AccessClass::{Admin, Read};
        let p = policy();
        // (uid, gid, read allowed, admin allowed)
        let table = [
            (0, 0, true, true),           // root
            (DAEMON, DAEMON, true, true), // the daemon's own user
            (1000, 1000, true, false),    // read uid
            (2000, 500, true, false),     // read gid
            (1001, 1001, true, true),     // admin uid
            (2000, 600, true, true),      // admin gid
            (65534, 65534, false, false), // nobody
            (2000, 2000, false, false),   // someone else
        ];
        for (uid, gid, read, admin) in table {
            let c = caller(uid, gid);
            assert_eq!(p.allows(&c, Read), read, "{c} read");
            assert_eq!(p.allows(&c, Admin), admin, "{c} admin");
        }
    }

    #[test]
    fn an_empty_configuration_allows_only_root_and_the_daemon() {
        let p = AccessPolicy::new(DAEMON, AccessConfig::default());
        assert!(p.allows(&caller(0, 0), AccessClass::Admin));
        assert!(p.allows(&caller(DAEMON, 1), AccessClass::Admin));
        assert!(!p.allows(&caller(1000, 1000), AccessClass::Read));
    }

    #[test]
    fn a_refusal_names_the_caller_and_the_class_it_needs() {
        let err =
            policy().check(Some(&caller(1000, 1000)), AccessClass::Admin, "StartMigration").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("StartMigration") && text.contains("uid 1000"), "{text}");
        assert!(text.contains("mutating") && text.contains("admin_uids"), "{text}");
        let err = policy().check(None, AccessClass::Read, "ListDevices").unwrap_err();
        assert!(err.to_string().contains("SO_PEERCRED"), "{err}");
    }

    #[test]
    fn control_methods_are_classified_and_unknown_ones_are_admin() {
        use AccessClass::{Admin, Read};
        let table = [
            ("RegisterDevice", Admin),
            ("ListDevices", Read),
            ("GetDevice", Read),
            ("ReleaseDevice", Admin),
            ("DefineGroup", Admin),
            ("GetGroup", Read),
            ("ListGroups", Read),
            ("DeleteGroup", Admin),
            ("PlanMigration", Read),
            ("PrepareIncoming", Admin),
            ("StartMigration", Admin),
            ("GetJob", Read),
            ("ListJobs", Read),
            ("WatchJob", Read),
            ("CancelJob", Admin),
            ("ResolveJob", Admin),
            ("StartDirtyTracking", Admin),
            ("StopDirtyTracking", Admin),
            ("GetDirtyPages", Admin),
            ("GetDirtyTracking", Read),
            ("SomethingAddedLater", Admin),
        ];
        for (method, class) in table {
            assert_eq!(control_method_class(method), class, "{method}");
        }
    }
}
