//! A recording, scripted kernel behind the syscall seam, for unit tests.
//!
//! Every call is recorded with the bytes it carried *before* the kernel answered, so tests
//! assert the exact request numbers and argument encodings. Answers come from a closure the
//! test supplies (or from [`FakeVfioDevice`], a small kernel-like migratable device). Opens
//! that the closure accepts return real descriptors on `/dev/null`, and fds the fake hands
//! out through ioctls are real pipes, so ownership and closing work as with the kernel.
//!
//! Embedded user pointers (DMA-logging ranges and bitmaps) are followed by the tests that
//! need them, inside this module tree, exactly as `copy_from_user`/`copy_to_user` would.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::OFlag;

use super::syscalls::{IoctlArg, Syscalls};
use super::uapi::*;
use crate::fsm::{self, Caps, State};

/// What a recorded ioctl carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    None,
    Value(u64),
    Bytes(Vec<u8>),
}

/// One recorded system call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Open { path: PathBuf, fd: Option<RawFd> },
    Ioctl { fd: RawFd, request: u64, sent: Sent },
    Pread { fd: RawFd, offset: u64, len: usize },
    Pwrite { fd: RawFd, offset: u64, data: Vec<u8> },
}

impl Call {
    /// The bytes of an ioctl's buffer argument as sent.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Call::Ioctl { sent: Sent::Bytes(bytes), .. } => bytes,
            other => panic!("not a buffer ioctl: {other:?}"),
        }
    }

    pub(crate) fn request(&self) -> Option<u64> {
        match self {
            Call::Ioctl { request, .. } => Some(*request),
            _ => None,
        }
    }

    /// The feature flag word, for a `VFIO_DEVICE_FEATURE` call.
    pub(crate) fn feature_flags(&self) -> Option<u32> {
        match self {
            Call::Ioctl { request: VFIO_DEVICE_FEATURE, sent: Sent::Bytes(b), .. } => Some(u32_at(b, 4)),
            _ => None,
        }
    }
}

