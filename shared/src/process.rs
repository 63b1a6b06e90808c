//! Child processes that do not outlive the program that started them.
//!
//! Modules 5 and 6 start helpers — a private etcd, worker processes — and
//! stop them on the way out. That covers a clean exit and Ctrl-C, but not a
//! parent killed outright (SIGKILL, an OOM kill): nothing of the parent runs
//! then, and its children would go on serving, holding ports and memory.
//! Linux lets a child ask for a signal when its parent dies
//! (`PR_SET_PDEATHSIG`); [`stop_with_parent`] asks for SIGTERM, the signal
//! the workers already treat as "leave the registry and exit".

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child that `command` spawns receive SIGTERM when its parent
/// dies. "Parent" is the *thread* that spawns it, so spawn from a thread
/// that lives as long as the child should (a program's main thread, a
/// test's thread), not from a short-lived helper thread.
pub fn stop_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and makes
    // one async-signal-safe system call.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
