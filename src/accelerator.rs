//! The accelerator a node computes on, as far as the engine and the node's device report must
//! agree: the environment variable that names it, and the CUDA driver, which a CUDA build
//! loads at run time rather than as a link dependency so that it also starts (on the CPU) on a
//! machine without one.

/// Environment variable naming the device (`auto`, `cpu`, `cuda`, `cuda:N`, `metal`).
pub const DEVICE_ENV: &str = "EXO_DEVICE";

/// The CUDA ordinal the engine will use when `EXO_DEVICE` leaves the choice to it or names a
/// GPU; `None` when it names anything else.
pub fn wanted_cuda_ordinal() -> Option<usize> {
    cuda_ordinal_named(&std::env::var(DEVICE_ENV).unwrap_or_default())
}

/// The CUDA ordinal a device name (as `EXO_DEVICE` takes it) leaves open or names.
fn cuda_ordinal_named(name: &str) -> Option<usize> {
    let wanted = name.trim().to_ascii_lowercase();
    match wanted.as_str() {
        "" | "auto" | "cuda" => Some(0),
        other => other.strip_prefix("cuda:")?.parse().ok(),
    }
}

/// Loads the CUDA driver (`libcuda.so.1`) into the process's global symbols, once; the error
/// says why it could not be (no NVIDIA driver on this machine, typically). Until it succeeds
/// nothing may call into CUDA: the build binds the driver's functions lazily, on first call.
#[cfg(feature = "cuda")]
pub fn load_cuda_driver() -> Result<(), String> {
    use std::sync::OnceLock;
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: dlopen with a constant, NUL-terminated name; the handle is kept for the
            // life of the process (never closed), as the driver's functions are bound to it.
            let handle =
                unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a NUL-terminated message (or null) owned by libc.
                let reason = unsafe { libc::dlerror() };
                let reason = if reason.is_null() {
                    "unknown reason".to_string()
                } else {
                    unsafe { std::ffi::CStr::from_ptr(reason) }.to_string_lossy().into_owned()
                };
                return Err(format!("the CUDA driver (libcuda.so.1) cannot be loaded: {reason}"));
            }
            Ok(())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_automatic_and_cuda_names_want_a_gpu() {
        let cases = [("", Some(0)), (" auto ", Some(0)), ("CUDA", Some(0)), ("cuda:3", Some(3))];
        for (name, ordinal) in cases.into_iter().chain([("cpu", None), ("cuda:x", None), ("metal", None)]) {
            assert_eq!(cuda_ordinal_named(name), ordinal, "{name:?}");
        }
    }
}
