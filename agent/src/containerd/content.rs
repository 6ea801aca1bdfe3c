//! containerd's content store: writing blobs (lockstep over the Write stream), reading them,
//! labelling them for the garbage collector, and leases that keep half-imported content alive.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    content_client::ContentClient, leases_client::LeasesClient, AbortRequest, DeleteRequest,
    InfoRequest, ReadContentRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{CreateRequest as LeaseCreateRequest, Info as ContentInfo};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use super::Containerd;
use crate::error::AgentError;

/// Largest chunk sent in one Write message.
pub(crate) const CHUNK: usize = 1 << 20;

/// Hex sha256 of `data` as an OCI digest string.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A unique-enough suffix for ingest refs, lease ids and extraction keys.
pub(crate) fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// An open ingest in containerd's content store. Every request gets one answer, so writes go
/// in lockstep: that keeps HTTP/2 flow control from ever blocking both sides.
pub(crate) struct ContentWriter {
    tx: mpsc::Sender<WriteContentRequest>,
    rx: Streaming<containerd_client::services::v1::WriteContentResponse>,
    reference: String,
    offset: i64,
    total: i64,
    expected: String,
    hasher: Sha256,
}

impl ContentWriter {
    /// Sends one request and waits for its answer.
    async fn round_trip(&mut self, req: WriteContentRequest) -> Result<(), AgentError> {
        let op = || format!("content write {}", self.reference);
        if self.tx.send(req).await.is_err() {
            return Err(AgentError::containerd(
                op(),
                tonic::Status::aborted("write stream closed"),
            ));
        }
        match self.rx.message().await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(AgentError::containerd(
                op(),
                tonic::Status::aborted("write stream ended early"),
            )),
            Err(status) => Err(AgentError::containerd(op(), status)),
        }
    }

    /// Appends `data`.
    pub(crate) async fn write(&mut self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(CHUNK) {
            self.hasher.update(chunk);
            let req = WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: self.reference.clone(),
                total: self.total,
                expected: self.expected.clone(),
                offset: self.offset,
                data: chunk.to_vec(),
                labels: HashMap::new(),
            };
            self.round_trip(req).await?;
            self.offset += chunk.len() as i64;
        }
        Ok(())
    }

    /// Commits the blob; returns its digest and size. Content that already exists counts as
    /// committed.
    pub(crate) async fn commit(
        mut self,
        labels: HashMap<String, String>,
    ) -> Result<(String, i64), AgentError> {
        let digest = format!("sha256:{}", hex(&self.hasher.clone().finalize()));
        if !self.expected.is_empty() && self.expected != digest {
            return Err(AgentError::Image {
                reference: self.reference.clone(),
                reason: format!("digest mismatch: expected {}, got {digest}", self.expected),
            });
        }
        let req = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.reference.clone(),
            total: self.offset,
            expected: digest.clone(),
            offset: self.offset,
            data: Vec::new(),
            labels,
        };
        match self.round_trip(req).await {
            Ok(()) => {}
            Err(AgentError::Containerd { status, .. }) if status.code() == Code::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok((digest, self.offset))
    }
}

impl Containerd {
    pub(crate) fn content(&self) -> ContentClient<tonic::transport::Channel> {
        ContentClient::new(self.channel.clone())
    }

