//! Unmounting: umount(2) as root, `fusermount3 -u` otherwise; when the mount stays busy
//! (a shell sitting in it, a file held open) for [`UNMOUNT_BUSY_RETRY`], a lazy unmount
//! detaches it from the tree and the session ends when the last file closes.
//!
//! [`UNMOUNT_BUSY_RETRY`]: crate::limits::UNMOUNT_BUSY_RETRY

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::limits;
use crate::MountError;

/// Unmounts `mountpoint`, lazily if it stays busy. Not mounted is success.
pub(crate) fn unmount(mountpoint: &Path) -> Result<(), MountError> {
    let err = |source: io::Error| MountError::Unmount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let deadline = Instant::now() + limits::UNMOUNT_BUSY_RETRY;
    loop {
        match rustix::mount::unmount(mountpoint, UnmountFlags::empty()) {
            // EINVAL: not a mount point (any more): unmounted from outside meanwhile.
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => return Ok(()),
            Err(Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(Errno::BUSY) => {
                tracing::warn!(
                    mountpoint = %mountpoint.display(),
                    "mount point busy; detaching it (lazy unmount)"
                );
                return match rustix::mount::unmount(mountpoint, UnmountFlags::DETACH) {
                    Ok(()) | Err(Errno::INVAL) => Ok(()),
                    Err(e) => Err(err(e.into())),
                };
            }
            // Not root: the setuid helper unmounts what this user mounted.
            Err(Errno::PERM) => return fusermount(mountpoint).map_err(err),
            Err(e) => return Err(err(e.into())),
        }
    }
}

fn fusermount(mountpoint: &Path) -> io::Result<()> {
    let run = |lazy: bool| -> io::Result<bool> {
        let mut c = Command::new("fusermount3");
        c.arg(if lazy { "-uz" } else { "-u" })
            .arg("--")
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(c.status()?.success())
    };
    let deadline = Instant::now() + limits::UNMOUNT_BUSY_RETRY;
    while Instant::now() < deadline {
        if run(false)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if run(true)? {
        Ok(())
    } else {
        Err(io::Error::other("fusermount3 -uz failed"))
    }
}
