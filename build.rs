//! Compiles the wire contracts in `proto/` into `OUT_DIR`. Nothing else.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // One descriptor set per service, so each server's reflection lists only what it serves.
    for (proto, descriptor) in [
        ("proto/mcpcontainer.proto", "mcpcontainer_descriptor.bin"),
        ("proto/agent.proto", "agent_descriptor.bin"),
        ("proto/bridge.proto", "bridge_descriptor.bin"),
        ("proto/process.proto", "process_descriptor.bin"),
    ] {
        println!("cargo:rerun-if-changed={proto}");
        tonic_prost_build::configure()
            .file_descriptor_set_path(out.join(descriptor))
            // Payload fields decode as `bytes::Bytes`, sliced from the receive buffer.
            .bytes(".mcpcontainer")
            .bytes(".bridgepb")
            .bytes(".memoh.process.v1")
            .compile_protos(&[proto], &["proto"])?;
    }
    Ok(())
}
