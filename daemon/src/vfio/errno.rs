//! Every errno the kernel documents for the migration uAPI, classified by what the
//! daemon must do about it. The engine decides by [`ErrorKind`], never by number.

use std::fmt;

use nix::errno::Errno;

/// What an errno from a VFIO device, its data_fd or iommufd means to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// ENOTTY / EOPNOTSUPP: the device or kernel lacks the feature; a capability answer,
    /// not a failure of the device.
    Unsupported,
    /// EINVAL: refused request — an arc the FSM does not allow, an unsupported target
    /// state, a sequencing error (REPORT before START, PRECOPY_INFO outside PRE_COPY), a
    /// second logging session, or a resume stream the driver found incomplete.
    InvalidRequest,
    /// E2BIG: more DMA-logging ranges than the kernel accepts.
    TooManyRanges,
    /// EOVERFLOW: a range or report end overflows.
    Overflow,
    /// EEXIST: the device holds a stale session (pds logging); stop it and retry.
    AlreadyActive,
    /// ENODEV / ENOTCONN / ENXIO: the device or the session behind a data_fd is gone.
    Gone,
    /// EIO: the device failed internally; it needs a reset.
    DeviceFailure,
    /// ENOMSG: temporary end of a PRE_COPY stream; more data may come later.
    NoDataYet,
    /// EAGAIN / EBUSY: try again (non-blocking data_fd, reset lock contention).
    Busy,
    /// EINTR: interrupted; retry.
    Interrupted,
    /// ENOMEM: the driver refused more resume data than its maximum image, or is out of
    /// memory: the stream is corrupt or incompatible.
    StreamTooLarge,
    /// EFAULT: the driver rejected resume data as incompatible (hisi, mtty), or a user
    /// buffer could not be pinned.
    StreamRejected,
    /// EMFILE / ENFILE: no fd could be installed; the device may already have moved.
    FdExhausted,
    /// EBADF / ESPIPE: the fd was used the wrong way (wrong direction, seek on a stream).
    BadFdUse,
    /// EPERM / EACCES: not allowed to open or use the device.
    PermissionDenied,
    /// ENOENT: no such device node, group or iommufd object.
    NotFound,
    /// Anything the kernel does not document for these calls.
    Other,
}

impl ErrorKind {
    pub fn classify(errno: Errno) -> ErrorKind {
        match errno {
            Errno::ENOTTY | Errno::EOPNOTSUPP => ErrorKind::Unsupported,
            Errno::EINVAL => ErrorKind::InvalidRequest,
            Errno::E2BIG => ErrorKind::TooManyRanges,
            Errno::EOVERFLOW => ErrorKind::Overflow,
            Errno::EEXIST => ErrorKind::AlreadyActive,
            Errno::ENODEV | Errno::ENOTCONN | Errno::ENXIO => ErrorKind::Gone,
            Errno::EIO => ErrorKind::DeviceFailure,
            Errno::ENOMSG => ErrorKind::NoDataYet,
            Errno::EAGAIN | Errno::EBUSY => ErrorKind::Busy,
            Errno::EINTR => ErrorKind::Interrupted,
            Errno::ENOMEM => ErrorKind::StreamTooLarge,
            Errno::EFAULT => ErrorKind::StreamRejected,
            Errno::EMFILE | Errno::ENFILE => ErrorKind::FdExhausted,
            Errno::EBADF | Errno::ESPIPE => ErrorKind::BadFdUse,
            Errno::EPERM | Errno::EACCES => ErrorKind::PermissionDenied,
            Errno::ENOENT => ErrorKind::NotFound,
            _ => ErrorKind::Other,
        }
    }

    /// Whether repeating the same call unchanged can succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Busy | ErrorKind::Interrupted | ErrorKind::NoDataYet)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidRequest => "invalid request",
            ErrorKind::TooManyRanges => "too many ranges",
            ErrorKind::Overflow => "range overflow",
            ErrorKind::AlreadyActive => "already active",
            ErrorKind::Gone => "device or session gone",
            ErrorKind::DeviceFailure => "device failure",
            ErrorKind::NoDataYet => "no data yet",
            ErrorKind::Busy => "busy",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::StreamTooLarge => "stream larger than the device accepts",
            ErrorKind::StreamRejected => "stream rejected by the driver",
            ErrorKind::FdExhausted => "no free file descriptor",
            ErrorKind::BadFdUse => "wrong use of a file descriptor",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::NotFound => "not found",
            ErrorKind::Other => "unexpected error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno catalogue of the kernel reference (§2.6), row by row.
    #[test]
    fn every_documented_errno_is_classified() {
        let table = [
            (Errno::ENOTTY, ErrorKind::Unsupported),
            (Errno::EOPNOTSUPP, ErrorKind::Unsupported),
            (Errno::EINVAL, ErrorKind::InvalidRequest),
            (Errno::E2BIG, ErrorKind::TooManyRanges),
            (Errno::EOVERFLOW, ErrorKind::Overflow),
            (Errno::EEXIST, ErrorKind::AlreadyActive),
            (Errno::ENOTCONN, ErrorKind::Gone),
            (Errno::ENODEV, ErrorKind::Gone),
            (Errno::ENXIO, ErrorKind::Gone),
            (Errno::EIO, ErrorKind::DeviceFailure),
            (Errno::ENOMSG, ErrorKind::NoDataYet),
            (Errno::EAGAIN, ErrorKind::Busy),
            (Errno::EBUSY, ErrorKind::Busy),
            (Errno::EINTR, ErrorKind::Interrupted),
            (Errno::ESPIPE, ErrorKind::BadFdUse),
            (Errno::EBADF, ErrorKind::BadFdUse),
            (Errno::ENOMEM, ErrorKind::StreamTooLarge),
            (Errno::EFAULT, ErrorKind::StreamRejected),
            (Errno::EMFILE, ErrorKind::FdExhausted),
            (Errno::ENFILE, ErrorKind::FdExhausted),
            (Errno::EPERM, ErrorKind::PermissionDenied),
            (Errno::EACCES, ErrorKind::PermissionDenied),
            (Errno::ENOENT, ErrorKind::NotFound),
        ];
        for (errno, kind) in table {
            assert_eq!(ErrorKind::classify(errno), kind, "{errno}");
        }
        assert_eq!(ErrorKind::classify(Errno::EXDEV), ErrorKind::Other);
        assert!(ErrorKind::Busy.is_transient());
        assert!(!ErrorKind::InvalidRequest.is_transient());
    }
}
