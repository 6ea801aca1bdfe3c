//! Who may use the MCP listener: the `Host` and `Origin` checks (against DNS rebinding: a web
//! page in a browser on the host must not reach the agent through a name it controls), then
//! the bearer token. Authentication is always on: without `mcp_token` in the configuration the
//! agent generates one on first start into `<state_dir>/mcp.token` (0600) and keeps it, and
//! `memoh-agent mcp token` prints it through the control socket (root's).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::Config;
use crate::error::AgentError;

/// Names every listener answers to (with any port).
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Where a generated token is kept.
pub fn token_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("mcp.token")
}

/// The configured token, or the one generated earlier, or a new one (written 0600).
pub fn load_or_create_token(cfg: &Config) -> Result<String, AgentError> {
    if let Some(t) = cfg.mcp_token.as_deref().filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    let path = token_path(cfg);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(&path, e)),
    }
    let token = crate::bots::create::new_token()?;
    crate::bots::create::write_private(&cfg.state_dir, &path, &format!("{token}\n"))?;
    tracing::info!(path = %path.display(), "generated the mcp token (memoh-agent mcp token prints it)");
    Ok(token)
}

/// The host part of a `Host` value or an authority: no port, no brackets, lowercase.
fn host_of(value: &str) -> String {
    let v = value.trim();
    let host = if let Some(rest) = v.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else if v.matches(':').count() > 1 {
        v // a bare IPv6 address
    } else {
        v.split(':').next().unwrap_or_default()
    };
    host.to_ascii_lowercase()
}

/// The access rules of one listener.
#[derive(Debug, Clone)]
pub struct Access {
    token: Arc<str>,
    hosts: Arc<[String]>,
    metrics_public: bool,
}

impl Access {
    /// Rules for a listener on `listen` with `token`: the loopback names, the listen address
    /// (unless it is a wildcard) and `extra_hosts` are accepted in `Host` and `Origin`.
    pub fn new(token: &str, listen: &str, extra_hosts: &[String], metrics_public: bool) -> Self {
        let mut hosts: Vec<String> = LOOPBACK_NAMES.iter().map(|h| h.to_string()).collect();
        let own = host_of(listen);
        if !own.is_empty() && own != "0.0.0.0" && own != "::" {
            hosts.push(own);
        }
        hosts.extend(extra_hosts.iter().map(|h| host_of(h)));
        Self {
            token: token.into(),
            hosts: hosts.into(),
            metrics_public,
        }
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn host_allowed(&self, host: &str) -> bool {
        let h = host_of(host);
        self.hosts.contains(&h)
    }

    /// `Err(answer)` when the request may not pass: 403 for a foreign `Host` or `Origin`
    /// (checked first, so a rebinding page learns nothing about the token), 401 for a missing
    /// or wrong token (`/metrics` is exempt with `metrics_public`).
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: &Request) -> Result<(), Response> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        // A request without any host (HTTP/1.0) comes from no browser: nothing to rebind.
        if let Some(h) = host.as_deref() {
            if !self.host_allowed(h) {
                return Err(forbidden(&format!("host {h:?} is not served here")));
            }
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or_default();
            let authority = o
                .split_once("://")
                .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
                .unwrap_or_default();
            if authority.is_empty() || !self.host_allowed(authority) {
                return Err(forbidden(&format!("origin {o:?} is not allowed")));
            }
        }
        if self.metrics_public && req.uri().path() == "/metrics" {
            return Ok(());
        }
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| {
                memoh_proto::auth::constant_time_eq(v.as_bytes(), self.token.as_bytes())
            });
        if !ok {
            return Err(
                (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response(),
            );
        }
        Ok(())
    }
}

