//! The control API's MCP handlers (`McpAdd`, `McpList`, `McpRemove`, `McpLogs`): validate,
//! call the [`Mcp`] hub, map the result. [`super::control::Control`] delegates to these.

use std::sync::Arc;

use memoh_proto::pb::agent as pb;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::server_info;
use super::detached;
use crate::error::AgentError;
use crate::mcp::registry::ServerSpec;
use crate::mcp::{Mcp, ServerListing};

fn hub(mcp: Option<&Arc<Mcp>>) -> Result<&Arc<Mcp>, Status> {
    mcp.ok_or_else(|| {
        AgentError::FailedPrecondition(
            "the mcp server is disabled on this agent (mcp_listen is empty)".into(),
        )
        .into()
    })
}

/// `McpAdd`: registers (or replaces) a stdio server in the bot.
#[instrument(skip_all, fields(bot = %req.get_ref().bot_id, name = %req.get_ref().name))]
pub async fn add(
    mcp: Option<&Arc<Mcp>>,
    req: Request<pb::McpAddRequest>,
) -> Result<Response<pb::McpServerInfo>, Status> {
    let mcp = hub(mcp)?.clone();
    let r = req.into_inner();
    crate::ids::validate(&r.bot_id)?;
    let spec = ServerSpec {
        name: r.name,
        command: r.command,
        env: r.env,
        cwd: (!r.cwd.is_empty()).then_some(r.cwd),
    };
    crate::mcp::registry::validate(&spec)?;
    let listing = ServerListing {
        spec: spec.clone(),
        status: None,
    };
    // Detached: the registry write finishes even if the caller goes away.
    let replaced = detached("mcp add", async move { mcp.add(&r.bot_id, spec).await }).await?;
    Ok(Response::new(server_info(listing, replaced)))
}

/// `McpList`: the bot's registrations with the state of their sessions.
pub async fn list(
    mcp: Option<&Arc<Mcp>>,
    req: Request<pb::BotRef>,
) -> Result<Response<pb::McpListResponse>, Status> {
    let mcp = hub(mcp)?;
    let bot = req.into_inner().bot_id;
    crate::ids::validate(&bot)?;
    let servers = mcp.list(&bot).await?;
    Ok(Response::new(pb::McpListResponse {
        servers: servers.into_iter().map(|l| server_info(l, false)).collect(),
    }))
}

/// `McpRemove`: removes a registration and stops its session.
#[instrument(skip_all, fields(bot = %req.get_ref().bot_id, name = %req.get_ref().name))]
pub async fn remove(
    mcp: Option<&Arc<Mcp>>,
    req: Request<pb::McpServerRef>,
) -> Result<Response<pb::McpRemoveResponse>, Status> {
    let mcp = hub(mcp)?.clone();
    let r = req.into_inner();
    crate::ids::validate(&r.bot_id)?;
    crate::mcp::registry::validate_name(&r.name)?;
    detached(
        "mcp remove",
        async move { mcp.remove(&r.bot_id, &r.name).await },
    )
    .await?;
    Ok(Response::new(pb::McpRemoveResponse {}))
}

/// `McpLogs`: the server's kept stderr.
pub async fn logs(
    mcp: Option<&Arc<Mcp>>,
    req: Request<pb::McpServerRef>,
) -> Result<Response<pb::McpLogsResponse>, Status> {
    let mcp = hub(mcp)?;
    let r = req.into_inner();
    crate::ids::validate(&r.bot_id)?;
    crate::mcp::registry::validate_name(&r.name)?;
    let data = mcp.logs(&r.bot_id, &r.name).await?.into_bytes();
    Ok(Response::new(pb::McpLogsResponse { data }))
}

/// `McpToken`: the listener's bearer token and address.
pub fn token(mcp: Option<&Arc<Mcp>>) -> Result<Response<pb::McpTokenResponse>, Status> {
    let (token, listen) = hub(mcp)?.token().ok_or_else(|| {
        Status::from(AgentError::FailedPrecondition(
            "the mcp server is not serving yet".into(),
        ))
    })?;
    Ok(Response::new(pb::McpTokenResponse { token, listen }))
}
