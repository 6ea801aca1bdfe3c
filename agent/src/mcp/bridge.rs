//! The MCP servers the HTTP layer serves: [`ToolsServer`] (the container as tools) and
//! [`StdioBridge`] (one client's view of a shared stdio [`Session`]). Both are rmcp
//! [`ServerHandler`]s; rmcp keeps each client's request ids, the session supplies its own ids
//! upstream.

// `logging/setLevel` is deprecated in the newest protocol but older clients still send it.
#![allow(deprecated)]

use std::sync::{Arc, Mutex, OnceLock};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientResult, CompleteRequestParams,
    CompleteResult, ContentBlock, CustomNotification, CustomRequest, CustomResult, ErrorCode,
    GetPromptRequestParams, GetPromptResponse, GetPromptResult, InitializeRequestParams,
    InitializeResult, ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse,
    ReadResourceResult, ServerCapabilities, ServerConfig, ServerNotification, ServerRequest,
    SetLevelRequestParams, SubscribeRequestParams, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, Peer, RequestContext};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tracing::{debug, warn};

use super::stdio::{CallError, RpcError, ServerMessage, Session};
use super::tools;
use super::ClientSource;

/// The container of one bot as tools (files, commands, background processes).
#[derive(Clone)]
pub struct ToolsServer {
    source: Arc<dyn ClientSource>,
    bot: String,
}

impl ToolsServer {
    /// Tools on `bot`'s container; clients come from `source` on every call.
    pub fn new(source: Arc<dyn ClientSource>, bot: impl Into<String>) -> Self {
        Self {
            source,
            bot: bot.into(),
        }
    }

    /// Runs one tool call and shapes the MCP result (failures are tool errors).
    pub async fn run(&self, name: &str, args: &rmcp::model::JsonObject) -> CallToolResult {
        let client = match self.source.client(&self.bot).await {
            Ok(c) => c,
            Err(e) => return tool_error(format!("bot {:?} is unreachable: {e}", self.bot)),
        };
        match tools::call(&client, name, args).await {
            Ok(v) => {
                let text = serde_json::to_string(&v).unwrap_or_default();
                let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
                r.structured_content = Some(v);
                r
            }
            Err(e) => {
                if let Some(s) = e.status() {
                    if s.code() == tonic::Code::Unavailable {
                        self.source.report_failure(&self.bot, s);
                    }
                }
                debug!(bot = %self.bot, tool = name, error = %e, "tool failed");
                tool_error(e.to_string())
            }
        }
    }
}

fn tool_error(text: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

impl ServerHandler for ToolsServer {
    fn get_info(&self) -> ServerConfig {
        let mut c = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        c.server_info.name = "memoh-agent".into();
        c.server_info.version = env!("CARGO_PKG_VERSION").into();
        c.instructions = Some(format!(
            "The Linux container of bot {}: files (relative paths are under /data) and commands.",
            self.bot
        ));
        c
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::definitions()))
    }

    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        tools::definitions().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let known = matches!(
            &*request.name,
            "read"
                | "write"
                | "list"
                | "edit"
                | "exec"
                | "process_output"
                | "process_list"
                | "process_signal"
                | "process_wait"
        );
        let label = if known { &*request.name } else { "other" };
        let run = self.run(&request.name, &args);
        Ok(crate::metrics::time_tool("builtin", label, run)
            .await
            .into())
    }
}

/// One HTTP client's handle on a shared stdio session.
pub struct StdioBridge {
    session: Session,
    client: u64,
    peer: OnceLock<Peer<RoleServer>>,
    info: Mutex<Option<InitializeResult>>,
}

impl StdioBridge {
    /// A bridge for a new client of `session`.
    pub fn new(session: Session) -> Self {
        let client = session.new_client();
        Self {
            session,
            client,
            peer: OnceLock::new(),
            info: Mutex::new(None),
        }
    }

