//! exo classic's `node_service` gRPC protocol over tonic: the peer client, the server and the
//! bounds on its connections, the cluster key's check on calls, and conversions between protobuf
//! messages and the core types.

mod connections;
mod key_check;
mod peer;
mod server;

pub use connections::{ConnectionPolicy, MAX_CONNECTIONS_ENV};
pub use peer::GrpcPeer;
pub use server::GrpcServer;
#[cfg(test)]
pub(crate) use server::Service;

use crate::engine::InferenceState;
use crate::error::{Error, Result};
use crate::proto;
use crate::tensor::WireTensor;
use crate::topology::{DeviceCapabilities, DeviceFlops, Topology};

/// The environment variable that sets the largest gRPC message either side accepts, in bytes.
pub const MAX_MESSAGE_BYTES_ENV: &str = "EXO_GRPC_MAX_MESSAGE_BYTES";
/// The largest message either side accepts by default (exo classic's limit).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// The smallest limit accepted: every control message must still fit.
const MIN_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The largest message either side accepts: `EXO_GRPC_MAX_MESSAGE_BYTES`, else 256 MiB.
pub fn max_message_bytes() -> Result<usize> {
    parse_max_message_bytes(std::env::var(MAX_MESSAGE_BYTES_ENV).ok().as_deref())
}

fn parse_max_message_bytes(value: Option<&str>) -> Result<usize> {
    let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_MAX_MESSAGE_BYTES);
    };
    match text.parse::<usize>() {
        Ok(bytes) if bytes >= MIN_MAX_MESSAGE_BYTES => Ok(bytes),
        _ => Err(Error::InvalidConfig(format!(
            "{MAX_MESSAGE_BYTES_ENV} must be a number of bytes of at least {MIN_MAX_MESSAGE_BYTES}, got {text:?}"
        ))),
    }
}

/// The hint a call refused for its size carries: which limit, and how to raise it.
fn message_size_hint(status: &tonic::Status) -> Option<String> {
    let too_large =
        status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large");
    too_large
        .then(|| format!("the gRPC message limit; set {MAX_MESSAGE_BYTES_ENV} on both nodes to raise it"))
}

/// Metadata key of an error status that names the error's kind ([`Error::kind`]); classic
/// peers ignore it, xotorch-core peers rebuild an error of that kind.
const ERROR_KIND_KEY: &str = "xot-error-kind";

impl From<&DeviceCapabilities> for proto::DeviceCapabilities {
    fn from(caps: &DeviceCapabilities) -> Self {
        Self {
            model: caps.model.clone(),
            chip: caps.chip.clone(),
            memory: i32::try_from(caps.memory).unwrap_or(i32::MAX),
            flops: Some(proto::DeviceFlops {
                fp32: caps.flops.fp32,
                fp16: caps.flops.fp16,
                int8: caps.flops.int8,
            }),
        }
    }
}

impl From<proto::DeviceCapabilities> for DeviceCapabilities {
    fn from(caps: proto::DeviceCapabilities) -> Self {
        let flops = caps.flops.map(|f| DeviceFlops::new(f.fp32, f.fp16, f.int8)).unwrap_or_default();
        Self::new(caps.model, caps.chip, u64::try_from(caps.memory).unwrap_or(0), flops)
    }
}

impl From<&Topology> for proto::Topology {
    fn from(topology: &Topology) -> Self {
        let nodes = topology.nodes.iter().map(|(id, caps)| (id.clone(), caps.into())).collect();
        let peer_graph = topology
            .peer_graph
            .iter()
            .map(|(id, connections)| {
                let connections = connections
                    .iter()
                    .map(|c| proto::PeerConnection {
                        to_id: c.to_id.clone(),
                        description: c.description.clone(),
                    })
                    .collect();
                (id.clone(), proto::PeerConnections { connections })
            })
            .collect();
        Self { nodes, peer_graph }
    }
}

impl From<proto::Topology> for Topology {
    fn from(message: proto::Topology) -> Self {
        let mut topology = Topology::new();
        let mut nodes: Vec<_> = message.nodes.into_iter().collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, caps) in nodes {
            topology.update_node(id, caps.into());
        }
        let mut graph: Vec<_> = message.peer_graph.into_iter().collect();
        graph.sort_by(|a, b| a.0.cmp(&b.0));
        for (from_id, connections) in graph {
            for connection in connections.connections {
                topology.add_edge(&from_id, &connection.to_id, connection.description);
            }
        }
        topology
    }
}

