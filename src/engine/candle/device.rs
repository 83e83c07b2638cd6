//! The device the candle engine computes on: the best one this build supports, unless
//! `EXO_DEVICE` names another (ARCHITECTURE.md decision 7).

use candle_core::Device;

use crate::error::{Error, Result};

/// Environment variable that overrides the automatic choice.
pub const DEVICE_ENV: &str = "EXO_DEVICE";

/// Devices this build can compute on, best first. The CUDA and Metal backends are cargo
/// features that are not part of this build, so only the CPU is listed.
const BUILT: &[&str] = &["cpu"];

/// A chosen compute device and the name it is shown by (topology, TUI).
#[derive(Debug, Clone)]
pub struct ComputeDevice {
    device: Device,
    name: String,
}

impl ComputeDevice {
    /// The device `EXO_DEVICE` names, or the best one built in when it is unset or empty.
    pub fn from_env() -> Result<Self> {
        match std::env::var(DEVICE_ENV) {
            Ok(value) if !value.trim().is_empty() => Self::named(&value),
            _ => Ok(Self::best()),
        }
    }

    /// The best device this build supports.
    pub fn best() -> Self {
        Self { device: Device::Cpu, name: BUILT[0].to_string() }
    }

    /// The device called `name`: `cpu`, `cuda`, `cuda:N` or `metal` (case-insensitive);
    /// a device this build has no backend for is an error naming it.
    pub fn named(name: &str) -> Result<Self> {
        let wanted = name.trim().to_ascii_lowercase();
        let family = wanted.split_once(':').map_or(wanted.as_str(), |(family, _)| family);
        match family {
            "cpu" if wanted == "cpu" => Ok(Self { device: Device::Cpu, name: wanted }),
            "cuda" | "metal" if valid_ordinal(&wanted) => Err(Error::InvalidArgument(format!(
                "{DEVICE_ENV}={name}: this build of exo has no {} backend (built devices: {})",
                if family == "cuda" { "CUDA" } else { "Metal" },
                BUILT.join(", ")
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "{DEVICE_ENV}={name} is not a device: use cpu, cuda, cuda:N or metal"
            ))),
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

/// `family` alone or `family:N` with a decimal ordinal.
fn valid_ordinal(wanted: &str) -> bool {
    wanted.split_once(':').is_none_or(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_built_and_chosen_by_default() {
        assert_eq!(ComputeDevice::best().name(), "cpu");
        let cpu = ComputeDevice::named(" CPU ").unwrap();
        assert_eq!(cpu.name(), "cpu");
        assert!(cpu.device().is_cpu());
    }

    #[test]
    fn unbuilt_and_unknown_devices_are_errors_naming_them() {
        for (name, says) in
            [("cuda", "no CUDA backend"), ("cuda:1", "no CUDA backend"), ("metal", "no Metal")]
        {
            let message = ComputeDevice::named(name).unwrap_err().to_string();
            assert!(message.contains(&format!("EXO_DEVICE={name}")) && message.contains(says), "{message}");
        }
        for name in ["tpu", "cuda:x", "cpu:0", "cuda:"] {
            let message = ComputeDevice::named(name).unwrap_err().to_string();
            assert!(message.contains(&format!("EXO_DEVICE={name} is not a device")), "{message}");
        }
    }
}
