//! Versions as OCI images: the [`Layers`] trait and its implementation for [`Containerd`].
//!
//! A live version is the difference of a bot's active snapshot against its parent, computed by
//! containerd's diff service and written as a layer blob into the content store, plus a config
//! and a manifest that stack that layer on the image the bot runs on. Everything a cycle writes
//! is attached to a lease labelled with the bot ([`LABEL_CYCLE_LEASE`]); the image record and
//! the `containerd.io/gc.ref.content.*` labels on the manifest keep the finished version, and
//! deleting the lease lets the collector take whatever an interrupted cycle left.

use std::collections::HashMap;
use std::time::Duration;

use containerd_client::services::v1::snapshots::ViewSnapshotRequest;
use containerd_client::services::v1::{
    diff_client::DiffClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, DeleteRequest as LeaseDeleteRequest, DiffRequest, Image,
    ListRequest as LeaseListRequest, ReadContentRequest,
};
use futures::StreamExt;
use oci_client::secrets::RegistryAuth;

use super::content::{sha256_digest, unique_suffix};
use super::images::{manifest_layers, Registry, MT_OCI_MANIFEST};
use super::snapshots::{rootfs_from_pb, rootfs_to_pb};
use super::{Containerd, Images, PullOptions, Snapshots};
use crate::error::AgentError;

/// Label on a cycle's lease: the bot whose version it holds (recovery deletes such leases).
pub const LABEL_CYCLE_LEASE: &str = "memoh.version.lease";
/// Media type of the layers live versions write: an uncompressed tar, so the pause costs no
/// compression (registries and containerd take uncompressed OCI layers as they are).
pub const MT_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// How long a cycle's lease outlives a crashed agent that did not come back.
const CYCLE_LEASE_TTL: Duration = Duration::from_secs(3600);

/// A layer blob the diff service wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Media type.
    pub media_type: String,
    /// Digest of the blob.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Digest of the uncompressed tar (the config's diff id).
    pub diff_id: String,
}

/// A version image as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionImage {
    /// The image record's name.
    pub name: String,
    /// Digest of the manifest.
    pub manifest_digest: String,
    /// Number of layers (the base's plus the version's).
    pub layers: usize,
}

/// Versions as images: diffs of active snapshots, version images, leases, pushing.
#[async_trait::async_trait]
pub trait Layers: Send + Sync {
    /// Creates a cycle's lease for `bot`, labelled with [`LABEL_CYCLE_LEASE`]; it expires by
    /// itself should nobody delete it.
    async fn create_cycle_lease(&self, bot: &str) -> Result<String, AgentError>;

    /// Deletes a lease and lets the collector run at once; a missing lease is no error.
    async fn delete_cycle_lease(&self, id: &str) -> Result<(), AgentError>;

    /// The ids of the cycle leases of `bot`.
    async fn cycle_leases(&self, bot: &str) -> Result<Vec<String>, AgentError>;

    /// Writes the difference of active snapshot `key` against committed snapshot `parent`
    /// (against an empty tree when `None`) as an uncompressed layer blob under `lease`.
    async fn diff_snapshot(
        &self,
        key: &str,
        parent: Option<&str>,
        lease: &str,
    ) -> Result<LayerBlob, AgentError>;

    /// Writes the config and manifest of a version and records image `name` with `labels`:
    /// the layers of image `base` when `stack` (its config always: environment, entrypoint),
    /// then `layer`. `comment` goes into the config's history.
    #[allow(clippy::too_many_arguments)]
    async fn write_version_image(
        &self,
        name: &str,
        base: &str,
        stack: bool,
        layer: &LayerBlob,
        comment: &str,
        labels: &HashMap<String, String>,
        lease: &str,
    ) -> Result<VersionImage, AgentError>;

