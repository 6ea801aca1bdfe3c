//! The connection to containerd: the [`Containerd`] client and the [`Connection`] trait
//! (namespace, snapshotter, version) every concern trait builds on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::version_client::VersionClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::Config;
use crate::error::AgentError;

/// What every runtime tells about itself: where it works and what answers.
#[async_trait::async_trait]
pub trait Connection: Send + Sync {
    /// The containerd namespace in use.
    fn namespace(&self) -> &str;
    /// The snapshotter in use.
    fn snapshotter(&self) -> &str;

    /// containerd's version string.
    async fn version(&self) -> Result<String, AgentError>;
}

/// The real [`Runtime`](super::Runtime): containerd over its unix socket. Cheap to clone.
#[derive(Clone)]
pub struct Containerd {
    pub(super) channel: Channel,
    socket: PathBuf,
    namespace: String,
    namespace_header: MetadataValue<tonic::metadata::Ascii>,
    pub(super) snapshotter: String,
    pub(super) runtime: String,
    pub(super) runc_root: Option<String>,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("namespace", &self.namespace)
            .field("snapshotter", &self.snapshotter)
            .field("runtime", &self.runtime)
            .field("runc_root", &self.runc_root)
            .finish()
    }
}

fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 76
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && ns.as_bytes()[0].is_ascii_alphanumeric()
        && ns.as_bytes()[ns.len() - 1].is_ascii_alphanumeric()
}

impl Containerd {
    /// Connects to containerd at `socket` and checks it answers.
    /// [`AgentError::ContainerdUnreachable`] when it does not.
    pub async fn connect(
        socket: impl AsRef<Path>,
        namespace: &str,
        snapshotter: &str,
        runtime: &str,
    ) -> Result<Self, AgentError> {
        let socket = socket.as_ref().to_path_buf();
        if !valid_namespace(namespace) {
            return Err(AgentError::InvalidArgument(format!(
                "containerd namespace {namespace:?}: use letters, digits, '.', '_' and '-'"
            )));
        }
        let unreachable = |reason: String| AgentError::ContainerdUnreachable {
            socket: socket.clone(),
            reason,
        };
        let channel =
            tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(&socket))
                .await
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| {
                    let mut reason = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        reason = format!("{reason}: {s}");
                        src = s.source();
                    }
                    unreachable(reason)
                })?;
        let namespace_header = MetadataValue::try_from(namespace)
            .map_err(|_| AgentError::InvalidArgument(format!("namespace {namespace:?}")))?;
        let me = Self {
            channel,
            socket: socket.clone(),
            namespace: namespace.to_string(),
            namespace_header,
            snapshotter: snapshotter.to_string(),
            runtime: runtime.to_string(),
            runc_root: None,
        };
        match tokio::time::timeout(Duration::from_secs(10), me.version()).await {
            Ok(Ok(v)) => {
                tracing::debug!(socket = %socket.display(), version = %v, "connected to containerd");
                Ok(me)
            }
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable("version call timed out".into())),
        }
    }

    /// Connects with the socket, namespace, snapshotter and runtime of `config`.
    pub async fn from_config(config: &Config) -> Result<Self, AgentError> {
        Self::connect(
            &config.containerd_socket,
            &config.namespace,
            &config.snapshotter,
            &config.runtime,
        )
        .await
    }

    /// Makes tasks keep runc's state under `root` instead of runc's default
    /// (`/run/containerd/runc/<namespace>`); a private containerd needs its own.
    pub fn with_runc_root(mut self, root: impl AsRef<Path>) -> Self {
        self.runc_root = Some(root.as_ref().display().to_string());
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The runtime name new containers get.
    pub fn runtime_name(&self) -> &str {
        &self.runtime
    }

    /// The underlying channel, for calls this layer does not wrap.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Wraps a message in a request carrying the namespace.
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace_header.clone());
        r
    }

    /// Like [`Self::request`], also attaching what the call creates to `lease`.
    pub(crate) fn request_leased<T>(&self, msg: T, lease: &str) -> tonic::Request<T> {
        let mut r = self.request(msg);
        if let Ok(v) = MetadataValue::try_from(lease) {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }
}

#[async_trait::async_trait]
impl Connection for Containerd {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    async fn version(&self) -> Result<String, AgentError> {
        let v = VersionClient::new(self.channel.clone())
            .version(tonic::Request::new(()))
            .await
            .map_err(|s| AgentError::containerd("version", s))?
            .into_inner();
        Ok(v.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["default", "memoh-test_1", "a.b"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in ["", "-a", "a b", "a/b", "a-"] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }
}
