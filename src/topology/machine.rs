//! The machine probe: the device this node computes on, as the [`DeviceCapabilities`] it
//! reports: the GPU a CUDA build uses (see [`super::gpu`]), else this machine's CPU, memory and
//! estimated throughput.

use super::chips::chip_flops;
use super::device::{DeviceCapabilities, DeviceFlops};

/// Detects the GPU a CUDA build computes on, else this machine's CPU and memory. The chip
/// table is consulted first; otherwise a CPU's throughput is estimated from cores × clock × the
/// widest SIMD FMA the CPU has.
pub fn detect_device_capabilities() -> DeviceCapabilities {
    if let Some(gpu) = super::gpu::detect() {
        return gpu;
    }
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.refresh_cpu_all();
    let cpus = system.cpus();
    let brand = cpus.first().map(|c| c.brand().trim().to_string()).filter(|b| !b.is_empty());
    let chip = brand.unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let memory = system.total_memory() / (1024 * 1024);
    let mhz = cpus.iter().map(|c| c.frequency()).max().unwrap_or(0);
    let flops = chip_flops().get(&chip).copied().unwrap_or_else(|| estimate_cpu_flops(cpus.len(), mhz));
    let model = format!("{} Box ({chip})", os_label());
    DeviceCapabilities::new(model, chip, memory, flops)
}

/// The OS word exo classic puts in front of "Box".
fn os_label() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Mac",
        "windows" => "Windows",
        _ => "Unknown",
    }
}

/// Peak CPU throughput: cores × GHz × FLOPs per cycle of the widest FMA unit (two units
/// assumed), fp16 equal to fp32 unless the CPU has native fp16 math, int8 from dot-product
/// instructions where present. A clock of 0 (unreadable in some VMs) counts as 2 GHz.
fn estimate_cpu_flops(cores: usize, mhz: u64) -> DeviceFlops {
    let ghz = if mhz == 0 { 2.0 } else { mhz as f64 / 1000.0 };
    let simd = SimdWidth::detect();
    let fp32 = cores as f64 * ghz * simd.fp32_flops_per_cycle / 1000.0;
    DeviceFlops::new(fp32, fp32 * simd.fp16_speedup, fp32 * simd.int8_speedup)
}

/// Per-core figures for the SIMD units this CPU has.
struct SimdWidth {
    fp32_flops_per_cycle: f64,
    fp16_speedup: f64,
    int8_speedup: f64,
}

impl SimdWidth {
    #[cfg(target_arch = "x86_64")]
    fn detect() -> Self {
        use std::arch::is_x86_feature_detected as has;
        // 2 FMA units × lanes × 2 FLOPs per FMA.
        let fp32_flops_per_cycle = if has!("avx512f") {
            64.0
        } else if has!("fma") {
            32.0
        } else if has!("avx") {
            16.0
        } else {
            8.0
        };
        let fp16_speedup = if has!("avx512fp16") { 2.0 } else { 1.0 };
        let int8_speedup = if has!("avx512vnni") || has!("avxvnni") { 4.0 } else { 2.0 };
        Self { fp32_flops_per_cycle, fp16_speedup, int8_speedup }
    }

    #[cfg(target_arch = "aarch64")]
    fn detect() -> Self {
        // NEON: 2 × 128-bit FMA units; fp16 and int8 dot products are standard on ARMv8.2+ cores.
        Self { fp32_flops_per_cycle: 16.0, fp16_speedup: 2.0, int8_speedup: 4.0 }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn detect() -> Self {
        Self { fp32_flops_per_cycle: 2.0, fp16_speedup: 1.0, int8_speedup: 1.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_reports_this_machine() {
        let caps = detect_device_capabilities();
        assert!(caps.memory > 0, "{caps:?}");
        assert!(!caps.chip.is_empty());
        assert!(caps.flops.fp32 > 0.0, "{caps:?}");
        assert!(caps.flops.int8 >= caps.flops.fp32);
    }

    #[test]
    fn estimate_scales_with_cores_and_clock() {
        let one = estimate_cpu_flops(1, 1000);
        let four = estimate_cpu_flops(4, 2000);
        assert!((four.fp32 - 8.0 * one.fp32).abs() < 1e-12);
        assert_eq!(estimate_cpu_flops(1, 0).fp32, estimate_cpu_flops(1, 2000).fp32);
    }
}
