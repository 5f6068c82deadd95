//! The simulated migratable device: the kernel's VFIO migration v2 contract in user
//! space, strict enough that the engine cannot tell it from a driver, plus fault
//! injection. Most tests and the default demo run on it.
//!
//! What it does like the kernel (uAPI reference, sections 1.4–1.6, 2, 3.2, 3.3):
//! * the same FSM: a SET walks [`fsm::path`] arc by arc; refused requests (unsupported
//!   target, blocked arc, SET of ERROR, SET while in ERROR) fail with EINVAL and change
//!   nothing; a failed SET reports the state it reached in `state_after`;
//! * data_fds are real pipes served by a thread per session ([`session`]): STOP→STOP_COPY
//!   and RUNNING(_P2P)→PRE_COPY(_P2P) open a saving fd, STOP→RESUMING a resuming fd;
//!   PRE_COPY(_P2P)→STOP_COPY continues the same fd with the pages dirtied since; leaving
//!   the saving group or a reset disables the fd (ENODEV);
//! * the stream ([`stream`]) is generated on the fly from `(seed, generation)`
//!   ([`image`]): neither side ever holds a whole state;
//! * PRE_COPY: PRECOPY_INFO counts `initial_bytes` down as the engine reads, and
//!   `dirty_bytes` grows with `dirty_rate` while the device runs; at the temporary end a
//!   read returns 0 (mtty, hisi) or ENOMSG (mlx5) per [`PrecopyEnd`]; dirty pages are
//!   committed to the stream when PRECOPY_INFO finds the stream drained, as mlx5 does
//!   (so an engine that never calls it only gets the initial image before STOP_COPY);
//! * RESUMING checks on write what hisi/mtty check on write (EFAULT for an incompatible
//!   header, ENOMEM past the END record) and everything else at RESUMING→STOP: a
//!   truncated, corrupt or over-long stream is EINVAL there and the device stays in
//!   RESUMING (writing the rest of a truncated stream and retrying works);
//! * DMA logging with the kernel's checks and real bitmap layout ([`dma`]); ENOTTY for
//!   every logging operation when the driver has none;
//! * an IOMMU ([`iommu`]): devices naming a HWPT share it, and their DMA writes dirty it
//!   while it tracks, with or without DMA logging;
//! * peer-to-peer DMA between the devices of one VM ([`p2p`]): RUNNING_P2P and
//!   PRE_COPY_P2P keep running and accept P2P writes but initiate none; a write into a
//!   stopped device corrupts what it saves;
//! * `reset()` returns to RUNNING in the power-on state `(seed, 0)`, disables every
//!   data_fd (they stay open; reads and writes fail with ENODEV) and stops DMA logging;
//! * every arc, reset and fault goes to the arc log ([`arc_log`]).

mod arc_log;
mod dma;
mod fault;
mod image;
mod iommu;
mod p2p;
mod session;
mod spec;
mod stream;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;

pub use self::arc_log::{ArcEvent, ArcLogEntry, ArcLogError, monotonic_ns, parse_arc_log, read_arc_log};
pub use self::fault::{Fault, FaultAction, FaultOp, parse_errno};
pub use self::image::{STATE_PAGE, StateDigest, StateId, digest_of};
pub use self::iommu::{SIM_IOMMU_LABEL, SimHwptHandle, SimIommu};
pub use self::spec::{
    DmaLoggingSpec, DmaWriteSpec, IommuMapping, IommuSpec, PrecopyEnd, SimSpec, SimSpecError, parse_byte_size,
};
pub use self::stream::StreamError;

use self::arc_log::ArcLog;
use self::dma::DeviceDma;
use self::fault::{FaultTable, Fired};
use self::image::{DirtyPages, Image, page_count};
use self::session::{LoadError, ResumeSession, SaveFaults, SaveSession, SaveStart, Shared};
use self::stream::{Compat, MAX_RUN};
use super::{
    DataFd, DeviceError, DeviceIdentity, Direction, IovaRange, MigrationDevice, Op, PrecopyInfo, plan_set,
};
use crate::dirty::HwptDirty;
use crate::fsm::{self, Caps, State};

/// The driver name in a simulated device's [`DeviceIdentity`].
pub const DRIVER: &str = "sim";

