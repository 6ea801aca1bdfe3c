//! `memoh-agent`: the host agent that owns every bot's container.
//!
//! Modules:
//! - [`bots`]: the lifecycle [`bots::Manager`]: create, start, stop, delete, reconcile,
//!   restarts, versions and their crash recovery, the one-time migration of legacy data.
//! - [`api`]: the control socket's surface: the control API, its MCP calls and the
//!   container-service router.
//! - [`daemon`]: startup, the control socket, systemd readiness; [`cli`]: the operator's CLI.
//! - [`ids`]: bot ids and derived names; [`pool`]: one channel per bot.
//! - [`config`]: the TOML configuration; [`doctor`]: host checks for operators.
//! - [`cgroup`]: what a bot's cgroup says it uses (v1 or v2).
//! - [`logdriver`]: the bot server's size-bounded, rotated log (a program containerd's shim
//!   runs next to each bot task).
//! - [`metrics`]: Prometheus metrics (`/metrics` on the MCP listener).
//! - [`mcp`]: MCP over streamable HTTP: the container as tools, stdio MCP servers in the bot.
//! - [`containerd`]: images, containers, snapshots and tasks on containerd ([`containerd::Runtime`]).
//! - `fuzz_checks` (hidden): invariants of the pure parsers, for `fuzz/` and corpus replay.
//! - [`error`]: [`AgentError`], the one error type, and its gRPC status mapping.
//! - [`reverse_http`]: ReverseHTTP, the host side: a bot's HTTP requests relayed to the
//!   host services an allow-list names.
//! - [`network`]: bot networking: named namespaces, CNI (a small libcni), MASQUERADE and
//!   bot-to-bot isolation ([`network::Network`]).

pub mod api;
pub mod bots;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod containerd;
pub mod daemon;
pub mod doctor;
pub mod error;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod ids;
pub mod logdriver;
pub mod mcp;
pub mod metrics;
pub mod network;
pub mod pool;
pub mod procs;
pub mod reverse_http;
mod steps;
mod sync;

pub use error::AgentError;
