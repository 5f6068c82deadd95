//! The devices this daemon owns and the groups (one VM's devices) defined over them.
//! A device belongs to at most one job at a time: a job claims its devices up front and
//! the claim is released when the job ends, whatever the outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::MigrationDevice;
use crate::device::sim::SimIommu;

/// How the daemon came to hold a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sim,
    VfioGroup,
    VfioCdev,
    Handoff,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sim => "sim",
            Backend::VfioGroup => "vfio-group",
            Backend::VfioCdev => "vfio-cdev",
            Backend::Handoff => "handoff",
        }
    }
}

#[derive(Debug)]
pub struct RegisteredDevice {
    pub device: Arc<dyn MigrationDevice>,
    pub backend: Backend,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDef {
    pub name: String,
    pub devices: Vec<String>,
    /// Two or more devices without P2P cannot be quiesced against each other; only the
    /// operator can vouch that they never do peer-to-peer DMA.
    pub allow_multiple_non_p2p: bool,
}

/// Who created a group over the handoff socket: the peer credentials of the VMM process
/// whose first handed-over device named it. Only that process may add devices to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCreator {
    pub uid: u32,
    pub pid: Option<i32>,
}

impl std::fmt::Display for GroupCreator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "uid {} pid {pid}", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("device `{0}` is not registered")]
    UnknownDevice(String),
    #[error("device `{0}` is already registered")]
    DuplicateDevice(String),
    #[error("group `{0}` is not defined")]
    UnknownGroup(String),
    #[error("group `{0}` is already defined")]
    DuplicateGroup(String),
    #[error("group `{0}` has no devices")]
    EmptyGroup(String),
    #[error("device `{device}` is busy in job `{job}`")]
    Busy { device: String, job: String },
    #[error("device `{device}` belongs to group `{group}`")]
    InGroup { device: String, group: String },
    #[error("device `{0}` is listed twice")]
    Repeated(String),
    #[error(
        "device `{device}` migrated away in job `{job}`: its state runs on the destination now; remove (release) the device before using it again"
    )]
    MigratedAway { device: String, job: String },
    #[error(
        "group `{0}` is dirty-tracked: stop dirty tracking first (its tracker covers exactly its current devices)"
    )]
    Tracked(String),
    #[error(
        "group `{group}` was not created by this client ({client}): a handoff may add devices only \
         to groups its own process created"
    )]
    NotGroupCreator { group: String, client: GroupCreator },
}

#[derive(Default)]
struct Inner {
    devices: BTreeMap<String, Arc<RegisteredDevice>>,
    groups: BTreeMap<String, GroupDef>,
    /// device name -> job id holding it
    claims: BTreeMap<String, String>,
    /// Groups with a dirty tracker: their membership is frozen, since a tracker covers
    /// exactly the devices it was built over (a device joining later would be silently
    /// untracked, a deleted group's tracker could no longer be stopped by name).
    tracked: BTreeSet<String>,
    /// device name -> the job its state migrated away in: the device holds a VM state
    /// that runs elsewhere now, so it is never claimed (or resumed) again until released.
    migrated_away: BTreeMap<String, String>,
    /// Groups created over the handoff socket, by their creator. A group defined over the
    /// control API has none and takes no handed-over devices.
    creators: BTreeMap<String, GroupCreator>,
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// The simulated IOMMU of this daemon's simulated devices: HWPTs they name are shared
    /// between them, never with another daemon's.
    sim_iommu: Arc<SimIommu>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Registry").field("devices", &inner.devices.keys().collect::<Vec<_>>()).finish()
    }
}

/// Devices claimed by a job; dropping it releases them.
#[derive(Debug)]
pub struct Claim {
    registry: Arc<Registry>,
    job_id: String,
    pub devices: Vec<(String, Arc<RegisteredDevice>)>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        for (name, _) in &self.devices {
            if inner.claims.get(name) == Some(&self.job_id) {
                inner.claims.remove(name);
            }
        }
    }
}