/// A simulated migratable device. Not `Clone`: dropping it disables its sessions, as
/// closing a device fd does.
pub struct SimDevice {
    spec: SimSpec,
    seed: u64,
    shared: Arc<Shared>,
    core: Mutex<Core>,
    dma: Arc<DeviceDma>,
    hwpt: Option<Arc<dyn HwptDirty>>,
    /// The devices this one writes into by P2P DMA ([`SimDevice::connect_p2p`]).
    p2p_peers: Mutex<Vec<Weak<SimDevice>>>,
    p2p_writer_started: AtomicBool,
}

struct Core {
    state: State,
    image: Image,
    /// Pages changed since they were last committed to the PRE_COPY stream.
    dirty: DirtyPages,
    last_tick: Instant,
    /// Dirty bytes carried between ticks, in byte-nanoseconds.
    dirty_carry: u128,
    saving: Option<Arc<SaveSession>>,
    resuming: Option<Arc<ResumeSession>>,
    loaded: Option<StateId>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SimDevice {
    /// A device on an IOMMU of its own: a HWPT its spec names is shared with no other
    /// device (use [`SimDevice::with_iommu`] to share one).
    pub fn new(spec: SimSpec) -> Result<SimDevice, SimSpecError> {
        SimDevice::with_iommu(spec, &SimIommu::new())
    }

    /// A device on the simulated IOMMU `iommu`: the HWPT its spec names (`[device.iommu]`)
    /// is shared with every device of `iommu` naming it.
    pub fn with_iommu(spec: SimSpec, iommu: &Arc<SimIommu>) -> Result<SimDevice, SimSpecError> {
        spec.validate()?;
        let arc_log =
            ArcLog::new(&spec.name, spec.arc_log.as_deref()).map_err(|source| SimSpecError::ArcLog {
                name: spec.name.clone(),
                path: spec.arc_log.clone().unwrap_or_default(),
                source,
            })?;
        let seed = spec.effective_seed();
        let image = Image::power_on(seed, spec.state_size);
        let core = Core {
            state: State::Running,
            dirty: DirtyPages::new(page_count(spec.state_size)),
            image,
            last_tick: Instant::now(),
            dirty_carry: 0,
            saving: None,
            resuming: None,
            loaded: None,
        };
        let shared = Arc::new(Shared::new(spec.name.clone(), FaultTable::new(&spec.faults), arc_log));
        let hwpt = match &spec.iommu {
            Some(iommu_spec) => Some(
                iommu
                    .hwpt(iommu_spec)
                    .map_err(|what| SimSpecError::Iommu { name: spec.name.clone(), what })?,
            ),
            None => None,
        };
        let dma = Arc::new_cyclic(|me| {
            if let Some((_, hwpt)) = &hwpt {
                hwpt.attach(me.clone());
            }
            DeviceDma::new(shared.clone(), spec.dma_logging.clone(), hwpt.as_ref().map(|(_, h)| h.clone()))
        });
        let hwpt_handle = hwpt.map(|(id, _)| {
            let name = spec.iommu.as_ref().map_or("", |i| i.hwpt.as_str());
            Arc::new(SimHwptHandle::new(Arc::clone(iommu), id, name)) as Arc<dyn HwptDirty>
        });
        Ok(SimDevice {
            seed,
            shared,
            core: Mutex::new(core),
            dma,
            hwpt: hwpt_handle,
            spec,
            p2p_peers: Mutex::default(),
            p2p_writer_started: AtomicBool::new(false),
        })
    }

    pub fn spec(&self) -> &SimSpec {
        &self.spec
    }

    /// Arms a fault from now on (in addition to the configured ones).
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).inject(fault);
    }

    /// Makes `peers` (the other devices of this device's VM) the targets of its P2P DMA
    /// writes, and starts its writer thread if its spec asks for P2P writes
    /// (`p2p_writes_per_second`). Calling it again replaces the peers.
    pub fn connect_p2p(self: &Arc<Self>, peers: &[Arc<SimDevice>]) {
        *lock(&self.p2p_peers) = peers.iter().filter(|p| !Arc::ptr_eq(p, self)).map(Arc::downgrade).collect();
        let rate = self.spec.p2p_writes_per_second;
        if rate == 0 || self.p2p_writer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::downgrade(self);
        let interval = Duration::from_nanos((1_000_000_000 / rate).max(1));
        let spawned =
            std::thread::Builder::new().name(format!("sim-p2p-{}", self.spec.name)).spawn(move || {
                let mut next = 0usize;
                loop {
                    std::thread::sleep(interval);
                    let Some(device) = me.upgrade() else { return };
                    device.p2p_write(&mut next);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(device = %self.spec.name, error = %e, "cannot start the simulated P2P DMA writer");
            self.p2p_writer_started.store(false, Ordering::Release);
        }
    }

    /// One P2P write into the next peer, if the device may initiate one now.
    fn p2p_write(&self, next: &mut usize) {
        let peers: Vec<Arc<SimDevice>> = lock(&self.p2p_peers).iter().filter_map(Weak::upgrade).collect();
        if peers.is_empty() {
            return;
        }
        let _gate = self.shared.p2p.gate();
        if !self.shared.state().may_initiate_p2p() {
            return;
        }
        let peer = &peers[*next % peers.len()];
        *next = next.wrapping_add(1);
        peer.shared.receive_p2p(&self.spec.name);
    }

    /// P2P DMA writes this device received: (taken while running, arrived while stopped
    /// and corrupting it).
    pub fn p2p_writes_received(&self) -> (u64, u64) {
        self.shared.p2p.totals()
    }

    /// Disarms every fault, configured or injected.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Lets the running device change `events` pages of its state now, on top of
    /// `dirty_rate` (deterministic, for tests). Fails with the current state when the
    /// device is not running (RUNNING, PRE_COPY or their P2P states): a stopped device never changes.
    pub fn dirty_state(&self, events: u64) -> Result<StateId, State> {
        let mut core = lock(&self.core);
        self.tick(&mut core);
        if !core.state.is_running() {
            return Err(core.state);
        }
        apply_dirty(&mut core, events);
        Ok(core.image.id())
    }

    /// A DMA write by the device to `[iova, iova + length)`: logged if DMA logging is
    /// on and the range is logged, and dirtying its HWPT if that tracks and maps the range
    /// (in any state: tests decide when the device writes).
    pub fn dma_write(&self, iova: u64, length: u64) {
        let mut core = lock(&self.core);
        self.tick(&mut core);
        self.dma.write(iova, length);
    }

    pub fn dma_logging_active(&self) -> bool {
        self.dma.logging_active()
    }

    /// The current state, cheaply.
    pub fn state_id(&self) -> StateId {
        let mut core = lock(&self.core);
        self.tick(&mut core);
        core.image.id()
    }

    /// The current state and a CRC-32C over all its bytes (generated: O(state_size)).
    pub fn state_digest(&self) -> StateDigest {
        let image = {
            let mut core = lock(&self.core);
            self.tick(&mut core);
            core.image.clone()
        };
        image.digest()
    }

    /// The state the last successful RESUMING→STOP loaded; `None` before any load and
    /// after a reset.
    pub fn loaded_state(&self) -> Option<StateId> {
        lock(&self.core).loaded
    }

    /// Every line of this device's arc log kept in memory (the newest 65536).
    pub fn arc_log(&self) -> Vec<ArcLogEntry> {
        self.shared.arc_log.entries()
    }

    /// The arcs walked, in order (the arc log without resets and faults).
    pub fn arcs(&self) -> Vec<fsm::Arc> {
        self.arc_log().iter().filter_map(ArcLogEntry::arc).collect()
    }

    fn err(&self, op: Op, errno: Errno) -> DeviceError {
        DeviceError::os(&self.spec.name, op, errno)
    }

    fn log_faults(&self, state: State, fired: &Fired) {
        for what in &fired.descriptions {
            self.shared.arc_log.record(state, ArcEvent::Fault(what.clone()));
        }
    }

    /// Faults armed on a whole operation (stall, then errno). Stalls sleep without the
    /// device lock, so a stalled ioctl does not hold up unrelated ones.
    fn op_faults(&self, op: FaultOp, uapi: Op) -> Result<(), DeviceError> {
        let state = self.shared.state();
        let fired = lock(&self.shared.faults).on_op(op, state);
        self.log_faults(state, &fired);
        if !fired.stall.is_zero() {
            std::thread::sleep(fired.stall);
        }
        match fired.errno {
            Some(errno) => Err(self.err(uapi, errno).with_detail("injected fault")),
            None => Ok(()),
        }
    }

    fn migration_unsupported(&self, op: Op) -> Result<(), DeviceError> {
        if self.spec.caps.is_migratable() {
            Ok(())
        } else {
            Err(self.err(op, Errno::ENOTTY).with_detail("the driver has no migration support"))
        }
    }

    fn logging_unsupported(&self, op: Op) -> Result<(), DeviceError> {
        if self.spec.dma_logging.supported {
            Ok(())
        } else {
            Err(self.err(op, Errno::ENOTTY).with_detail("the driver has no DMA logging"))
        }
    }

    /// Brings the device's time-driven behaviour up to now: state pages and DMA writes
    /// change only while it runs.
    fn tick(&self, core: &mut Core) {
        self.dma.tick();
        Self::apply_p2p(core, &mut self.shared.p2p.inbox());
        let now = Instant::now();
        let elapsed = now.duration_since(core.last_tick);
        core.last_tick = now;
        if !core.state.is_running() {
            return;
        }
        if self.spec.dirty_rate > 0 {
            core.dirty_carry += elapsed.as_nanos() * u128::from(self.spec.dirty_rate);
            let per_event = 1_000_000_000u128 * u128::from(STATE_PAGE);
            let events = (core.dirty_carry / per_event) as u64;
            core.dirty_carry %= per_event;
            apply_dirty(core, events);
        }
    }

    /// Applies the P2P writes received since the last call: the accepted ones change
    /// state pages the way the device's own work does (dirty for PRE_COPY); the
    /// corrupting ones change pages behind its dirty tracking.
    fn apply_p2p(core: &mut Core, inbox: &mut p2p::Inbox) {
        apply_dirty(core, std::mem::take(&mut inbox.accepted));
        for _ in 0..std::mem::take(&mut inbox.corrupting) {
            if core.image.dirty_one().is_none() {
                break;
            }
        }
    }

    fn enter(&self, core: &mut Core, to: State) {
        let from = core.state;
        core.state = to;
        self.shared.set_state(to);
        self.shared.arc_log.record(from, ArcEvent::Arc(to));
    }

    fn disable_sessions(core: &mut Core) {
        if let Some(session) = core.saving.take() {
            session.disable();
        }
        if let Some(session) = core.resuming.take() {
            session.disable();
        }
    }

    /// Dirty pages as PAGES runs with their current versions; the dirty set is emptied.
    fn cut_dirty(core: &mut Core) -> Vec<(u64, Vec<u64>)> {
        let runs = core
            .dirty
            .runs(MAX_RUN)
            .into_iter()
            .map(|(first, count)| {
                (first, core.image.versions[first as usize..(first + u64::from(count)) as usize].to_vec())
            })
            .collect();
        core.dirty.clear();
        runs
    }

    /// One arc of a SET, with its faults and session effects.
    fn walk(&self, core: &mut Core, arc: fsm::Arc, target: State) -> Result<Option<DataFd>, DeviceError> {
        let op = Op::SetState(target);
        let fired = lock(&self.shared.faults).on_arc(arc);
        self.log_faults(core.state, &fired);
        if !fired.stall.is_zero() {
            // The driver holds its state mutex through a slow arc.
            std::thread::sleep(fired.stall);
        }
        if let Some(errno) = fired.errno {
            return Err(self
                .err(op, errno)
                .with_detail(format!("injected on the arc {} -> {}", arc.from, arc.to)));
        }
        if fired.fall_into_error {
            Self::disable_sessions(core);
            self.enter(core, State::Error);
            return Err(self
                .err(op, Errno::EIO)
                .with_detail(format!("injected: the arc {} -> {} fell into ERROR", arc.from, arc.to)));
        }
        // The arc completes this device's outstanding P2P writes (the gate) and takes
        // every write that reached it so far; writes arriving while it walks wait for its
        // new state.
        let _gate = self.shared.p2p.gate();
        let mut inbox = self.shared.p2p.inbox();
        Self::apply_p2p(core, &mut inbox);
        let mut opened = None;
        match (arc.from, arc.to) {
            (State::Stop, State::StopCopy) => opened = Some(self.open_saving(core, arc.to, true, op)?),
            (State::Running, State::PreCopy) | (State::RunningP2p, State::PreCopyP2p) => {
                opened = Some(self.open_saving(core, arc.to, false, op)?)
            }
            (State::PreCopy | State::PreCopyP2p, State::StopCopy) => {
                let runs = Self::cut_dirty(core);
                if let Some(session) = &core.saving {
                    session.append_pages(runs);
                    session.finish(core.image.generation);
                }
            }
            (State::Stop, State::Resuming) => {
                let compat = Compat { model: self.spec.model.clone(), size: self.spec.state_size };
                let (session, fd) = ResumeSession::open(&self.shared, compat)
                    .map_err(|errno| self.err(op, errno).with_detail("cannot create the resuming data_fd"))?;
                core.resuming = Some(session);
                opened = Some(fd);
            }
            (State::Resuming, State::Stop) => self.load(core, op)?,
            _ => {}
        }
        if arc.ends_saving()
            && let Some(session) = core.saving.take()
        {
            session.disable();
        }
        self.enter(core, arc.to);
        Ok(opened)
    }

    fn open_saving(
        &self,
        core: &mut Core,
        state: State,
        complete: bool,
        op: Op,
    ) -> Result<DataFd, DeviceError> {
        let fired = lock(&self.shared.faults).on_save_session(state);
        self.log_faults(core.state, &fired);
        let faults =
            SaveFaults { short_reads: fired.short_reads, early_eof: fired.early_eof, corrupt: fired.corrupt };
        if let Some(old) = core.saving.take() {
            old.disable();
        }
        core.dirty.clear();
        let start = SaveStart {
            image: &core.image,
            model: &self.spec.model,
            complete,
            precopy_end: self.spec.precopy_end,
            faults,
        };
        let (session, fd) = SaveSession::open(&self.shared, start)
            .map_err(|errno| self.err(op, errno).with_detail("cannot create the saving data_fd"))?;
        core.saving = Some(session);
        Ok(fd)
    }

    /// RESUMING→STOP: the driver loads what it received, or refuses and stays.
    fn load(&self, core: &mut Core, op: Op) -> Result<(), DeviceError> {
        let Some(session) = core.resuming.clone() else {
            return Err(self.err(op, Errno::EINVAL).with_detail("no resume session"));
        };
        match session.finish() {
            Ok(image) => {
                session.disable();
                core.resuming = None;
                core.loaded = Some(image.id());
                core.dirty = DirtyPages::new(page_count(image.size));
                core.image = image;
                Ok(())
            }
            Err(LoadError::Invalid(why)) => {
                Err(self.err(op, Errno::EINVAL).with_detail(format!("resume stream rejected: {why}")))
            }
            Err(LoadError::Truncated { received }) => Err(self
                .err(op, Errno::EINVAL)
                .with_detail(format!("resume stream incomplete: {received} bytes received, no END record"))),
            Err(LoadError::Gone) => {
                Err(self.err(op, Errno::EIO).with_detail("the resume session thread is gone"))
            }
        }
    }
}

fn apply_dirty(core: &mut Core, events: u64) {
    for _ in 0..events {
        match core.image.dirty_one() {
            Some(page) => core.dirty.insert(page),
            None => return,
        }
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        Self::disable_sessions(&mut lock(&self.core));
    }
}

impl fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDevice")
            .field("name", &self.spec.name)
            .field("model", &self.spec.model)
            .field("caps", &self.spec.caps)
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

impl MigrationDevice for SimDevice {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn dirty_tracking_hwpt(&self) -> Option<Arc<dyn HwptDirty>> {
        self.hwpt.clone()
    }

    fn content_digest(&self) -> Option<String> {
        let d = self.state_digest();
        Some(format!(
            "seed={:#x} generation={} size={} crc32c={:08x}",
            d.id.seed, d.id.generation, d.id.size, d.crc32c
        ))
    }

    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity { driver: DRIVER.to_string(), model: self.spec.model.clone() }
    }

    fn caps(&self) -> Result<Caps, DeviceError> {
        self.op_faults(FaultOp::ProbeMigration, Op::ProbeMigration)?;
        self.migration_unsupported(Op::ProbeMigration)?;
        Ok(self.spec.caps)
    }

    fn state(&self) -> Result<State, DeviceError> {
        self.op_faults(FaultOp::GetState, Op::GetState)?;
        self.migration_unsupported(Op::GetState)?;
        Ok(lock(&self.core).state)
    }

    fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError> {
        self.migration_unsupported(Op::SetState(target))?;
        let mut core = lock(&self.core);
        self.tick(&mut core);
        let arcs = plan_set(&self.spec.name, self.spec.caps, core.state, target)
            .map_err(|err| err.with_state_after(Some(core.state)))?;
        let mut opened = None;
        for arc in arcs {
            opened =
                self.walk(&mut core, arc, target).map_err(|err| err.with_state_after(Some(core.state)))?;
        }
        Ok(opened)
    }

    fn data_size(&self) -> Result<u64, DeviceError> {
        self.op_faults(FaultOp::DataSize, Op::DataSize)?;
        self.migration_unsupported(Op::DataSize)?;
        Ok(stream::full_stream_len(&self.spec.model, self.spec.state_size))
    }

    fn precopy_info(&self, data_fd: &DataFd) -> Result<PrecopyInfo, DeviceError> {
        let op = Op::PrecopyInfo;
        self.op_faults(FaultOp::PrecopyInfo, op)?;
        if !self.spec.caps.has_pre_copy() {
            return Err(self
                .err(op, Errno::ENOTTY)
                .with_detail("the driver has no PRE_COPY: its data_fd has no ioctl"));
        }
        let Some(ops) = data_fd.ops().filter(|_| data_fd.direction() == Direction::Saving) else {
            return Err(self
                .err(op, Errno::ENOTTY)
                .with_detail("not a saving data_fd of a simulated device"));
        };
        let mut core = lock(&self.core);
        self.tick(&mut core);
        if !matches!(core.state, State::PreCopy | State::PreCopyP2p) {
            return Err(self.err(op, Errno::EINVAL).with_detail(format!("the device is in {}", core.state)));
        }
        let Some(session) = core.saving.clone().filter(|s| s.is(ops)) else {
            return Err(self.err(op, Errno::ENODEV).with_detail("not the device's open saving session"));
        };
        let before = session.progress();
        let initial_bytes = before.initial_end.saturating_sub(before.consumed);
        if initial_bytes == 0 && before.consumed == before.queued && !core.dirty.is_empty() {
            // Drained: like mlx5, the query starts the next incremental save.
            session.append_pages(Self::cut_dirty(&mut core));
        }
        let now = session.progress();
        let size = core.image.size;
        let uncommitted: u64 = core
            .dirty
            .runs(MAX_RUN)
            .into_iter()
            .map(|(first, count)| stream::pages_record_len(size, first, count))
            .sum();
        let committed = now.queued.saturating_sub(now.consumed.max(now.initial_end));
        Ok(PrecopyInfo { initial_bytes, dirty_bytes: committed + uncommitted, reinit: false })
    }

    fn dma_logging_supported(&self) -> Result<bool, DeviceError> {
        self.op_faults(FaultOp::ProbeDmaLogging, Op::ProbeDmaLogging)?;
        Ok(self.spec.dma_logging.supported)
    }

    fn dma_logging_start(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, DeviceError> {
        let op = Op::DmaLoggingStart;
        self.op_faults(FaultOp::DmaLoggingStart, op)?;
        self.logging_unsupported(op)?;
        let mut core = lock(&self.core);
        self.tick(&mut core);
        self.dma.start_logging(ranges, page_size).map_err(|(errno, why)| self.err(op, errno).with_detail(why))
    }

    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        self.op_faults(FaultOp::DmaLoggingStop, Op::DmaLoggingStop)?;
        self.logging_unsupported(Op::DmaLoggingStop)?;
        let mut core = lock(&self.core);
        self.tick(&mut core);
        self.dma.stop_logging();
        Ok(())
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let op = Op::DmaLoggingReport;
        self.op_faults(FaultOp::DmaLoggingReport, op)?;
        self.logging_unsupported(op)?;
        let mut core = lock(&self.core);
        self.tick(&mut core);
        self.dma
            .report_logging(iova, length, page_size, bitmap)
            .map_err(|(errno, why)| self.err(op, errno).with_detail(why))
    }

    fn reset(&self) -> Result<(), DeviceError> {
        self.op_faults(FaultOp::Reset, Op::Reset)?;
        let mut core = lock(&self.core);
        self.tick(&mut core);
        Self::disable_sessions(&mut core);
        let from = core.state;
        core.state = State::Running;
        self.shared.set_state(State::Running);
        core.image = Image::power_on(self.seed, self.spec.state_size);
        core.dirty = DirtyPages::new(page_count(self.spec.state_size));
        core.dirty_carry = 0;
        core.loaded = None;
        self.shared.p2p.reset();
        self.dma.stop_logging();
        self.shared.arc_log.record(from, ArcEvent::Reset);
        Ok(())
    }
}