    /// Info on a blob, `None` when the store lacks it.
    pub(crate) async fn content_info(
        &self,
        digest: &str,
    ) -> Result<Option<ContentInfo>, AgentError> {
        let req = self.request(InfoRequest {
            digest: digest.to_string(),
        });
        match self.content().info(req).await {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(format!("content info {digest}"), s)),
        }
    }

    /// Opens an ingest named `reference` under `lease`. A stale ingest of that name is
    /// aborted first so the write starts at offset 0.
    pub(crate) async fn content_writer(
        &self,
        reference: &str,
        lease: &str,
        total: i64,
        expected: Option<&str>,
    ) -> Result<ContentWriter, AgentError> {
        let abort = self.request_leased(
            AbortRequest {
                r#ref: reference.to_string(),
            },
            lease,
        );
        match self.content().abort(abort).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => {
                return Err(AgentError::containerd(
                    format!("content abort {reference}"),
                    s,
                ))
            }
        }
        let (tx, rx) = mpsc::channel(1);
        let stream = ReceiverStream::new(rx);
        let req = self.request_leased(stream, lease);
        let expected = expected.unwrap_or_default().to_string();
        // The first message must be on its way before the call resolves.
        tx.send(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total,
            expected: expected.clone(),
            offset: 0,
            data: Vec::new(),
            labels: HashMap::new(),
        })
        .await
        .map_err(|_| {
            AgentError::containerd(
                format!("content write {reference}"),
                tonic::Status::aborted("write stream closed"),
            )
        })?;
        let mut rx = self
            .content()
            .write(req)
            .await
            .map_err(|s| AgentError::containerd(format!("content write {reference}"), s))?
            .into_inner();
        // The answer to the STAT.
        match rx.message().await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(AgentError::containerd(
                    format!("content write {reference}"),
                    tonic::Status::aborted("write stream ended early"),
                ))
            }
            Err(s) => {
                return Err(AgentError::containerd(
                    format!("content write {reference}"),
                    s,
                ))
            }
        }
        Ok(ContentWriter {
            tx,
            rx,
            reference: reference.to_string(),
            offset: 0,
            total,
            expected,
            hasher: Sha256::new(),
        })
    }

    /// Writes a blob held in memory unless the store has it already; returns its digest.
    pub(crate) async fn write_blob(
        &self,
        data: &[u8],
        lease: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, AgentError> {
        let digest = sha256_digest(data);
        if self.content_info(&digest).await?.is_some() {
            if !labels.is_empty() {
                self.label_content(&digest, &labels).await?;
            }
            return Ok(digest);
        }
        // Unique per writer: two writers of one ref would abort each other.
        let reference = format!("memoh-{}-{}", digest.replace(':', "-"), unique_suffix());
        let mut w = self
            .content_writer(&reference, lease, data.len() as i64, Some(&digest))
            .await?;
        w.write(data).await?;
        w.commit(labels).await?;
        Ok(digest)
    }

    /// Reads a whole blob (manifests, configs: small things).
    pub(crate) async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, AgentError> {
        let req = self.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        });
        let op = || format!("content read {digest}");
        let mut stream = self
            .content()
            .read(req)
            .await
            .map_err(|s| AgentError::containerd(op(), s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| AgentError::containerd(op(), s))?
        {
            out.extend_from_slice(&msg.data);
        }
        Ok(out)
    }

    /// Sets labels on a blob, keeping the others.
    pub(crate) async fn label_content(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = self.request(UpdateRequest {
            info: Some(ContentInfo {
                digest: digest.to_string(),
                labels: labels.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        });
        self.content()
            .update(req)
            .await
            .map_err(|s| AgentError::containerd(format!("content label {digest}"), s))?;
        Ok(())
    }

    /// Creates a lease that expires by itself after `ttl` should the agent die before
    /// deleting it.
    pub(crate) async fn create_lease(&self, ttl: Duration) -> Result<String, AgentError> {
        let id = format!("memoh-{}", unique_suffix());
        let expire = chrono::Utc::now()
            + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let req = self.request(LeaseCreateRequest {
            id: id.clone(),
            labels,
        });
        LeasesClient::new(self.channel.clone())
            .create(req)
            .await
            .map_err(|s| AgentError::containerd(format!("create lease {id}"), s))?;
        Ok(id)
    }

    /// Deletes a lease; what it protected is collected unless something else references it.
    pub(crate) async fn delete_lease(&self, id: &str) -> Result<(), AgentError> {
        let req = self.request(DeleteRequest {
            id: id.to_string(),
            sync: false,
        });
        match LeasesClient::new(self.channel.clone()).delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(AgentError::containerd(format!("delete lease {id}"), s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