    /// Remembers the client's peer once and starts forwarding server messages to it.
    fn attach(&self, peer: &Peer<RoleServer>) {
        if self.peer.set(peer.clone()).is_err() {
            return;
        }
        let mut rx = self.session.subscribe();
        let peer = peer.clone();
        let session = self.session.clone();
        let me = self.client;
        tokio::spawn(async move {
            loop {
                let msg = match rx.recv().await {
                    Ok(m) => m,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(skipped = n, "client too slow for server messages");
                        continue;
                    }
                    Err(_) => return,
                };
                if peer.is_transport_closed() {
                    return;
                }
                match msg {
                    ServerMessage::Notification { method, params } => {
                        let n = to_typed::<ServerNotification>(&method, params);
                        if let Some(n) = n {
                            if peer.send_notification(n).await.is_err() {
                                return;
                            }
                        }
                    }
                    ServerMessage::Request {
                        generation,
                        id,
                        method,
                        params,
                        target,
                    } => {
                        if target != 0 && target != me {
                            continue;
                        }
                        let reply = match to_typed::<ServerRequest>(&method, params) {
                            Some(r) => match peer.send_request(r).await {
                                Ok(res) => Ok(client_result_value(res)),
                                Err(e) => Err(RpcError {
                                    code: -32603,
                                    message: format!("client did not answer: {e}"),
                                    data: None,
                                }),
                            },
                            None => Err(RpcError {
                                code: -32601,
                                message: format!("method {method:?} cannot be forwarded"),
                                data: None,
                            }),
                        };
                        session.respond(generation, id, reply).await;
                    }
                }
            }
        });
    }

    async fn forward<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: Option<P>,
        context: &RequestContext<RoleServer>,
    ) -> Result<R, ErrorData> {
        self.attach(&context.peer);
        let mut params = params.map(|p| serde_json::to_value(p).unwrap_or(Value::Null));
        if let Some(Value::Object(m)) = params.as_mut() {
            if !m.contains_key("_meta") && !context.meta.is_empty() {
                if let Ok(meta) = serde_json::to_value(&context.meta) {
                    m.insert("_meta".into(), meta);
                }
            }
        }
        let v = self
            .session
            .call(self.client, method, params, &context.ct)
            .await
            .map_err(call_error)?;
        serde_json::from_value(v).map_err(|e| {
            ErrorData::internal_error(
                format!("the server's {method} result does not parse: {e}"),
                None,
            )
        })
    }
}

fn to_typed<T: DeserializeOwned>(method: &str, params: Option<Value>) -> Option<T> {
    let mut v = serde_json::json!({"method": method});
    if let Some(p) = params {
        v["params"] = p;
    }
    match serde_json::from_value(v) {
        Ok(t) => Some(t),
        Err(e) => {
            debug!(method, error = %e, "server message not understood");
            None
        }
    }
}

fn client_result_value(r: ClientResult) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

fn call_error(e: CallError) -> ErrorData {
    match e {
        CallError::Rpc(r) => ErrorData::new(ErrorCode(r.code as i32), r.message, r.data),
        CallError::Cancelled => ErrorData::new(ErrorCode(-32800), "request cancelled", None),
        other => ErrorData::internal_error(other.to_string(), None),
    }
}

impl ServerHandler for StdioBridge {
    fn get_info(&self) -> ServerConfig {
        if let Some(i) = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return i;
        }
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .build(),
        )
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        let r: InitializeResult = self.forward("initialize", Some(request), &context).await?;
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        Ok(r)
    }

    async fn ping(&self, context: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        let _: Value = self.forward::<Value, _>("ping", None, &context).await?;
        Ok(())
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        self.forward("completion/complete", Some(request), &context)
            .await
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let _: Value = self
            .forward("logging/setLevel", Some(request), &context)
            .await?;
        Ok(())
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let r: GetPromptResult = self.forward("prompts/get", Some(request), &context).await?;
        Ok(r.into())
    }

    async fn list_prompts(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        self.forward("prompts/list", request, &context).await
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        self.forward("resources/list", request, &context).await
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        self.forward("resources/templates/list", request, &context)
            .await
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let r: ReadResourceResult = self
            .forward("resources/read", Some(request), &context)
            .await?;
        Ok(r.into())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let _: Value = self
            .forward("resources/subscribe", Some(request), &context)
            .await?;
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let _: Value = self
            .forward("resources/unsubscribe", Some(request), &context)
            .await?;
        Ok(())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let call = self.forward("tools/call", Some(request), &context);
        let r: CallToolResult = crate::metrics::time_tool("stdio", "any", call).await?;
        Ok(r.into())
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.forward("tools/list", request, &context).await
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        let v: Value = self
            .forward(&request.method, request.params, &context)
            .await?;
        Ok(CustomResult(v))
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.attach(&context.peer);
    }

    async fn on_roots_list_changed(&self, context: NotificationContext<RoleServer>) {
        self.attach(&context.peer);
        self.session
            .notify("notifications/roots/list_changed", None)
            .await;
    }

    async fn on_custom_notification(
        &self,
        notification: CustomNotification,
        context: NotificationContext<RoleServer>,
    ) {
        self.attach(&context.peer);
        self.session
            .notify(&notification.method, notification.params)
            .await;
    }
}