/// The protobuf form of an inference state.
pub fn state_to_proto(state: InferenceState) -> Result<proto::InferenceState> {
    let tensor_data =
        state.tensors.into_iter().map(|(k, t)| Ok((k, t.into_proto()?))).collect::<Result<_>>()?;
    let tensor_list_data = state
        .tensor_lists
        .into_iter()
        .map(|(k, list)| {
            let tensors = list.into_iter().map(WireTensor::into_proto).collect::<Result<_>>()?;
            Ok((k, proto::TensorList { tensors }))
        })
        .collect::<Result<_>>()?;
    let other_data_json = if state.other.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(state.other).to_string()
    };
    Ok(proto::InferenceState { tensor_data, tensor_list_data, other_data_json })
}

/// Validates a protobuf inference state: every tensor, and JSON that is an object.
pub fn state_from_proto(message: proto::InferenceState) -> Result<InferenceState> {
    let tensors = message
        .tensor_data
        .into_iter()
        .map(|(k, t)| Ok((k, WireTensor::from_proto(t)?)))
        .collect::<Result<_>>()?;
    let tensor_lists = message
        .tensor_list_data
        .into_iter()
        .map(|(k, list)| {
            Ok((k, list.tensors.into_iter().map(WireTensor::from_proto).collect::<Result<_>>()?))
        })
        .collect::<Result<_>>()?;
    let other = match message.other_data_json.trim() {
        "" => serde_json::Map::new(),
        text => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(serde_json::Value::Null) => serde_json::Map::new(),
            Ok(other) => {
                return Err(Error::InvalidArgument(format!(
                    "inference_state.other_data_json must be a JSON object, got {other}"
                )))
            }
            Err(e) => return Err(Error::InvalidArgument(format!("inference_state.other_data_json: {e}"))),
        },
    };
    Ok(InferenceState { tensors, tensor_lists, other })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn the_message_limit_comes_from_the_environment_and_is_checked() {
        assert_eq!(parse_max_message_bytes(None).unwrap(), DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(parse_max_message_bytes(Some(" 1048576 ")).unwrap(), 1 << 20);
        for bad in ["-1", "lots", "1024"] {
            let error = parse_max_message_bytes(Some(bad)).unwrap_err().to_string();
            assert!(error.contains(MAX_MESSAGE_BYTES_ENV) && error.contains(bad), "{error}");
        }
        let refused = tonic::Status::out_of_range(
            "decoded message length too large: found 9 bytes, the limit is: 8 bytes",
        );
        assert!(message_size_hint(&refused).unwrap().contains(MAX_MESSAGE_BYTES_ENV));
        assert!(message_size_hint(&tonic::Status::out_of_range("other")).is_none());
    }

    #[test]
    fn state_round_trips_through_protobuf() {
        let mut state = InferenceState::default();
        state.tensors.insert("a".into(), WireTensor::new(DType::F32, vec![1], vec![0, 0, 128, 63]).unwrap());
        state.tensor_lists.insert("l".into(), vec![WireTensor::new(DType::U8, vec![2], vec![1, 2]).unwrap()]);
        state.other.insert("k".into(), serde_json::json!({"x": [1, 2]}));
        let back = state_from_proto(state_to_proto(state.clone()).unwrap()).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn malformed_state_json_is_a_clear_error() {
        let message = proto::InferenceState { other_data_json: "[1".into(), ..Default::default() };
        let error = state_from_proto(message).unwrap_err().to_string();
        assert!(error.contains("other_data_json"), "{error}");
        let message = proto::InferenceState { other_data_json: "[1]".into(), ..Default::default() };
        assert!(state_from_proto(message).unwrap_err().to_string().contains("JSON object"));
    }

    #[test]
    fn topology_round_trips_through_protobuf() {
        let mut topology = Topology::new();
        topology.update_node("a", DeviceCapabilities::new("m", "c", 1024, DeviceFlops::new(1.0, 2.0, 4.0)));
        topology.update_node("b", DeviceCapabilities::unknown());
        topology.add_edge("a", "b", Some("Ethernet".into()));
        let back = Topology::from(proto::Topology::from(&topology));
        assert_eq!(back.nodes, topology.nodes);
        assert_eq!(back.peer_graph, topology.peer_graph);
    }
}