    /// Creates image record `name` pointing where image `source` points, with `labels`.
    async fn tag_image(
        &self,
        source: &str,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError>;

    /// Pushes image `name` (a single-manifest image of this store) to registry reference
    /// `target`; returns the manifest's digest.
    async fn push_image(
        &self,
        name: &str,
        target: &str,
        options: &PullOptions,
    ) -> Result<String, AgentError>;
}

fn lease_op(id: &str) -> String {
    format!("lease {id}")
}

impl Containerd {
    async fn create_image_record(
        &self,
        name: &str,
        target: containerd_client::types::Descriptor,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        let req = self.request(CreateImageRequest {
            image: Some(Image {
                name: name.to_string(),
                labels: labels.clone(),
                target: Some(target),
                created_at: None,
                updated_at: None,
            }),
            source_date_epoch: None,
        });
        ImagesClient::new(self.channel.clone())
            .create(req)
            .await
            .map_err(|s| AgentError::containerd(format!("create image {name}"), s))?;
        Ok(())
    }

    /// A blob's bytes as a stream of chunks, for pushing.
    async fn blob_stream(
        &self,
        digest: &str,
    ) -> Result<
        impl futures::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static,
        AgentError,
    > {
        let req = self.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        });
        let stream = self
            .content()
            .read(req)
            .await
            .map_err(|s| AgentError::containerd(format!("content read {digest}"), s))?
            .into_inner();
        Ok(stream.map(|m| {
            m.map(|m| bytes::Bytes::from(m.data)).map_err(|s| {
                oci_client::errors::OciDistributionError::GenericError(Some(format!(
                    "reading the content store: {}",
                    s.message()
                )))
            })
        }))
    }
}

#[async_trait::async_trait]
impl Layers for Containerd {
    async fn create_cycle_lease(&self, bot: &str) -> Result<String, AgentError> {
        let id = format!("memoh-version-{bot}-{}", unique_suffix());
        let expire = chrono::Utc::now()
            + chrono::Duration::from_std(CYCLE_LEASE_TTL).unwrap_or(chrono::Duration::hours(1));
        let labels = HashMap::from([
            (
                "containerd.io/gc.expire".to_string(),
                expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
            (LABEL_CYCLE_LEASE.to_string(), bot.to_string()),
        ]);
        let req = self.request(containerd_client::services::v1::CreateRequest {
            id: id.clone(),
            labels,
        });
        LeasesClient::new(self.channel.clone())
            .create(req)
            .await
            .map_err(|s| AgentError::containerd(format!("create {}", lease_op(&id)), s))?;
        Ok(id)
    }

    async fn delete_cycle_lease(&self, id: &str) -> Result<(), AgentError> {
        let req = self.request(LeaseDeleteRequest {
            id: id.to_string(),
            sync: true,
        });
        match LeasesClient::new(self.channel.clone()).delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(AgentError::containerd(
                format!("delete {}", lease_op(id)),
                s,
            )),
        }
    }

    async fn cycle_leases(&self, bot: &str) -> Result<Vec<String>, AgentError> {
        let req = self.request(LeaseListRequest {
            filters: vec![super::label_filter(LABEL_CYCLE_LEASE, Some(bot))],
        });
        let out = LeasesClient::new(self.channel.clone())
            .list(req)
            .await
            .map_err(|s| AgentError::containerd("list leases", s))?
            .into_inner();
        Ok(out.leases.into_iter().map(|l| l.id).collect())
    }

