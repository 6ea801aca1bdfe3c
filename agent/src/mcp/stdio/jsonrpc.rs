//! JSON-RPC framing of the stdio MCP transport: one message a line, parsed and built here.

use serde_json::{json, Value};

use super::RpcError;

/// One line of a server's stdout, classified. Pure, so the envelope and id handling can be
/// fuzzed (`fuzz/fuzz_targets/jsonrpc_envelope.rs`).
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Nothing but whitespace.
    Blank,
    /// Not a JSON object: a log line printed on stdout, trimmed.
    Log(String),
    /// The answer to the agent's request `id`.
    Reply {
        /// The agent's id.
        id: u64,
        /// The result or the error object.
        reply: Result<Value, RpcError>,
    },
    /// An answer whose id the agent cannot have sent (not an unsigned integer).
    StrayReply(Value),
    /// A request from the server to the client.
    Request {
        /// The server's id, echoed in the answer.
        id: Value,
        /// The method.
        method: String,
        /// The params, if any.
        params: Option<Value>,
    },
    /// A notification from the server.
    Notification {
        /// The method.
        method: String,
        /// The params, if any.
        params: Option<Value>,
    },
    /// A JSON object with neither a method nor an id.
    Dropped,
}

/// Classifies one line (with or without its newline) a server printed.
pub fn parse_line(line: &[u8]) -> Incoming {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Incoming::Blank;
    }
    let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(text) else {
        return Incoming::Log(text.to_string());
    };
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = msg.remove("id");
    let params = msg.remove("params");
    match (method, id) {
        (None, Some(id)) => {
            let Some(id) = id.as_u64() else {
                return Incoming::StrayReply(id);
            };
            let reply = match (msg.remove("result"), msg.remove("error")) {
                (_, Some(e)) => Err(RpcError {
                    code: e.get("code").and_then(Value::as_i64).unwrap_or(-32603),
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    data: e.get("data").cloned(),
                }),
                (Some(r), None) => Ok(r),
                (None, None) => Ok(Value::Null),
            };
            Incoming::Reply { id, reply }
        }
        (Some(method), Some(id)) => Incoming::Request { id, method, params },
        (Some(method), None) => Incoming::Notification { method, params },
        (None, None) => Incoming::Dropped,
    }
}

/// The request the agent sends: `{"jsonrpc": "2.0", "id", "method", "params"?}`.
pub fn request_message(id: u64, method: &str, params: Option<Value>) -> Value {
    let mut msg = json!({"jsonrpc": "2.0", "id": id, "method": method});
    if let Some(p) = params {
        msg["params"] = p;
    }
    msg
}

/// The answer to a server's request `id`.
pub fn response_message(id: Value, reply: Result<Value, RpcError>) -> Value {
    match reply {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": error_value(&e)}),
    }
}

/// One message as the line written to the server's stdin: compact JSON and a newline.
pub fn encode_line(msg: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
}

pub(super) fn error_value(e: &RpcError) -> Value {
    let mut v = json!({"code": e.code, "message": e.message});
    if let Some(d) = &e.data {
        v["data"] = d.clone();
    }
    v
}
