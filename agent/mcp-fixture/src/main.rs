//! `mcp-fixture`: a stdio MCP server for tests, with no dependencies beyond serde_json so it
//! links statically into the busybox test image.
//!
//! Tools: `echo {text}` returns the text, `pid` returns the process id (tests kill it and watch
//! the agent restart it), `env {name}` returns an environment variable, `cwd` the working
//! directory. It prints one line on stderr when it starts.

use std::io::{BufRead, Write};

use serde_json::{json, Value};

fn tool_list() -> Value {
    let s =
        |props: Value, req: Value| json!({"type": "object", "properties": props, "required": req});
    json!({"tools": [
        {"name": "echo", "description": "return the text", "inputSchema": s(json!({"text": {"type": "string"}}), json!(["text"]))},
        {"name": "pid", "description": "the server's process id", "inputSchema": s(json!({}), json!([]))},
        {"name": "env", "description": "an environment variable", "inputSchema": s(json!({"name": {"type": "string"}}), json!(["name"]))},
        {"name": "cwd", "description": "the working directory", "inputSchema": s(json!({}), json!([]))}
    ]})
}

fn text(t: String) -> Value {
    json!({"content": [{"type": "text", "text": t}], "isError": false})
}

fn call(params: &Value) -> Result<Value, (i64, String)> {
    let args = params.get("arguments").cloned().unwrap_or(json!({}));
    let arg = |k: &str| {
        args.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    match params.get("name").and_then(Value::as_str).unwrap_or("") {
        "echo" => Ok(text(arg("text"))),
        "pid" => Ok(text(std::process::id().to_string())),
        "env" => Ok(text(std::env::var(arg("name")).unwrap_or_default())),
        "cwd" => Ok(text(
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        )),
        other => Err((-32602, format!("unknown tool {other:?}"))),
    }
}

fn main() {
    eprintln!("mcp-fixture started pid {}", std::process::id());
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            eprintln!("mcp-fixture: not json: {line}");
            continue;
        };
        let Some(id) = msg.get("id").cloned() else {
            continue;
        };
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            continue;
        };
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let r = match method {
            "initialize" => Ok(json!({
                "protocolVersion": params.get("protocolVersion").cloned().unwrap_or(json!("2025-06-18")),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "mcp-fixture", "version": "1.0.0"}
            })),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(tool_list()),
            "tools/call" => call(&params),
            other => Err((-32601, format!("method {other:?} not found"))),
        };
        let reply = match r {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
}
