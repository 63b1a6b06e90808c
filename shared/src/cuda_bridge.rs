//! Calling the C++ bridge in `csrc/` (compiled when libtorch has CUDA).
//!
//! Every bridge function takes an error buffer and returns 0 on success;
//! on failure the buffer holds the C++ exception's message (see
//! `csrc/guarded.h`). [`call`] turns that convention into a `Result`.

use std::ffi::{c_char, c_int, CStr};

/// Calls `f` with a fresh error buffer; the message on failure.
pub(crate) fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = [0 as c_char; 1024];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the bridge always NUL-terminates the buffer it was given.
    Err(unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}
