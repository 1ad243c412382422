//! Compiles the protos in `proto/` with protox (pure Rust, no system `protoc`)
//! and keeps the descriptor set for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/tandem/v1/cluster.proto",
    "proto/tandem/v1/decision_log.proto",
    "proto/tandem/v1/participant.proto",
    "proto/tandem/v1/raft.proto",
    "proto/tandem/v1/transactions.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tandem_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
