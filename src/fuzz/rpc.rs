//! Every RPC into a node: arbitrary bytes, and valid messages with bent fields, decoded by
//! prost as tonic decodes them and served by the gRPC service in front of a real node (the
//! dummy engine, no peers), so each message goes through the conversions a peer's call does.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use prost::Message;
use tonic::Request;

use super::json_value;
use super::tensor::proto_tensor;
use crate::engine::dummy::DummyEngine;
use crate::net::grpc::Service;
use crate::net::{Discovery, PeerHandle, RequestHandler};
use crate::node::{Node, NodeSettings};
use crate::proto;
use crate::proto::node_service_server::NodeService;
use crate::topology::RingMemoryWeightedPartitioning;

/// A node alone: discovery that finds nobody.
struct Alone;

#[async_trait]
impl Discovery for Alone {
    async fn start(&self) -> crate::Result<()> {
        Ok(())
    }
    async fn stop(&self) -> crate::Result<()> {
        Ok(())
    }
    async fn discover_peers(&self, _wait_for_peers: usize) -> crate::Result<Vec<Arc<dyn PeerHandle>>> {
        Ok(Vec::new())
    }
}

fn layer() -> impl Strategy<Value = i32> {
    prop_oneof![6 => -1i32..6, 1 => any::<i32>(), 1 => Just(i32::MAX), 1 => Just(i32::MIN)]
}

fn shard() -> BoxedStrategy<Option<proto::Shard>> {
    let model = prop_oneof![Just("dummy".to_string()), ".{0,8}"];
    prop::option::weighted(0.9, (model, layer(), layer(), layer()))
        .prop_map(|shard| {
            shard.map(|(model_id, start_layer, end_layer, n_layers)| proto::Shard {
                model_id,
                start_layer,
                end_layer,
                n_layers,
            })
        })
        .boxed()
}

fn request_id() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![Just("r".to_string()), ".{0,12}"])
}

fn inference_state() -> BoxedStrategy<Option<proto::InferenceState>> {
    let json = prop_oneof![json_value().prop_map(|v| v.to_string()), ".{0,16}"];
    let tensors = prop::collection::hash_map(".{0,4}", proto_tensor(), 0..2);
    let lists = prop::collection::hash_map(
        ".{0,4}",
        prop::collection::vec(proto_tensor(), 0..2).prop_map(|tensors| proto::TensorList { tensors }),
        0..2,
    );
    prop::option::of((tensors, lists, json).prop_map(|(tensor_data, tensor_list_data, other_data_json)| {
        proto::InferenceState { tensor_data, tensor_list_data, other_data_json }
    }))
    .boxed()
}

/// One call: which RPC, and its message as bytes.
#[derive(Debug, Clone)]
struct Call {
    rpc: u8,
    bytes: Vec<u8>,
}

/// Boxed, as the others here: the unboxed strategy tree overflows a test thread's stack.
fn structured_call() -> BoxedStrategy<Call> {
    let tensor = || prop::option::of(proto_tensor()).boxed();
    prop_oneof![
        (shard(), ".{0,16}", request_id(), inference_state())
            .prop_map(|(shard, prompt, request_id, state)| {
                let message = proto::PromptRequest { shard, prompt, request_id, inference_state: state };
                Call { rpc: 0, bytes: message.encode_to_vec() }
            })
            .boxed(),
        (shard(), tensor(), request_id(), inference_state())
            .prop_map(|(shard, tensor, request_id, state)| {
                let message = proto::TensorRequest { shard, tensor, request_id, inference_state: state };
                Call { rpc: 1, bytes: message.encode_to_vec() }
            })
            .boxed(),
        (shard(), tensor(), tensor(), tensor(), any::<bool>(), request_id())
            .prop_map(|(shard, example, target, length, train, request_id)| {
                let message = proto::ExampleRequest { shard, example, target, length, train, request_id };
                Call { rpc: 2, bytes: message.encode_to_vec() }
            })
            .boxed(),
        (prop::collection::vec(".{0,6}", 0..4), layer())
            .prop_map(|(visited, max_depth)| {
                Call { rpc: 3, bytes: proto::CollectTopologyRequest { visited, max_depth }.encode_to_vec() }
            })
            .boxed(),
        (".{0,8}", prop::collection::vec(any::<i32>(), 0..8), tensor(), any::<bool>())
            .prop_map(|(request_id, result, tensor, is_finished)| {
                let message = proto::SendResultRequest { request_id, result, tensor, is_finished };
                Call { rpc: 4, bytes: message.encode_to_vec() }
            })
            .boxed(),
        (".{0,8}", prop_oneof![json_value().prop_map(|v| v.to_string()), ".{0,16}"])
            .prop_map(|(request_id, status)| {
                let message = proto::SendOpaqueStatusRequest { request_id, status };
                Call { rpc: 5, bytes: message.encode_to_vec() }
            })
            .boxed(),
    ]
    .boxed()
}

/// A call as it may arrive: structured, with a few bytes flipped or cut off, or noise.
fn call() -> BoxedStrategy<Call> {
    let damaged = (
        structured_call(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(mut call, flips, cut, truncate)| {
            if !call.bytes.is_empty() {
                for (at, byte) in flips {
                    let at = at.index(call.bytes.len());
                    call.bytes[at] = byte;
                }
                if truncate {
                    call.bytes.truncate(cut.index(call.bytes.len()));
                }
            }
            call
        });
    prop_oneof![
        3 => structured_call(),
        3 => damaged,
        1 => (0u8..7, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(rpc, bytes)| Call { rpc, bytes }),
    ]
    .boxed()
}

/// Decodes `call` as tonic would and serves it: the error status it ends with, if any. A
/// message that does not decode is refused before the service, as tonic refuses it.
async fn serve(service: &Service, call: Call) -> Option<tonic::Status> {
    fn decode<M: Message + Default>(bytes: &[u8]) -> Option<Request<M>> {
        M::decode(bytes).ok().map(Request::new)
    }
    let bytes = call.bytes.as_slice();
    match call.rpc {
        0 => service.send_prompt(decode(bytes)?).await.err(),
        1 => service.send_tensor(decode(bytes)?).await.err(),
        2 => service.send_example(decode(bytes)?).await.err(),
        3 => service.collect_topology(decode(bytes)?).await.err(),
        4 => service.send_result(decode(bytes)?).await.err(),
        5 => service.send_opaque_status(decode(bytes)?).await.err(),
        _ => service.health_check(decode(bytes)?).await.err(),
    }
}

proptest! {
    #[test]
    fn fuzz_rpc_messages(calls in prop::collection::vec(call(), 1..4)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // Boxed: the node's futures are too big for a test thread's stack in a debug build.
        runtime.block_on(Box::pin(async {
            let node = Node::new(
                "fuzzed",
                Arc::new(DummyEngine::default()),
                Arc::new(Alone),
                Arc::new(RingMemoryWeightedPartitioning),
                NodeSettings::default(),
            );
            let handler: Arc<dyn RequestHandler> = node.clone();
            let service = Service::new(Arc::downgrade(&handler));
            for call in calls {
                let served = tokio::time::timeout(Duration::from_secs(10), serve(&service, call.clone())).await;
                let outcome = served
                    .map_err(|_| TestCaseError::fail(format!("the call {call:?} did not end within 10 s")))?;
                if let Some(status) = outcome {
                    prop_assert!(status.message().len() > 8, "unclear status {status:?} for {call:?}");
                }
            }
            node.stop().await?;
            Ok::<(), TestCaseError>(())
        }))?;
    }
}
