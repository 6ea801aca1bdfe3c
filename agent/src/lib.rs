//! `memoh-agent`: the host agent that owns every bot's container.
//!
//! Modules:
//! - [`config`]: the TOML configuration.
//! - [`containerd`]: images, containers, snapshots and tasks on containerd ([`containerd::Runtime`]).
//! - [`error`]: [`AgentError`], the one error type, and its gRPC status mapping.
//! - [`network`]: bot networking: named namespaces, CNI (a small libcni), MASQUERADE and
//!   bot-to-bot isolation ([`network::Network`]).

pub mod config;
pub mod containerd;
pub mod error;
pub mod network;

pub use error::AgentError;