    async fn diff_snapshot(
        &self,
        key: &str,
        parent: Option<&str>,
        lease: &str,
    ) -> Result<LayerBlob, AgentError> {
        let right = self.snapshot_mounts(key).await?;
        let view_key = format!("memoh-diff-view-{}", unique_suffix());
        let left = match parent {
            Some(p) => {
                let req = self.request_leased(
                    ViewSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: view_key.clone(),
                        parent: p.to_string(),
                        labels: HashMap::new(),
                    },
                    lease,
                );
                self.snapshots()
                    .view(req)
                    .await
                    .map_err(|s| AgentError::containerd(format!("view snapshot {p}"), s))?
                    .into_inner()
                    .mounts
                    .into_iter()
                    .map(rootfs_from_pb)
                    .collect()
            }
            None => Vec::new(),
        };
        let req = self.request_leased(
            DiffRequest {
                left: left.iter().map(rootfs_to_pb).collect(),
                right: right.iter().map(rootfs_to_pb).collect(),
                media_type: MT_LAYER_TAR.to_string(),
                r#ref: format!("memoh-diff-{}", unique_suffix()),
                labels: HashMap::new(),
                source_date_epoch: None,
            },
            lease,
        );
        let result = DiffClient::new(self.channel.clone())
            .diff(req)
            .await
            .map_err(|s| AgentError::containerd(format!("diff snapshot {key}"), s));
        if parent.is_some() {
            if let Err(e) = self.remove_snapshot(&view_key).await {
                tracing::debug!(view = view_key, error = %e, "removing a diff view; its lease goes anyway");
            }
        }
        let d = result?.into_inner().diff.ok_or_else(|| AgentError::Image {
            reference: key.to_string(),
            reason: "the diff service returned no layer".into(),
        })?;
        Ok(LayerBlob {
            media_type: d.media_type,
            diff_id: d.digest.clone(),
            digest: d.digest,
            size: d.size,
        })
    }

    async fn write_version_image(
        &self,
        name: &str,
        base: &str,
        stack: bool,
        layer: &LayerBlob,
        comment: &str,
        labels: &HashMap<String, String>,
        lease: &str,
    ) -> Result<VersionImage, AgentError> {
        let resolved = self.resolve_image(base).await?;
        let base_manifest: serde_json::Value = serde_json::from_slice(
            &self.read_blob(&resolved.manifest_digest).await?,
        )
        .map_err(|e| AgentError::Image {
            reference: base.to_string(),
            reason: format!("bad manifest: {e}"),
        })?;
        let mut config: serde_json::Value = serde_json::from_slice(
            &self.read_blob(&resolved.config_digest).await?,
        )
        .map_err(|e| AgentError::Image {
            reference: base.to_string(),
            reason: format!("bad image config: {e}"),
        })?;
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut layers: Vec<serde_json::Value> = if stack {
            manifest_layers(&base_manifest)
        } else {
            Vec::new()
        };
        let mut diff_ids: Vec<serde_json::Value> = if stack {
            resolved
                .diff_ids
                .iter()
                .map(|d| serde_json::Value::String(d.clone()))
                .collect()
        } else {
            Vec::new()
        };
        diff_ids.push(layer.diff_id.clone().into());
        layers.push(serde_json::json!({
            "mediaType": layer.media_type,
            "digest": layer.digest,
            "size": layer.size,
        }));
        let entry = serde_json::json!({
            "created": created,
            "created_by": "memoh-agent snapshot create",
            "comment": comment,
        });
        let obj = config.as_object_mut().ok_or_else(|| AgentError::Image {
            reference: base.to_string(),
            reason: "image config is not an object".into(),
        })?;
        obj.insert("created".into(), created.clone().into());
        obj.insert(
            "rootfs".into(),
            serde_json::json!({"type": "layers", "diff_ids": diff_ids}),
        );
        let mut history = if stack {
            obj.get("history")
                .and_then(|h| h.as_array())
                .cloned()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        history.push(entry);
        obj.insert("history".into(), history.into());
        let config_bytes = serde_json::to_vec(&config).map_err(|e| AgentError::Image {
            reference: name.to_string(),
            reason: format!("encoding the config: {e}"),
        })?;
        let config_digest = self
            .write_blob(&config_bytes, lease, HashMap::new())
            .await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {
                "mediaType": MT_OCI_CONFIG,
                "digest": config_digest,
                "size": config_bytes.len(),
            },
            "layers": layers,
        });
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| AgentError::Image {
            reference: name.to_string(),
            reason: format!("encoding the manifest: {e}"),
        })?;
        let mut gc = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            config_digest.clone(),
        )]);
        for (i, l) in layers.iter().enumerate() {
            if let Some(d) = l.get("digest").and_then(|d| d.as_str()) {
                gc.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.to_string());
            }
        }
        let manifest_digest = self.write_blob(&manifest_bytes, lease, gc).await?;
        crate::bots::fault::fault("live-manifest");
        self.create_image_record(
            name,
            containerd_client::types::Descriptor {
                media_type: MT_OCI_MANIFEST.to_string(),
                digest: manifest_digest.clone(),
                size: manifest_bytes.len() as i64,
                annotations: HashMap::new(),
            },
            labels,
        )
        .await?;
        debug_assert_eq!(sha256_digest(&manifest_bytes), manifest_digest);
        Ok(VersionImage {
            name: name.to_string(),
            manifest_digest,
            layers: layers.len(),
        })
    }

    async fn tag_image(
        &self,
        source: &str,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        let resolved = self.resolve_image(source).await?;
        let size = self
            .content_info(&resolved.manifest_digest)
            .await?
            .map(|i| i.size)
            .unwrap_or_default();
        let bytes = self.read_blob(&resolved.manifest_digest).await?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(String::from)
            })
            .unwrap_or_else(|| MT_OCI_MANIFEST.to_string());
        self.create_image_record(
            name,
            containerd_client::types::Descriptor {
                media_type,
                digest: resolved.manifest_digest,
                size,
                annotations: HashMap::new(),
            },
            labels,
        )
        .await
    }

    async fn push_image(
        &self,
        name: &str,
        target: &str,
        options: &PullOptions,
    ) -> Result<String, AgentError> {
        let resolved = self.resolve_image(name).await?;
        let manifest_bytes = self.read_blob(&resolved.manifest_digest).await?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| AgentError::Image {
                reference: name.to_string(),
                reason: format!("bad manifest: {e}"),
            })?;
        let media_type = manifest
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or(MT_OCI_MANIFEST)
            .to_string();
        let registry = Registry::new(super::reference::ImageRef::parse(target)?, options);
        let (client, reference) = (registry.client(), registry.reference());
        let auth = match &options.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let err = |what: String| AgentError::Image {
            reference: registry.name().to_string(),
            reason: what,
        };
        client
            .auth(reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| err(format!("authenticating: {e}")))?;
        let mut blobs: Vec<(String, i64)> = vec![(resolved.config_digest.clone(), 0)];
        for l in manifest_layers(&manifest) {
            let d = l.get("digest").and_then(|d| d.as_str()).unwrap_or_default();
            let s = l.get("size").and_then(|s| s.as_i64()).unwrap_or_default();
            blobs.push((d.to_string(), s));
        }
        for (digest, _) in &blobs {
            if client
                .blob_exists(reference, digest)
                .await
                .map_err(|e| err(format!("checking blob {digest}: {e}")))?
            {
                continue;
            }
            let size = self
                .content_info(digest)
                .await?
                .map(|i| i.size)
                .ok_or_else(|| err(format!("blob {digest} is not in the content store")))?;
            let stream = self.blob_stream(digest).await?;
            client
                .push_blob_stream(reference, stream, digest, Some(size as u64))
                .await
                .map_err(|e| err(format!("pushing blob {digest}: {e}")))?;
        }
        let content_type = http::HeaderValue::from_str(&media_type)
            .map_err(|e| err(format!("media type {media_type:?}: {e}")))?;
        client
            .push_manifest_raw(reference, manifest_bytes, content_type)
            .await
            .map_err(|e| err(format!("pushing the manifest: {e}")))?;
        tracing::info!(image = name, target = registry.name(), "image pushed");
        Ok(resolved.manifest_digest)
    }
}
