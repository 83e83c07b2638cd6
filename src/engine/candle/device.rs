//! The device the candle engine computes on: the best one this build supports and the machine
//! has, unless `EXO_DEVICE` (or the `--device` flag) names another (ARCHITECTURE.md decision 8).

use candle_core::Device;

pub use crate::accelerator::DEVICE_ENV;
use crate::error::{Error, Result};

/// Device families this build can compute on, best first: CUDA with the `cuda` cargo feature,
/// always the CPU. Metal is not built on any platform yet.
const BUILT: &[&str] = if cfg!(feature = "cuda") { &["cuda", "cpu"] } else { &["cpu"] };

/// A chosen compute device and the name it is shown by (topology, TUI).
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    device: Device,
    name: String,
}

impl ComputeDevice {
    /// The device `EXO_DEVICE` names, or the best one available when it is unset, empty or `auto`.
    pub fn from_env() -> Result<Self> {
        match std::env::var(DEVICE_ENV) {
            Ok(value) => Self::named(&value),
            Err(_) => Ok(Self::best()),
        }
    }

    /// The best device available: the first CUDA GPU when this build has CUDA and a driver
    /// answers, else the CPU (saying why in the log when a CUDA build falls back).
    pub fn best() -> Self {
        if BUILT.contains(&"cuda") {
            match cuda(0) {
                Ok(device) => return Self { device, name: "cuda:0".into() },
                Err(e) => log::warn!("no CUDA GPU answered ({e}); computing on the CPU"),
            }
        }
        Self::cpu()
    }

    /// The CPU.
    pub fn cpu() -> Self {
        Self { device: Device::Cpu, name: "cpu".into() }
    }

    /// The device called `name`: `auto` (or empty), `cpu`, `cuda`, `cuda:N` or `metal`
    /// (case-insensitive); a device this build has no backend for, or a GPU that does not
    /// answer, is an error naming it.
    pub fn named(name: &str) -> Result<Self> {
        let wanted = name.trim().to_ascii_lowercase();
        let (family, ordinal) = match wanted.split_once(':') {
            Some((family, n)) => (family, Some(n)),
            None => (wanted.as_str(), None),
        };
        let ordinal = match ordinal.map(str::parse::<usize>) {
            None => None,
            Some(Ok(n)) if family == "cuda" || family == "metal" => Some(n),
            Some(_) => return Err(not_a_device(name)),
        };
        match family {
            "" | "auto" if ordinal.is_none() => Ok(Self::best()),
            "cpu" if ordinal.is_none() => Ok(Self::cpu()),
            "cuda" if BUILT.contains(&"cuda") => {
                let n = ordinal.unwrap_or(0);
                let device = cuda(n).map_err(|e| {
                    Error::InvalidArgument(format!("{DEVICE_ENV}={name}: CUDA GPU {n} does not answer: {e}"))
                })?;
                Ok(Self { device, name: format!("cuda:{n}") })
            }
            "cuda" | "metal" => Err(Error::InvalidArgument(format!(
                "{DEVICE_ENV}={name}: this build of exo has no {} backend (built devices: {})",
                if family == "cuda" { "CUDA" } else { "Metal" },
                BUILT.join(", ")
            ))),
            _ => Err(not_a_device(name)),
        }
    }

    /// The candle device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The name the device is shown by (`cpu`, `cuda:0`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// CUDA GPU `ordinal`, once the driver is loaded; an error is its first line (candle appends
/// a backtrace where `RUST_BACKTRACE` is set).
fn cuda(ordinal: usize) -> std::result::Result<Device, String> {
    #[cfg(feature = "cuda")]
    crate::accelerator::load_cuda_driver()?;
    Device::new_cuda(ordinal).map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())
}

fn not_a_device(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "{DEVICE_ENV}={name} is not a device: use auto, cpu, cuda, cuda:N or metal"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_built_and_auto_picks_a_built_device() {
        let cpu = ComputeDevice::named(" CPU ").unwrap();
        assert_eq!(cpu.name(), "cpu");
        assert!(cpu.device().is_cpu());
        for name in ["auto", "", " Auto "] {
            let chosen = ComputeDevice::named(name).unwrap();
            assert!(chosen.name() == "cpu" || chosen.name() == "cuda:0", "{}", chosen.name());
        }
        if !cfg!(feature = "cuda") {
            assert_eq!(ComputeDevice::best().name(), "cpu");
        }
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn unbuilt_devices_are_errors_naming_them() {
        for (name, says) in
            [("cuda", "no CUDA backend"), ("cuda:1", "no CUDA backend"), ("metal", "no Metal")]
        {
            let message = ComputeDevice::named(name).unwrap_err().to_string();
            assert!(message.contains(&format!("EXO_DEVICE={name}")) && message.contains(says), "{message}");
        }
    }

    #[test]
    fn unknown_devices_are_errors_naming_them() {
        for name in ["tpu", "cuda:x", "cpu:0", "cuda:", "auto:1"] {
            let message = ComputeDevice::named(name).unwrap_err().to_string();
            assert!(message.contains(&format!("EXO_DEVICE={name} is not a device")), "{message}");
        }
    }

    #[test]
    #[cfg(feature = "cuda")]
    fn a_missing_gpu_is_an_error_naming_it() {
        let message = ComputeDevice::named("cuda:4096").unwrap_err().to_string();
        assert!(message.contains("EXO_DEVICE=cuda:4096: CUDA GPU 4096 does not answer"), "{message}");
    }
}
