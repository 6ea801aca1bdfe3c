//! Compiles the wire contracts in `proto/` into `OUT_DIR`. Nothing else.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/mcpcontainer.proto", "proto/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("descriptor.bin"))
        // Payload fields decode as `bytes::Bytes`, sliced from the receive buffer without a copy.
        .bytes(".mcpcontainer")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
