//! Compiles `proto/` with protox (pure Rust) so that no system `protoc` is
//! needed, then generates prost messages and tonic clients/servers from the
//! resulting descriptor set. The same descriptor set is embedded for server
//! reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "gpualloc/resourcepool/v1/resourcepool.proto",
    "gpualloc/allocation/v1/allocation.proto",
    "gpualloc/viewer/v1/viewer.proto",
    "gpualloc/events/v1/events.proto",
];

const RPC_FILES: &[&str] = &["google/rpc/status.proto", "google/rpc/error_details.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let fds = protox::compile(FILES, [&root])?;
    fs::write(out.join("gpualloc_descriptor.bin"), fds.encode_to_vec())?;

    // google.rpc's status and error details: descriptors only (tonic-types
    // has the Rust types), for reflection, so grpcurl decodes details.
    let rpc = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("rpc");
    println!("cargo:rerun-if-changed={}", rpc.display());
    let details = protox::compile(RPC_FILES, [&rpc])?;
    fs::write(out.join("rpc_descriptor.bin"), details.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // BTreeMap keeps custom classes and labels in a stable order, which
        // makes encoded events and test comparisons deterministic.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
