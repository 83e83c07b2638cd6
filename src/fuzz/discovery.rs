//! Discovery's decoders: UDP presence datagrams (noise, and classic's JSON with fields bent)
//! and the manual discovery config file; then what a node builds from what they announce (its
//! topology, and the ring's partitions and shards).

use proptest::prelude::*;

use super::{assert_clear, bent_object, json_value};
use crate::net::discovery::{NetworkTopology, PresenceMessage, UdpConfig};
use crate::topology::{
    map_partitions_to_shards, DeviceCapabilities, PartitioningStrategy, RingMemoryWeightedPartitioning,
    Topology,
};

fn capabilities() -> serde_json::Value {
    serde_json::json!({"model": "M", "chip": "C", "memory": 1024, "flops": {"fp32": 1.0, "fp16": 2.0, "int8": 4.0}})
}

fn presence() -> serde_json::Value {
    serde_json::json!({"type": "discovery", "node_id": "peer", "grpc_port": 50051,
        "device_capabilities": capabilities(), "priority": 4, "interface_name": "eth0",
        "interface_type": "Ethernet"})
}

/// A datagram: classic's message with fields bent (capabilities too), or noise.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    let bent = (bent_object(presence()), bent_object(capabilities())).prop_map(|(mut message, caps)| {
        if message.get("device_capabilities").is_some_and(|_| caps.is_object()) {
            message["device_capabilities"] = caps;
        }
        message.to_string().into_bytes()
    });
    prop_oneof![
        4 => bent,
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Capabilities any peer may claim: memory and flops at the edges of their types.
fn claimed_capabilities() -> impl Strategy<Value = DeviceCapabilities> {
    let flops = prop_oneof![Just(0.0f64), Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), any::<f64>()];
    (super::edge_u64(), flops.clone(), flops).prop_map(|(memory, fp32, fp16)| {
        let flops = crate::topology::DeviceFlops::new(fp32, fp16, 0.0);
        DeviceCapabilities::new("M", "C", memory, flops)
    })
}

proptest! {
    #[test]
    fn fuzz_udp_presence(datagram in datagram()) {
        let Ok(message) = PresenceMessage::parse(&datagram) else { return Ok(()) };
        let config = UdpConfig::new("me", 1, 2, 3);
        let _ = config.rejection(&message);
        let caps = DeviceCapabilities::from(message.device_capabilities.clone());
        let mut topology = Topology::new();
        topology.update_node(message.node_id.clone(), caps);
        topology.update_node("me", DeviceCapabilities::unknown());
        let partitions = RingMemoryWeightedPartitioning.partition(&topology);
        prop_assert_eq!(partitions.len(), topology.nodes.len());
        let shards = map_partitions_to_shards(&partitions, 32, "m");
        prop_assert!(shards.iter().all(|s| s.validate().is_ok()), "{shards:?}");
    }

    #[test]
    fn fuzz_ring_of_claimed_capabilities(claims in prop::collection::vec(claimed_capabilities(), 1..5), layers in 1i32..200) {
        let mut topology = Topology::new();
        for (i, caps) in claims.into_iter().enumerate() {
            topology.update_node(format!("n{i}"), caps);
        }
        let partitions = RingMemoryWeightedPartitioning.partition(&topology);
        let shards = map_partitions_to_shards(&partitions, layers, "m");
        prop_assert!(shards.iter().all(|s| s.validate().is_ok()), "{shards:?}");
    }

    #[test]
    fn fuzz_manual_config(text in prop_oneof![
        4 => bent_object(serde_json::json!({"address": "10.0.0.2", "port": 50051, "device_capabilities": capabilities()}))
            .prop_map(|peer| serde_json::json!({"peers": {"a": peer}}).to_string()),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => ".{0,64}",
    ]) {
        match NetworkTopology::from_json(&text, "fuzz.json") {
            Ok(config) => {
                for peer in config.peers.values() {
                    let _ = peer.addr();
                }
            }
            Err(error) => {
                assert_clear(&error)?;
                prop_assert!(error.to_string().contains("fuzz.json"), "{error}");
            }
        }
    }
}
