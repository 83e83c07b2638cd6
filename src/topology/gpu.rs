//! The NVIDIA GPU a CUDA build computes on, as the cluster sees it: its name, memory and peak
//! throughput read from the CUDA driver, in the form exo classic reports a GPU (chip and model
//! from the device name, memory in MB of VRAM). Builds without the `cuda` feature see no GPU.

use super::device::DeviceCapabilities;

/// The GPU the engine will compute on, unless `EXO_DEVICE` names the CPU or no GPU answers.
#[cfg(feature = "cuda")]
pub fn detect() -> Option<DeviceCapabilities> {
    use cudarc::driver::result;
    use cudarc::driver::sys::CUdevice_attribute as Attribute;

    let ordinal = crate::accelerator::wanted_cuda_ordinal()?;
    if let Err(e) = crate::accelerator::load_cuda_driver() {
        log::info!("{e}; reporting the CPU");
        return None;
    }
    let probe = || -> Result<DeviceCapabilities, result::DriverError> {
        result::init()?;
        let device = result::device::get(ordinal as i32)?;
        let name = result::device::get_name(device)?.to_uppercase();
        // SAFETY: `device` is a handle the driver just returned; the attributes are plain reads.
        let (memory, sms, khz, major, minor) = unsafe {
            (
                result::device::total_mem(device)?,
                result::device::get_attribute(device, Attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                result::device::get_attribute(device, Attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?,
                result::device::get_attribute(
                    device,
                    Attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )?,
                result::device::get_attribute(
                    device,
                    Attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )?,
            )
        };
        let flops = super::chips::chip_flops()
            .get(&name)
            .copied()
            .unwrap_or_else(|| estimate_gpu_flops(sms as f64, khz as f64 / 1e6, (major, minor)));
        Ok(DeviceCapabilities::new(format!("Linux Box ({name})"), name, (memory >> 20) as u64, flops))
    };
    match probe() {
        Ok(caps) => Some(caps),
        Err(e) => {
            log::info!("no CUDA GPU {ordinal} to report ({e}); reporting the CPU");
            None
        }
    }
}

/// Builds without CUDA report the CPU.
#[cfg(not(feature = "cuda"))]
pub fn detect() -> Option<DeviceCapabilities> {
    None
}

/// Peak dense throughput of a GPU not in the chip table, from its multiprocessors, boost clock
/// (GHz) and compute capability: fp32 from the FP32 lanes per multiprocessor, fp16 from the
/// tensor cores' dense FP16 rate with f32 accumulation, int8 twice that.
#[cfg(any(feature = "cuda", test))]
fn estimate_gpu_flops(sms: f64, ghz: f64, capability: (i32, i32)) -> super::device::DeviceFlops {
    // (FP32 lanes, dense FP16 tensor FLOPs per clock) per multiprocessor.
    let (lanes, tensor) = match capability {
        (9, _) | (10, _) | (12, _) => (128.0, 4096.0),
        (8, 0) => (64.0, 2048.0),
        (8, _) => (128.0, 1024.0),
        (7, _) => (64.0, 1024.0),
        _ => (128.0, 256.0),
    };
    let fp32 = sms * ghz * lanes * 2.0 / 1000.0;
    let fp16 = sms * ghz * tensor / 1000.0;
    super::device::DeviceFlops::new(fp32, fp16, 2.0 * fp16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_match_published_peaks() {
        // H100 SXM: 132 multiprocessors at 1.98 GHz; 67 TFLOPS fp32 by NVIDIA's datasheet.
        let h100 = estimate_gpu_flops(132.0, 1.98, (9, 0));
        assert!((h100.fp32 - 66.9).abs() < 0.2, "{h100:?}");
        // A100: 108 at 1.41 GHz; 19.5 fp32, 312 fp16, as the chip table has it.
        let a100 = estimate_gpu_flops(108.0, 1.41, (8, 0));
        assert!((a100.fp32 - 19.5).abs() < 0.1 && (a100.fp16 - 312.0).abs() < 1.0, "{a100:?}");
    }
}
