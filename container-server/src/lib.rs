//! `container-server`: the gRPC server inside every bot container.
//!
//! It serves `mcpcontainer.ContainerService` (WIRE.md) and, from the same implementation,
//! today's Memoh protocol `bridgepb.ContainerService` (WIRE-BRIDGE.md), plus gRPC health and
//! reflection. Modules, from the wire inwards:
//! - [`server`]: assembles the tonic server, the bearer-token check, size limits, listeners,
//!   shutdown; [`authority`] (from `memoh-proto`, shared with the agent): lets grpc C-core
//!   clients on a unix socket in (their `:authority`).
//! - [`service`]: thin handlers; [`bridge`]: the `bridgepb` names mapped onto them;
//!   [`convert`] maps wire types to domain types and back.
//! - [`tunnel`]: bridge Tunnel, TCP to the bot's loopback services; [`reverse_http`]: bridge
//!   ReverseHTTP, the bot's loopback HTTP listener answered by the host.
//! - [`fs`]: file operations (atomic writes, listings, stat); [`window`]: `ReadFile`'s numbered
//!   line window; [`mode`]: Go-style mode strings and times; [`paths`]: path cleaning.
//! - [`transfer`]: raw downloads and uploads shared by the streaming calls; [`anchored`]: the
//!   bridge's NoFollow I/O beneath a root (`openat2`); [`listing`]: the bridge's ListDir.
//! - [`exec`]: streaming commands in their own process groups; [`pty`]: the same on a
//!   pseudo-terminal; [`exec_env`]: the bridge's environment rule; [`bridge_exec`]: the
//!   bridge's exec conventions; [`reaper`]: PID 1 duties (with each child's resource use).
//! - [`process`]: `memoh.process.v1.ProcessService`, processes that outlive the call: a
//!   registry with bounds, output kept per stream in a ring spilled to files, Attach by offset.
//! - [`runtime`]: the tokio runtime whose threads are made at boot and kept, so calls that start
//!   no process keep working while the bot is at its process limit.
//! - [`tls`]: strict mutual TLS for the bridge's TCP listener.
//! - [`config`], [`error`]: settings and the one error type.
//! - `fuzz_checks` (hidden): invariants of the pure functions, for `fuzz/` and corpus replay.

pub mod anchored;
pub use memoh_proto::authority;
pub mod bridge;
pub mod bridge_exec;
pub mod config;
pub mod convert;
pub mod error;
pub mod exec;
pub mod exec_env;
pub mod fs;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod listing;
pub mod mode;
pub mod paths;
pub mod process;
pub mod pty;
pub mod reaper;
pub mod reverse_http;
pub mod runtime;
pub mod server;
pub mod service;
pub mod stream;
pub mod tls;
pub mod transfer;
pub mod tunnel;
pub mod window;

pub use config::{Config, ListenAddr};
pub use error::ServerError;
pub use server::{run, run_all, Listener};
