//! The wire contracts shared by `memoh-agent` and `container-server`.
//!
//! - [`pb`]: code generated from `proto/` (the container service of WIRE.md, its successor
//!   `bridgepb` of WIRE-BRIDGE.md, the process service of `process.proto`, and the agent's
//!   control API), plus the descriptor sets ([`FILE_DESCRIPTOR_SET`],
//!   [`BRIDGE_FILE_DESCRIPTOR_SET`], [`PROCESS_FILE_DESCRIPTOR_SET`]) for gRPC server reflection.
//! - [`limits`]: sizes and defaults both sides must agree on.
//! - [`auth`]: bearer tokens and their constant-time check.
//! - [`clean_end`]: the layer that lets a handler see a request stream's end only when the
//!   client half-closed it (a reset or cancelled call is an error, whatever the client stack).
//! - [`authority`]: the unix-socket connection wrapper that lets grpc C-core clients (grpcio,
//!   grpc++) with default settings in, for every server of ours on a unix socket.
//! - [`client`]: the typed client of `mcpcontainer.ContainerService`, with per-call deadlines on
//!   unary calls, none on streams, and optional bearer-token / bot-routing metadata.

pub mod auth;
pub mod authority;
pub mod clean_end;
pub mod client;
pub mod limits;

/// Generated protobuf and gRPC code.
pub mod pb {
    /// `mcpcontainer`: the in-container server's API (WIRE.md).
    #[allow(missing_docs, clippy::all)]
    pub mod mcpcontainer {
        tonic::include_proto!("mcpcontainer");
    }
    /// `bridgepb`: today's Memoh protocol for the in-container server (WIRE-BRIDGE.md), a
    /// superset of `mcpcontainer` under a new package name.
    #[allow(missing_docs, clippy::all)]
    pub mod bridgepb {
        tonic::include_proto!("bridgepb");
    }
    /// `memoh.process.v1`: processes that outlive the call, the container-server's own
    /// service next to the container services.
    #[allow(missing_docs, clippy::all)]
    pub mod process {
        tonic::include_proto!("memoh.process.v1");
    }
    /// `memoh.agent.v1`: the host agent's control API.
    #[allow(missing_docs, clippy::all)]
    pub mod agent {
        tonic::include_proto!("memoh.agent.v1");
    }
}

/// Encoded `FileDescriptorSet` of `mcpcontainer.proto`, for the server's gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("mcpcontainer_descriptor");
/// Encoded `FileDescriptorSet` of `bridge.proto`, for the server's gRPC reflection.
pub const BRIDGE_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("bridge_descriptor");
/// Encoded `FileDescriptorSet` of `process.proto`, for the server's gRPC reflection.
pub const PROCESS_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("process_descriptor");
/// Encoded `FileDescriptorSet` of `agent.proto`, for the agent's gRPC reflection.
pub const AGENT_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("agent_descriptor");

pub use client::{ContainerClient, ExecResult, ExecStream};
