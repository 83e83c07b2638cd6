//! The cluster as the partitioner sees it: device capabilities (and the probe that detects
//! this machine's), the peer graph, and how a model's layers are split across nodes.

pub mod balance;
pub mod chips;
pub mod device;
pub mod gpu;
pub mod graph;
pub mod machine;
pub mod memory;
pub mod partition;

pub use balance::{balance_layers, ModelCosts};
pub use chips::chip_flops;
pub use device::{DeviceCapabilities, DeviceFlops};
pub use graph::{PeerConnection, Topology};
pub use machine::detect_device_capabilities;
pub use memory::{MemoryFit, ModelMemory};
pub use partition::{
    assign_layers, map_partitions_to_shards, Partition, PartitioningStrategy, RingMemoryWeightedPartitioning,
};
