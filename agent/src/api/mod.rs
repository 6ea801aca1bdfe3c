//! The agent's surface on its control socket: the control API, its MCP calls, and the
//! ContainerService routers. Handlers are a few lines: validate, call the lifecycle
//! ([`crate::bots::Manager`]) or the MCP hub, map the error; nothing here reaches containerd
//! but through the lifecycle.
//!
//! - [`control`]: the control API, `memoh.agent.v1.AgentService`;
//! - [`control_mcp`]: its MCP calls (stdio server registrations);
//! - [`proxy`]: the container service, `mcpcontainer.ContainerService` and its successor
//!   `bridgepb.ContainerService`, routed to a bot by `x-memoh-bot`;
//! - [`convert`]: wire messages to and from domain types.

use std::future::Future;

use tonic::Status;

use crate::error::AgentError;

pub mod control;
pub mod control_mcp;
pub mod convert;
pub mod proxy;

/// Runs a lifecycle operation detached from its call, so it finishes even when the caller
/// goes away (a half-made bot or version cycle must not be left behind). A panic in it is
/// INTERNAL naming the operation.
pub(crate) async fn detached<T, F>(op: &'static str, fut: F) -> Result<T, Status>
where
    F: Future<Output = Result<T, AgentError>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("{op} task failed: {e}"))),
    }
}
