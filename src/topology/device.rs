//! What a node can contribute: its model, chip, memory and throughput (detected by
//! [`super::machine`]).

/// Peak throughput in TFLOPS.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceFlops {
    /// 32-bit float TFLOPS.
    pub fp32: f64,
    /// 16-bit float TFLOPS.
    pub fp16: f64,
    /// 8-bit integer TOPS.
    pub int8: f64,
}

impl DeviceFlops {
    /// Throughput from its three figures.
    pub fn new(fp32: f64, fp16: f64, int8: f64) -> Self {
        Self { fp32, fp16, int8 }
    }

    /// The JSON form (`{"fp32", "fp16", "int8"}`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"fp32": self.fp32, "fp16": self.fp16, "int8": self.int8})
    }
}

impl std::fmt::Display for DeviceFlops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fp32: {:.2} TFLOPS, fp16: {:.2} TFLOPS, int8: {:.2} TFLOPS",
            self.fp32, self.fp16, self.int8
        )
    }
}

/// A node's device as the cluster sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCapabilities {
    /// Machine model, e.g. "MacBook Pro" or "Linux Box (AMD EPYC 9B14)".
    pub model: String,
    /// Chip name, the key into the chip table.
    pub chip: String,
    /// Memory available for weights, in MB.
    pub memory: u64,
    /// Peak throughput.
    pub flops: DeviceFlops,
}

impl DeviceCapabilities {
    /// Capabilities from their parts.
    pub fn new(model: impl Into<String>, chip: impl Into<String>, memory: u64, flops: DeviceFlops) -> Self {
        Self { model: model.into(), chip: chip.into(), memory, flops }
    }

    /// What a node reports before (or instead of) detection.
    pub fn unknown() -> Self {
        Self::new("Unknown Model", "Unknown Chip", 0, DeviceFlops::default())
    }

    /// The JSON form exo classic uses in topology and discovery messages.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"model": self.model, "chip": self.chip, "memory": self.memory, "flops": self.flops.to_json()})
    }
}

impl std::fmt::Display for DeviceCapabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model: {}. Chip: {}. Memory: {}MB. Flops: {}",
            self.model, self.chip, self.memory, self.flops
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_classic() {
        let caps = DeviceCapabilities::new(
            "MacBook Pro",
            "Apple M3 Max",
            131072,
            DeviceFlops::new(14.2, 28.4, 56.8),
        );
        assert_eq!(
            caps.to_string(),
            "Model: MacBook Pro. Chip: Apple M3 Max. Memory: 131072MB. \
             Flops: fp32: 14.20 TFLOPS, fp16: 28.40 TFLOPS, int8: 56.80 TFLOPS"
        );
    }
}
