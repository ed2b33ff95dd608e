//! The only place an `Error` becomes an errno. Refused data is EIO plus one error line naming
//! the record, never wrong bytes.

use fuser::Errno;

use crate::Error;

pub(crate) fn to_errno(e: &Error) -> Errno {
    match e {
        Error::NotFound(_) => Errno::ENOENT,
        Error::Exists(_) => Errno::EEXIST,
        Error::NotEmpty(_) => Errno::ENOTEMPTY,
        Error::NotADirectory(_) => Errno::ENOTDIR,
        Error::IsADirectory(_) => Errno::EISDIR,
        Error::ReadOnlyView => Errno::EROFS,
        Error::Invalid(_) => Errno::EINVAL,
        Error::NameTooLong(_) => Errno::from_i32(libc::ENAMETOOLONG),
        Error::NoAttribute(_) => Errno::from_i32(libc::ENODATA),
        Error::NotPermitted(_) => Errno::EPERM,
        Error::Unsupported(_) => Errno::from_i32(libc::EOPNOTSUPP),
        Error::NoKey(why) => {
            tracing::error!("refusing a read: {why}");
            Errno::EACCES
        }
        Error::Verify(v) => {
            tracing::error!(%v, "refusing unverified data");
            Errno::EIO
        }
        Error::Store(_) | Error::Io { .. } | Error::Replica(_) | Error::Forbidden(_) | Error::OverQuota(_) => {
            tracing::error!(%e, "store failure");
            Errno::EIO
        }
    }
}