/// A system call as the fake kernel's answer closure sees it.
#[allow(dead_code, reason = "each test matches on the fields it needs")]
pub(crate) enum Syscall<'s> {
    Open { path: &'s Path },
    Ioctl { fd: RawFd, request: u64, arg: IoctlArg<'s> },
    Pread { fd: RawFd, offset: u64, buf: &'s mut [u8] },
    Pwrite { fd: RawFd, offset: u64, data: &'s [u8] },
}

type Answer = Box<dyn FnMut(Syscall<'_>) -> Result<i32, Errno> + Send>;

pub(crate) struct FakeKernel {
    calls: Mutex<Vec<Call>>,
    answer: Mutex<Answer>,
}

impl fmt::Debug for FakeKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeKernel").field("calls", &self.calls.lock().unwrap().len()).finish()
    }
}

impl FakeKernel {
    pub(crate) fn new(answer: impl FnMut(Syscall<'_>) -> Result<i32, Errno> + Send + 'static) -> FakeKernel {
        FakeKernel { calls: Mutex::new(Vec::new()), answer: Mutex::new(Box::new(answer)) }
    }

    /// A fake kernel in front of one [`FakeVfioDevice`].
    pub(crate) fn with_device(mut device: FakeVfioDevice) -> FakeKernel {
        FakeKernel::new(move |call| device.answer(call))
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub(crate) fn ioctls(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| matches!(c, Call::Ioctl { .. })).collect()
    }

    pub(crate) fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }

    fn record(&self, call: Call) -> usize {
        let mut calls = self.calls.lock().unwrap();
        calls.push(call);
        calls.len() - 1
    }
}

// SAFETY: the fake touches only the argument buffer and, in tests that model pointer-taking
// requests, the user memory those requests document; fds it returns are fresh descriptors
// (`fresh_fd`, `pipe_read_end`) whose ownership it gives up.
unsafe impl Syscalls for FakeKernel {
    fn open(&self, path: &Path, _flags: OFlag) -> Result<OwnedFd, Errno> {
        let index = self.record(Call::Open { path: path.to_path_buf(), fd: None });
        (self.answer.lock().unwrap())(Syscall::Open { path })?;
        let fd =
            nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())?;
        if let Call::Open { fd: recorded, .. } = &mut self.calls.lock().unwrap()[index] {
            *recorded = Some(fd.as_raw_fd());
        }
        Ok(fd)
    }

    unsafe fn ioctl(&self, fd: BorrowedFd<'_>, request: u64, arg: IoctlArg<'_>) -> Result<i32, Errno> {
        let fd = fd.as_raw_fd();
        let sent = match &arg {
            IoctlArg::None => Sent::None,
            IoctlArg::Value(v) => Sent::Value(*v),
            IoctlArg::Buffer(b) => Sent::Bytes(b.to_vec()),
        };
        self.record(Call::Ioctl { fd, request, sent });
        (self.answer.lock().unwrap())(Syscall::Ioctl { fd, request, arg })
    }

    fn pread(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
        let fd = fd.as_raw_fd();
        self.record(Call::Pread { fd, offset, len: buf.len() });
        let n = (self.answer.lock().unwrap())(Syscall::Pread { fd, offset, buf })?;
        Ok(usize::try_from(n).unwrap())
    }

    fn pwrite(&self, fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<usize, Errno> {
        let fd = fd.as_raw_fd();
        self.record(Call::Pwrite { fd, offset, data: data.to_vec() });
        let n = (self.answer.lock().unwrap())(Syscall::Pwrite { fd, offset, data })?;
        Ok(usize::try_from(n).unwrap())
    }
}

pub(crate) fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

pub(crate) fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_ne_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

pub(crate) fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

pub(crate) fn put_i32(bytes: &mut [u8], offset: usize, value: i32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

pub(crate) fn put_u64(bytes: &mut [u8], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

/// A new descriptor whose ownership the caller hands to the code under test (as the kernel
/// does with the fd `VFIO_GROUP_GET_DEVICE_FD` returns).
pub(crate) fn fresh_fd() -> RawFd {
    nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
        .unwrap()
        .into_raw_fd()
}

/// A data_fd stand-in: the read end of a pipe whose write end holds `stream` and is closed,
/// so reading it yields the stream then EOF, like a STOP_COPY data_fd.
pub(crate) fn pipe_read_end(stream: &[u8]) -> RawFd {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    assert_eq!(nix::unistd::write(w.as_fd(), stream).unwrap(), stream.len());
    drop(w);
    r.into_raw_fd()
}

/// A kernel-like migratable VFIO device, enough to drive the handle's logic: a viable
/// group in a type1v2-capable container, GET_INFO, MIGRATION, MIG_DEVICE_STATE (walking the
/// FSM, opening a session fd on the arcs that do), MIG_DATA_SIZE, PRECOPY_INFO, PROBE and
/// RESET. Anything else is ENOTTY.
pub(crate) struct FakeVfioDevice {
    pub(crate) caps: u64,
    pub(crate) state: State,
    /// The stream a saving session's fd yields.
    pub(crate) stream: Vec<u8>,
    /// Makes the next SET fail with this errno, leaving the device in this state.
    pub(crate) fail_next_set: Option<(Errno, State)>,
    /// Features a PROBE succeeds for (index).
    pub(crate) probe_ok: Vec<u32>,
    /// (initial, dirty, flags) answered by PRECOPY_INFO.
    pub(crate) precopy: (u64, u64, u32),
}

impl FakeVfioDevice {
    pub(crate) fn new(caps: Caps, state: State) -> FakeVfioDevice {
        FakeVfioDevice {
            caps: caps.bits(),
            state,
            stream: b"device-state".to_vec(),
            fail_next_set: None,
            probe_ok: Vec::new(),
            precopy: (0, 0, 0),
        }
    }

    pub(crate) fn answer(&mut self, call: Syscall<'_>) -> Result<i32, Errno> {
        match call {
            Syscall::Open { .. } => Ok(0),
            Syscall::Ioctl {
                request: VFIO_GET_API_VERSION | VFIO_GROUP_SET_CONTAINER | VFIO_SET_IOMMU,
                ..
            } => Ok(0),
            Syscall::Ioctl { request: VFIO_CHECK_EXTENSION, arg: IoctlArg::Value(ext), .. } => {
                Ok(i32::from(ext == u64::from(VFIO_TYPE1V2_IOMMU)))
            }
            Syscall::Ioctl { request: VFIO_GROUP_GET_STATUS, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 4, VFIO_GROUP_FLAGS_VIABLE);
                Ok(0)
            }
            Syscall::Ioctl { request: VFIO_GROUP_GET_DEVICE_FD, .. } => Ok(fresh_fd()),
            Syscall::Ioctl { request: VFIO_DEVICE_GET_INFO, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 4, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
                put_u32(b, 8, 9);
                put_u32(b, 12, 5);
                Ok(0)
            }
            Syscall::Ioctl { request: VFIO_DEVICE_RESET, .. } => {
                self.state = State::Running;
                Ok(0)
            }
            Syscall::Ioctl { request: VFIO_MIG_GET_PRECOPY_INFO, arg: IoctlArg::Buffer(b), .. } => {
                if !matches!(self.state, State::PreCopy | State::PreCopyP2p) {
                    return Err(Errno::EINVAL);
                }
                put_u64(b, 8, self.precopy.0);
                put_u64(b, 16, self.precopy.1);
                put_u32(b, 4, self.precopy.2);
                Ok(0)
            }
            Syscall::Ioctl { request: VFIO_DEVICE_FEATURE, arg: IoctlArg::Buffer(b), .. } => self.feature(b),
            _ => Err(Errno::ENOTTY),
        }
    }

    fn feature(&mut self, b: &mut [u8]) -> Result<i32, Errno> {
        let flags = u32_at(b, 4);
        let index = flags & VFIO_DEVICE_FEATURE_MASK;
        if flags & VFIO_DEVICE_FEATURE_PROBE != 0 {
            return if self.probe_ok.contains(&index) { Ok(0) } else { Err(Errno::ENOTTY) };
        }
        let get = flags & VFIO_DEVICE_FEATURE_GET != 0;
        match index {
            VFIO_DEVICE_FEATURE_MIGRATION if get => {
                put_u64(b, 8, self.caps);
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_MIG_DATA_SIZE if get => {
                put_u64(b, 8, self.stream.len() as u64);
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if get => {
                put_u32(b, 8, self.state.as_raw());
                put_i32(b, 12, -1);
                Ok(0)
            }
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
                let raw = u32_at(b, 8);
                put_i32(b, 12, -1);
                if let Some((errno, left_in)) = self.fail_next_set.take() {
                    self.state = left_in;
                    return Err(errno);
                }
                let target = State::from_raw(raw).ok_or(Errno::EINVAL)?;
                let arcs =
                    fsm::path(Caps::from_bits(self.caps), self.state, target).map_err(|_| Errno::EINVAL)?;
                self.state = target;
                if fsm::session_of(&arcs) != fsm::Session::None {
                    put_i32(b, 12, pipe_read_end(&self.stream));
                }
                Ok(0)
            }
            _ => Err(Errno::ENOTTY),
        }
    }
}

/// Reads `count` values of `T` at a user pointer carried inside an ioctl argument.
///
/// # Safety
///
/// `addr` must point to `count` initialised `T`s that stay alive and unaliased by writers
/// for the duration of the call (the code under test keeps them alive across its ioctl).
pub(crate) unsafe fn read_user<T: Copy>(addr: u64, count: usize) -> Vec<T> {
    let ptr = addr as usize as *const T;
    assert!(!ptr.is_null() && ptr.is_aligned(), "bad user pointer {addr:#x}");
    // SAFETY: the caller guarantees `count` live, initialised `T`s at `ptr`.
    unsafe { std::slice::from_raw_parts(ptr, count) }.to_vec()
}

/// Sets bit `bit` of the u64 bitmap at a user pointer, as `iova_bitmap_set` does.
///
/// # Safety
///
/// `addr` must point to at least `bit / 64 + 1` u64 words that the code under test lends
/// the kernel for the duration of the call.
pub(crate) unsafe fn set_user_bit(addr: u64, bit: u64) {
    let ptr = addr as usize as *mut u64;
    assert!(!ptr.is_null() && ptr.is_aligned(), "bad user pointer {addr:#x}");
    // SAFETY: the caller guarantees the word is inside the lent bitmap.
    unsafe { *ptr.add((bit / 64) as usize) |= 1 << (bit % 64) };
}

/// A kernel-like iommufd for HWPT dirty tracking, behind [`FakeKernel`]: BIND hands out
/// device ids, IOAS_ALLOC and HWPT_ALLOC object ids, HW_INFO reports the dirty capability,
/// ATTACH_PT keeps the id it was given. SET_DIRTY_TRACKING and GET_DIRTY_BITMAP check what
/// iommufd checks (struct size, flags, `__reserved`, the id, overflow, alignment to the
/// 4 KiB IOMMU page and to `page_size`), keep a set of dirty IOMMU pages per HWPT, clear
/// it on enable, read and clear it (unless NO_CLEAR) through the user pointer, and set
/// nothing while tracking is off. Everything is mapped. Clones share the state, so a test
/// keeps one to make DMA writes while the kernel answers.
#[derive(Clone, Debug, Default)]
pub(crate) struct FakeIommufd {
    state: std::sync::Arc<Mutex<FakeIommufdState>>,
}

#[derive(Debug, Default)]
struct FakeIommufdState {
    last_id: u32,
    /// HWPT id → whether it was allocated with dirty tracking.
    hwpts: std::collections::BTreeMap<u32, FakeHwpt>,
}

#[derive(Debug, Default)]
struct FakeHwpt {
    dirty_ops: bool,
    tracking: bool,
    /// Dirty 4 KiB IOMMU pages, by address.
    dirty: std::collections::BTreeSet<u64>,
}

const FAKE_IOMMU_PAGE: u64 = 4096;

impl FakeIommufd {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeIommufdState> {
        self.state.lock().unwrap()
    }

    /// A DMA write through HWPT `hwpt`: dirties its IOMMU pages while it tracks.
    pub(crate) fn dma_write(&self, hwpt: u32, iova: u64, length: u64) {
        let mut state = self.lock();
        let hwpt = state.hwpts.get_mut(&hwpt).expect("a HWPT of this fake");
        if hwpt.tracking && length > 0 {
            let first = iova / FAKE_IOMMU_PAGE;
            let last = (iova + length - 1) / FAKE_IOMMU_PAGE;
            hwpt.dirty.extend((first..=last).map(|p| p * FAKE_IOMMU_PAGE));
        }
    }

    pub(crate) fn tracking(&self, hwpt: u32) -> bool {
        self.lock().hwpts.get(&hwpt).is_some_and(|h| h.tracking)
    }

    pub(crate) fn answer(&self, call: Syscall<'_>) -> Result<i32, Errno> {
        let Syscall::Ioctl { request, arg: IoctlArg::Buffer(b), .. } = call else {
            return match call {
                Syscall::Open { .. } => Ok(0),
                _ => Err(Errno::ENOTTY),
            };
        };
        let mut state = self.lock();
        match request {
            VFIO_DEVICE_BIND_IOMMUFD | IOMMU_IOAS_ALLOC => {
                state.last_id += 1;
                put_u32(b, if request == IOMMU_IOAS_ALLOC { 8 } else { 12 }, state.last_id);
                Ok(0)
            }
            IOMMU_GET_HW_INFO => {
                put_u64(b, 32, IOMMU_HW_CAP_DIRTY_TRACKING);
                Ok(0)
            }
            IOMMU_HWPT_ALLOC => {
                state.last_id += 1;
                let id = state.last_id;
                let dirty_ops = u32_at(b, 4) & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
                state.hwpts.insert(id, FakeHwpt { dirty_ops, ..FakeHwpt::default() });
                put_u32(b, 16, id);
                Ok(0)
            }
            VFIO_DEVICE_ATTACH_IOMMUFD_PT => Ok(0),
            IOMMU_HWPT_SET_DIRTY_TRACKING => {
                if b.len() != 16 || u32_at(b, 0) != 16 || u32_at(b, 12) != 0 {
                    return Err(Errno::EINVAL);
                }
                let flags = u32_at(b, 4);
                if flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                let hwpt = state.hwpts.get_mut(&u32_at(b, 8)).ok_or(Errno::ENOENT)?;
                if !hwpt.dirty_ops {
                    return Err(Errno::EOPNOTSUPP);
                }
                hwpt.tracking = flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0;
                if hwpt.tracking {
                    hwpt.dirty.clear();
                }
                Ok(0)
            }
            IOMMU_HWPT_GET_DIRTY_BITMAP => {
                if b.len() != 48 || u32_at(b, 0) != 48 {
                    return Err(Errno::EINVAL);
                }
                let flags = u32_at(b, 8);
                if flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || u32_at(b, 12) != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                let hwpt = state.hwpts.get_mut(&u32_at(b, 4)).ok_or(Errno::ENOENT)?;
                let (iova, length, page_size, data) =
                    (u64_at(b, 16), u64_at(b, 24), u64_at(b, 32), u64_at(b, 40));
                let last = iova.checked_add(length.wrapping_sub(1)).ok_or(Errno::EOVERFLOW)?;
                let end = last.wrapping_add(1);
                if !iova.is_multiple_of(FAKE_IOMMU_PAGE) || !end.is_multiple_of(FAKE_IOMMU_PAGE) {
                    return Err(Errno::EINVAL);
                }
                if page_size == 0 || !iova.is_multiple_of(page_size) || !end.is_multiple_of(page_size) {
                    return Err(Errno::EINVAL);
                }
                if !hwpt.dirty_ops {
                    return Err(Errno::EOPNOTSUPP);
                }
                if !hwpt.tracking {
                    return Ok(0);
                }
                let found: Vec<u64> = hwpt.dirty.range(iova..=last).copied().collect();
                for &page in &found {
                    let top = page + FAKE_IOMMU_PAGE - 1;
                    for bit in (page - iova) / page_size..=(top - iova) / page_size {
                        // SAFETY: `data` is the bitmap the code under test lends for this
                        // call; `Iommufd::get_dirty_bitmap` checked that it holds a bit for
                        // every page of `[iova, iova + length)`, and `page` lies inside it.
                        unsafe { set_user_bit(data, bit) };
                    }
                }
                if flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR == 0 {
                    for page in found {
                        hwpt.dirty.remove(&page);
                    }
                }
                Ok(0)
            }
            _ => Err(Errno::ENOTTY),
        }
    }
}
