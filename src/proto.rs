//! Generated protobuf and gRPC code for `proto/tandem/v1/*.proto`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tandem.v1");

/// The encoded descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_descriptor");
