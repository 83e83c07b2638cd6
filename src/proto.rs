//! Messages and gRPC stubs generated from `proto/node_service.proto` (exo classic's protocol).
#![allow(missing_docs)]

tonic::include_proto!("node_service");
