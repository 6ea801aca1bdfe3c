//! `memoh-agent`: the host agent that owns every bot's container.
//!
//! Modules:
//! - [`config`]: the TOML configuration.
//! - [`error`]: [`AgentError`], the one error type, and its gRPC status mapping.

pub mod config;
pub mod error;

pub use error::AgentError;
