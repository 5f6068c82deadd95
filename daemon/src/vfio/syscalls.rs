//! The syscall seam: the four system calls the kernel boundary makes, behind one trait.
//!
//! [`LinuxSyscalls`] is the real thing. Tests substitute a recording, scripted kernel
//! (`vfio::fake`) that checks the exact request numbers and argument bytes and answers
//! the way the kernel would; that is how the paths no test machine's kernel offers (the
//! iommufd cdev, HWPT dirty tracking, low power, PRECOPY_INFOv2) are verified.
//!
//! Ioctl arguments travel as byte buffers rather than raw pointers so that a fake kernel
//! sees (and can answer into) exactly the bytes the real kernel would copy.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::uapi::Pod;

/// The argument of an ioctl, as the kernel receives it.
#[derive(Debug)]
pub enum IoctlArg<'a> {
    /// No argument (`VFIO_GET_API_VERSION`, `VFIO_DEVICE_RESET`); 0 is passed.
    None,
    /// An integer passed by value (`VFIO_CHECK_EXTENSION`, `VFIO_SET_IOMMU`).
    Value(u64),
    /// A pointer to this buffer, which the kernel reads and may write back.
    Buffer(&'a mut [u8]),
}

/// The system calls the VFIO layer makes.
///
/// # Safety
///
/// Implementors must behave like the Linux kernel with respect to memory and fds: an
/// `ioctl` touches no memory but the argument buffer and the user memory the request's
/// documented semantics name (through pointers inside the buffer); a file descriptor it
/// returns (as its result or inside the buffer, for requests documented to do so) is a
/// fresh descriptor that nothing else in the process owns.
pub unsafe trait Syscalls: Send + Sync + fmt::Debug {
    /// `open(2)`.
    fn open(&self, path: &Path, flags: OFlag) -> Result<OwnedFd, Errno>;

    /// `ioctl(2)`; returns the non-negative result.
    ///
    /// # Safety
    ///
    /// `arg` must be the argument `request` expects on `fd`: for a buffer, at least as long
    /// as the struct the kernel copies in and out, and every user pointer inside it must be
    /// valid for the reads and writes the request performs for the duration of the call.
    unsafe fn ioctl(&self, fd: BorrowedFd<'_>, request: u64, arg: IoctlArg<'_>) -> Result<i32, Errno>;

    /// `pread(2)`.
    fn pread(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno>;

    /// `pwrite(2)`.
    fn pwrite(&self, fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<usize, Errno>;
}

/// The real kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinuxSyscalls;

// SAFETY: every call goes straight to the kernel, which is the behaviour the contract
// describes.
unsafe impl Syscalls for LinuxSyscalls {
    fn open(&self, path: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
        nix::fcntl::open(path, flags, Mode::empty())
    }

    unsafe fn ioctl(&self, fd: BorrowedFd<'_>, request: u64, arg: IoctlArg<'_>) -> Result<i32, Errno> {
        let raw = fd.as_raw_fd();
        // glibc takes `unsigned long`, musl `int`: every VFIO/iommufd request fits either.
        let request = request as libc::Ioctl;
        let ret = match arg {
            // SAFETY: the request takes no argument; the caller vouches for the request.
            IoctlArg::None => unsafe { libc::ioctl(raw, request, 0 as libc::c_ulong) },
            // SAFETY: the request takes an integer by value; the caller vouches for it.
            IoctlArg::Value(value) => unsafe { libc::ioctl(raw, request, value as libc::c_ulong) },
            // SAFETY: the buffer is live and exclusively borrowed for the call, and the caller
            // guarantees it is the struct `request` expects, with valid embedded pointers.
            IoctlArg::Buffer(buf) => unsafe { libc::ioctl(raw, request, buf.as_mut_ptr()) },
        };
        Errno::result(ret)
    }

    fn pread(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
        let offset = i64::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
        nix::sys::uio::pread(fd, buf, offset)
    }

    fn pwrite(&self, fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<usize, Errno> {
        let offset = i64::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
        nix::sys::uio::pwrite(fd, buf, offset)
    }
}

/// The bytes of a uAPI struct, for the kernel to read and write back.
pub(crate) fn bytes_of_mut<T: Pod>(value: &mut T) -> &mut [u8] {
    // SAFETY: `T: Pod` is `#[repr(C)]` plain data without padding, so all its
    // `size_of::<T>()` bytes are initialised and any bytes written back form a valid `T`;
    // the slice borrows `value` exclusively for its lifetime.
    unsafe { std::slice::from_raw_parts_mut((value as *mut T).cast::<u8>(), size_of::<T>()) }
}

/// `ioctl(fd, request, &mut arg)` for a uAPI struct argument.
///
/// # Safety
///
/// `T` must be the struct `request` expects, and every user pointer inside `arg` must be
/// valid for the accesses the request makes during the call.
pub(crate) unsafe fn ioctl_with<T: Pod>(
    sys: &dyn Syscalls,
    fd: BorrowedFd<'_>,
    request: u64,
    arg: &mut T,
) -> Result<i32, Errno> {
    // SAFETY: forwarded from this function's contract; the buffer is all of `arg`.
    unsafe { sys.ioctl(fd, request, IoctlArg::Buffer(bytes_of_mut(arg))) }
}

/// The flags every VFIO and iommufd node is opened with.
pub(crate) const OPEN_RDWR: OFlag = OFlag::O_RDWR.union(OFlag::O_CLOEXEC);