fn forbidden(why: &str) -> Response {
    (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
}

/// The MCP SDKs take a session DELETE answered with anything but 200 for a failure ("Session
/// termination failed: 202"); the streamable HTTP services answer 202.
pub fn session_end_answer(method: &Method, mut resp: Response) -> Response {
    if method == Method::DELETE && resp.status() == StatusCode::ACCEPTED {
        *resp.status_mut() = StatusCode::OK;
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn req(path: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    fn status(a: &Access, r: &Request) -> u16 {
        match a.check(r) {
            Ok(()) => 200,
            Err(resp) => resp.status().as_u16(),
        }
    }

    #[test]
    fn host_and_origin_first_then_the_token() {
        let a = Access::new(
            "s3cret",
            "127.0.0.1:8091",
            &["agent.internal".into()],
            false,
        );
        let tok = ("authorization", "Bearer s3cret");
        for host in [
            "127.0.0.1:8091",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8091",
            "agent.internal",
        ] {
            assert_eq!(
                status(&a, &req("/bots/b/mcp", &[("host", host), tok])),
                200,
                "{host}"
            );
        }
        // A rebinding page: a foreign name, with or without the token.
        assert_eq!(
            status(
                &a,
                &req("/bots/b/mcp", &[("host", "evil.example:8091"), tok])
            ),
            403
        );
        assert_eq!(
            status(&a, &req("/bots/b/mcp", &[("host", "evil.example")])),
            403
        );
        for origin in [
            "http://evil.example",
            "null",
            "https://evil.example:8091/x",
            "garbage",
        ] {
            let r = req(
                "/bots/b/mcp",
                &[("host", "localhost"), ("origin", origin), tok],
            );
            assert_eq!(status(&a, &r), 403, "{origin}");
        }
        let r = req(
            "/bots/b/mcp",
            &[
                ("host", "localhost"),
                ("origin", "http://localhost:3000"),
                tok,
            ],
        );
        assert_eq!(status(&a, &r), 200);
        // The token.
        assert_eq!(
            status(&a, &req("/bots/b/mcp", &[("host", "localhost")])),
            401
        );
        let wrong = ("authorization", "Bearer s3cre");
        assert_eq!(
            status(&a, &req("/bots/b/mcp", &[("host", "localhost"), wrong])),
            401
        );
        assert_eq!(status(&a, &req("/metrics", &[("host", "localhost")])), 401);
        let public = Access::new("s3cret", "127.0.0.1:8091", &[], true);
        assert_eq!(
            status(&public, &req("/metrics", &[("host", "localhost")])),
            200
        );
        assert_eq!(
            status(&public, &req("/metrics", &[("host", "evil.example")])),
            403
        );
        assert_eq!(
            status(&public, &req("/bots/b/mcp", &[("host", "localhost")])),
            401
        );
    }

    #[test]
    fn wildcard_listen_addresses_add_no_name() {
        let a = Access::new("t", "0.0.0.0:8091", &[], false);
        assert_eq!(
            status(
                &a,
                &req(
                    "/m",
                    &[("host", "0.0.0.0:8091"), ("authorization", "Bearer t")]
                )
            ),
            403
        );
        let a = Access::new("t", "10.1.2.3:8091", &[], false);
        assert_eq!(
            status(
                &a,
                &req(
                    "/m",
                    &[("host", "10.1.2.3:8091"), ("authorization", "Bearer t")]
                )
            ),
            200
        );
    }

    #[test]
    fn a_generated_token_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            state_dir: d.path().join("state"),
            ..Config::default()
        };
        let t1 = load_or_create_token(&cfg).unwrap();
        assert_eq!(t1.len(), 64);
        let md = std::fs::metadata(token_path(&cfg)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_token(&cfg).unwrap(), t1);
        let cfg = Config {
            mcp_token: Some("given".into()),
            ..cfg
        };
        assert_eq!(load_or_create_token(&cfg).unwrap(), "given");
    }

    #[test]
    fn only_an_accepted_delete_becomes_ok() {
        let r = (StatusCode::ACCEPTED, "").into_response();
        assert_eq!(
            session_end_answer(&Method::DELETE, r).status(),
            StatusCode::OK
        );
        let r = (StatusCode::ACCEPTED, "").into_response();
        assert_eq!(
            session_end_answer(&Method::POST, r).status(),
            StatusCode::ACCEPTED
        );
        let r = (StatusCode::NOT_FOUND, "").into_response();
        assert_eq!(
            session_end_answer(&Method::DELETE, r).status(),
            StatusCode::NOT_FOUND
        );
    }
}
