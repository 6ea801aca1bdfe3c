//! ReverseHTTP, the host side: a bot's own HTTP requests to host services, relayed through
//! the agent under an operator's allow-list.
//!
//! The bot's server listens on `127.0.0.1:18732` inside the bot and turns each HTTP request
//! into a `request` frame on a `bridgepb.ContainerService/ReverseHTTP` stream the host opened
//! (WIRE-BRIDGE.md sections 1 and 3). The agent keeps one such stream open to every running
//! bot while `[reverse_http] allow` is not empty, and answers every frame, concurrently, with
//! a `response` or an `error` of the same id:
//! - [`allow`]: the allow-list and the path normalisation that keeps a bot inside it;
//! - [`forward`]: the upstream request over plain HTTP/1.1 (headers filtered, body capped,
//!   110 s timeout);
//! - [`relay`]: one stream's frames, and the loop that keeps a bot's stream open.
//!
//! Only `http://` upstreams: an `https://` entry is refused when the configuration loads.

pub mod allow;
pub mod forward;
pub mod relay;
#[cfg(test)]
mod tests;

use std::time::Duration;

use memoh_proto::pb::bridgepb as bp;
use serde::Deserialize;

pub use allow::{AllowEntry, AllowList};

/// Most allow-list entries.
pub const MAX_ENTRIES: usize = 256;

/// `[reverse_http]` in `agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReverseHttpConfig {
    /// Prefixes bots may call, as `http://HOST:PORT/PATH`. Empty (the default): the feature
    /// is off, no stream is opened and a bot's requests get 503 from its own server.
    pub allow: Vec<AllowEntry>,
}

impl ReverseHttpConfig {
    /// Checks what parsing each entry cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.allow.len() > MAX_ENTRIES {
            return Err(format!(
                "{} allow entries; at most {MAX_ENTRIES}",
                self.allow.len()
            ));
        }
        Ok(())
    }

    /// Whether bots get a ReverseHTTP stream at all.
    pub fn enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    /// The allow-list.
    pub fn allow_list(&self) -> AllowList {
        AllowList(self.allow.clone())
    }
}

/// What happened to one request, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream and answered.
    Allowed,
    /// Refused by the allow-list or malformed.
    Refused,
    /// Allowed, but the upstream failed (connect, timeout, too large).
    Failed,
}

/// The answer frame to `req`: the upstream's response, or an error saying why not.
pub async fn answer(
    req: bp::ReverseHttpRequest,
    allow: &AllowList,
    timeout: Duration,
) -> (bp::ReverseHttpFrame, Outcome) {
    let id = req.id.clone();
    let error = |text: String, outcome| {
        (
            bp::ReverseHttpFrame {
                frame: Some(bp::reverse_http_frame::Frame::Error(bp::ReverseHttpError {
                    id: id.clone(),
                    error: text,
                })),
            },
            outcome,
        )
    };
    let (entry, path, method, headers) = match check(&req, allow) {
        Ok(v) => v,
        Err(e) => return error(format!("reverse http: {e}"), Outcome::Refused),
    };
    match forward::send(&entry.authority, method, &path, headers, req.body, timeout).await {
        Ok(a) => (
            bp::ReverseHttpFrame {
                frame: Some(bp::reverse_http_frame::Frame::Response(
                    bp::ReverseHttpResponse {
                        id,
                        status_code: i32::from(a.status),
                        headers: a.headers,
                        body: a.body,
                    },
                )),
            },
            Outcome::Allowed,
        ),
        Err(e) => error(format!("reverse http: {e}"), Outcome::Failed),
    }
}

/// The entry, path, method and headers of an allowed request; why not otherwise.
fn check<'a>(
    req: &bp::ReverseHttpRequest,
    allow: &'a AllowList,
) -> Result<(&'a AllowEntry, String, http::Method, http::HeaderMap), String> {
    let shown: String = req.url.chars().take(200).collect();
    let clean = allow::clean_url(&req.url).map_err(|e| format!("{shown}: {e}"))?;
    let entry = allow
        .find(&clean)
        .ok_or_else(|| format!("{shown} is not allowed by the agent's configuration"))?;
    let method = http::Method::from_bytes(req.method.as_bytes())
        .ok()
        .filter(|m| !req.method.is_empty() && *m != http::Method::CONNECT)
        .ok_or_else(|| format!("method {:?} is not relayed", req.method))?;
    let headers = forward::relay_headers(&req.headers)?;
    Ok((entry, clean.path_and_query(), method, headers))
}