fn check_creator(inner: &Inner, group: &str, client: &GroupCreator) -> Result<(), RegistryError> {
    // A creator recorded for a group not yet defined is a join in progress: it owns the name.
    let allowed = match inner.creators.get(group) {
        Some(creator) => creator == client,
        None => !inner.groups.contains_key(group),
    };
    if allowed {
        return Ok(());
    }
    Err(RegistryError::NotGroupCreator { group: group.to_string(), client: *client })
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated (every
        // mutation is a single insert/remove), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The simulated IOMMU simulated devices of this daemon are opened on.
    pub fn sim_iommu(&self) -> &Arc<SimIommu> {
        &self.sim_iommu
    }

    pub fn add_device(
        &self,
        device: Arc<dyn MigrationDevice>,
        backend: Backend,
    ) -> Result<Arc<RegisteredDevice>, RegistryError> {
        let name = device.name().to_string();
        let mut inner = self.lock();
        if inner.devices.contains_key(&name) {
            return Err(RegistryError::DuplicateDevice(name));
        }
        let entry = Arc::new(RegisteredDevice { device, backend });
        inner.devices.insert(name, entry.clone());
        Ok(entry)
    }

    /// Removes a device that is in no job and no group.
    pub fn remove_device(&self, name: &str) -> Result<Arc<RegisteredDevice>, RegistryError> {
        let mut inner = self.lock();
        if let Some(job) = inner.claims.get(name) {
            return Err(RegistryError::Busy { device: name.into(), job: job.clone() });
        }
        if let Some(group) = inner.groups.values().find(|g| g.devices.iter().any(|d| d == name)) {
            return Err(RegistryError::InGroup { device: name.into(), group: group.name.clone() });
        }
        let removed = inner.devices.remove(name).ok_or_else(|| RegistryError::UnknownDevice(name.into()))?;
        // Releasing the device is what clears the mark (until the lifecycle issue adds a reset).
        inner.migrated_away.remove(name);
        Ok(removed)
    }

    /// Marks devices whose state migrated away in `job_id` (a commit is or may be on disk).
    pub fn mark_migrated_away(&self, names: &[String], job_id: &str) {
        let mut inner = self.lock();
        for name in names {
            inner.migrated_away.insert(name.clone(), job_id.to_string());
        }
    }

    /// The job a device's state migrated away in, if it did.
    pub fn migrated_away(&self, name: &str) -> Option<String> {
        self.lock().migrated_away.get(name).cloned()
    }

    pub fn device(&self, name: &str) -> Result<Arc<RegisteredDevice>, RegistryError> {
        self.lock().devices.get(name).cloned().ok_or_else(|| RegistryError::UnknownDevice(name.into()))
    }

    pub fn devices(&self) -> Vec<(String, Arc<RegisteredDevice>)> {
        self.lock().devices.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The job holding a device, if any.
    pub fn job_of(&self, name: &str) -> Option<String> {
        self.lock().claims.get(name).cloned()
    }

    /// The group a device belongs to, if any.
    pub fn group_of(&self, name: &str) -> Option<String> {
        self.lock().groups.values().find(|g| g.devices.iter().any(|d| d == name)).map(|g| g.name.clone())
    }

    pub fn define_group(&self, group: GroupDef) -> Result<GroupDef, RegistryError> {
        let mut inner = self.lock();
        if inner.groups.contains_key(&group.name) {
            return Err(RegistryError::DuplicateGroup(group.name));
        }
        if group.devices.is_empty() {
            return Err(RegistryError::EmptyGroup(group.name));
        }
        let mut seen = std::collections::HashSet::new();
        for device in &group.devices {
            if !inner.devices.contains_key(device) {
                return Err(RegistryError::UnknownDevice(device.clone()));
            }
            if !seen.insert(device) {
                return Err(RegistryError::Repeated(device.clone()));
            }
            if let Some(other) = inner.groups.values().find(|g| g.devices.contains(device)) {
                return Err(RegistryError::InGroup { device: device.clone(), group: other.name.clone() });
            }
        }
        inner.groups.insert(group.name.clone(), group.clone());
        Ok(group)
    }

    /// Adds a registered device to a group, defining the group if it does not exist (a VMM
    /// handing over its devices one by one names the VM each belongs to). Refused while a
    /// job holds any device of the group.
    pub fn join_group(&self, group: &str, device: &str) -> Result<GroupDef, RegistryError> {
        let mut inner = self.lock();
        if !inner.devices.contains_key(device) {
            return Err(RegistryError::UnknownDevice(device.into()));
        }
        if let Some(other) = inner.groups.values().find(|g| g.devices.iter().any(|d| d == device)) {
            if other.name == group {
                return Ok(other.clone());
            }
            return Err(RegistryError::InGroup { device: device.into(), group: other.name.clone() });
        }
        if inner.tracked.contains(group) {
            return Err(RegistryError::Tracked(group.into()));
        }
        let Inner { groups, claims, .. } = &mut *inner;
        let def = groups.entry(group.to_string()).or_insert_with(|| GroupDef {
            name: group.to_string(),
            devices: Vec::new(),
            allow_multiple_non_p2p: false,
        });
        if let Some(busy) = def.devices.iter().find(|d| claims.contains_key(*d)) {
            return Err(RegistryError::Busy { device: busy.clone(), job: claims[busy].clone() });
        }
        def.devices.push(device.to_string());
        Ok(def.clone())
    }

    /// Whether `client` may add a device to `group` over the handoff socket: the group does
    /// not exist yet, or `client` created it.
    pub fn may_join_as(&self, group: &str, client: &GroupCreator) -> Result<(), RegistryError> {
        check_creator(&self.lock(), group, client)
    }

    /// [`Registry::join_group`] for a handoff client: refused unless the group does not
    /// exist yet (then `client` becomes its creator) or `client` created it.
    pub fn join_group_as(
        &self,
        group: &str,
        device: &str,
        client: &GroupCreator,
    ) -> Result<GroupDef, RegistryError> {
        {
            let mut inner = self.lock();
            check_creator(&inner, group, client)?;
            inner.creators.insert(group.to_string(), *client);
        }
        let joined = self.join_group(group, device);
        if joined.is_err() {
            let mut inner = self.lock();
            if !inner.groups.contains_key(group) {
                inner.creators.remove(group);
            }
        }
        joined
    }

    pub fn group(&self, name: &str) -> Result<GroupDef, RegistryError> {
        self.lock().groups.get(name).cloned().ok_or_else(|| RegistryError::UnknownGroup(name.into()))
    }

    pub fn groups(&self) -> Vec<GroupDef> {
        self.lock().groups.values().cloned().collect()
    }

    pub fn delete_group(&self, name: &str) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let group = inner.groups.get(name).ok_or_else(|| RegistryError::UnknownGroup(name.into()))?;
        if inner.tracked.contains(name) {
            return Err(RegistryError::Tracked(name.into()));
        }
        if let Some(device) = group.devices.iter().find(|d| inner.claims.contains_key(*d)) {
            return Err(RegistryError::Busy { device: device.clone(), job: inner.claims[device].clone() });
        }
        inner.groups.remove(name);
        inner.creators.remove(name);
        Ok(())
    }

    /// Freezes `group`'s membership while it is dirty-tracked; fails if the group is gone.
    pub fn mark_tracked(&self, group: &str) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        if !inner.groups.contains_key(group) {
            return Err(RegistryError::UnknownGroup(group.into()));
        }
        inner.tracked.insert(group.to_owned());
        Ok(())
    }

    pub fn unmark_tracked(&self, group: &str) {
        self.lock().tracked.remove(group);
    }

    /// Claims every named device for `job_id`, all or none. Claiming again for the same
    /// job id is refused too: idempotent restarts are handled by the job table.
    pub fn claim(self: &Arc<Self>, job_id: &str, names: &[String]) -> Result<Claim, RegistryError> {
        let mut inner = self.lock();
        let mut devices = Vec::with_capacity(names.len());
        let mut seen = std::collections::HashSet::new();
        for name in names {
            if !seen.insert(name) {
                return Err(RegistryError::Repeated(name.clone()));
            }
            let entry = inner.devices.get(name).ok_or_else(|| RegistryError::UnknownDevice(name.clone()))?;
            if let Some(job) = inner.claims.get(name) {
                return Err(RegistryError::Busy { device: name.clone(), job: job.clone() });
            }
            if let Some(job) = inner.migrated_away.get(name) {
                return Err(RegistryError::MigratedAway { device: name.clone(), job: job.clone() });
            }
            devices.push((name.clone(), entry.clone()));
        }
        for name in names {
            inner.claims.insert(name.clone(), job_id.to_string());
        }
        Ok(Claim { registry: self.clone(), job_id: job_id.to_string(), devices })
    }
}
