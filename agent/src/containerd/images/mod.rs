//! Images: the [`Images`] trait, its types, and its implementation for [`Containerd`]:
//! listing, resolving to a config and chain id, deleting, and recording images (here);
//! importing archives ([`import`]), pulling from registries ([`pull`]), unpacking layers onto
//! snapshot chains ([`unpack`]), OCI manifest parsing ([`manifest`]) and progress with the
//! one blob copy loop ([`progress`]).
//!
//! Content written during an import or pull is held by a lease until the image record and
//! the garbage-collector labels that keep it alive are in place:
//! index -> manifests (`gc.ref.content.m.<i>`), manifest -> config and layers
//! (`gc.ref.content.config`, `gc.ref.content.l.<i>`), config -> unpacked snapshot chain
//! (`gc.ref.snapshot.<snapshotter>`).

mod import;
mod manifest;
mod progress;
mod pull;
mod unpack;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::{
    images_client::ImagesClient, CreateImageRequest, DeleteImageRequest, GetImageRequest, Image,
    ListImagesRequest, UpdateImageRequest,
};
use tonic::Code;

use super::archive;
use super::reference::{normalize_image_ref, ImageRef};
use super::{Containerd, Snapshots};
use crate::error::AgentError;
pub(crate) use manifest::MT_OCI_MANIFEST;
use manifest::{is_index, parse_config, parse_index, parse_manifest, pick_platform, Desc};
pub use progress::{no_progress, Progress, ProgressFn, ProgressPhase};
pub(super) use pull::Registry;
pub use unpack::chain_id;

/// The layer descriptors of a manifest (as JSON), bottom first.
pub(super) fn manifest_layers(manifest: &serde_json::Value) -> Vec<serde_json::Value> {
    manifest
        .get("layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default()
}

/// How long an import's lease may outlive a crashed agent.
const LEASE_TTL: Duration = Duration::from_secs(3600);

fn image_err(reference: &str, reason: impl Into<String>) -> AgentError {
    AgentError::Image {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

/// The parts of an image config a container's process needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Working directory; empty means `/`.
    pub working_dir: String,
    /// `uid[:gid]`; empty means root.
    pub user: String,
}

/// An image record as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// Full name (`docker.io/memohai/mcp:latest`).
    pub name: String,
    /// Digest of the target (index or manifest).
    pub target_digest: String,
    /// Media type of the target.
    pub media_type: String,
    /// Size of the target blob.
    pub size: i64,
    /// The record's labels.
    pub labels: HashMap<String, String>,
}

/// An image resolved down to its config for this platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Full name.
    pub name: String,
    /// Digest of the image record's target.
    pub target_digest: String,
    /// Digest of the linux/amd64 manifest.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// The process-relevant part of the config.
    pub config: ImageConfig,
    /// The config's rootfs diff ids, bottom layer first.
    pub diff_ids: Vec<String>,
    /// Chain id of the top layer: the snapshot parent of new containers.
    pub chain_id: String,
}

/// Options of a registry pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Allow plain HTTP to this registry (loopback registries always may).
    pub insecure: bool,
    /// Basic-auth user and password; anonymous when `None`.
    pub credentials: Option<(String, String)>,
}

/// Image records: importing, pulling, resolving, unpacking, deleting.
#[async_trait::async_trait]
pub trait Images: Send + Sync {
    /// Imports an OCI or Docker archive: writes its blobs, creates or updates the image
    /// records and unpacks them. `name` overrides the names found in the archive (it is
    /// required when the archive names none). Returns the image names.
    async fn import_archive(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError>;

    /// Pulls an image from its registry (linux/amd64), records it under its normalised name
    /// and unpacks it. Returns that name.
    async fn pull_image(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError>;

    /// All image records.
    async fn list_images(&self) -> Result<Vec<ImageSummary>, AgentError>;

    /// Resolves an image (name normalised first) to its config and chain id.
    /// [`AgentError::ImageNotFound`] when there is no such record.
    async fn resolve_image(&self, reference: &str) -> Result<ResolvedImage, AgentError>;

    /// Resolves an image and unpacks its layers into the configured snapshotter when the
    /// chain id's snapshot is missing.
    async fn ensure_unpacked(&self, reference: &str) -> Result<ResolvedImage, AgentError>;

    /// Deletes an image record; containerd collects unreferenced content and snapshots.
    /// Returns whether the record existed.
    async fn delete_image(&self, reference: &str) -> Result<bool, AgentError>;
}

/// An image to record: its names, the descriptor they point at, and the manifests (of this
/// platform) under it to unpack.
#[derive(Debug)]
struct NewImage {
    names: Vec<String>,
    target: Desc,
    manifests: Vec<String>,
}

impl Containerd {
    fn images(&self) -> ImagesClient<tonic::transport::Channel> {
        ImagesClient::new(self.channel.clone())
    }

    /// The image record of `reference` (normalised; the name as given is tried too).
    async fn get_image(&self, reference: &str) -> Result<Image, AgentError> {
        let normalised = normalize_image_ref(reference)?;
        let mut candidates = vec![normalised.clone()];
        if reference != normalised {
            candidates.push(reference.to_string());
        }
        for name in candidates {
            let req = self.request(GetImageRequest { name: name.clone() });
            match self.images().get(req).await {
                Ok(r) => {
                    if let Some(img) = r.into_inner().image {
                        return Ok(img);
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(AgentError::containerd(format!("get image {name}"), s)),
            }
        }
        Err(AgentError::ImageNotFound(normalised))
    }

    /// Labels parents, creates the records and unpacks; returns the names.
    async fn finish_images(
        &self,
        images: &[NewImage],
        refs: &HashMap<String, HashMap<String, String>>,
        lease: &str,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        for (digest, labels) in refs {
            self.label_content(digest, labels).await?;
        }
        let mut names = Vec::new();
        for image in images {
            for manifest in &image.manifests {
                self.unpack_manifest(manifest, lease, progress).await?;
            }
            for n in &image.names {
                self.put_image(n, &image.target).await?;
                names.push(n.clone());
            }
        }
        Ok(names)
    }

    /// Creates the image record, or points an existing one at `target`.
    async fn put_image(&self, name: &str, target: &Desc) -> Result<(), AgentError> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target.to_pb()),
            created_at: None,
            updated_at: None,
        };
        let req = self.request(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        });
        match self.images().create(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let req = self.request(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_string()],
                    }),
                    source_date_epoch: None,
                });
                self.images()
                    .update(req)
                    .await
                    .map_err(|s| AgentError::containerd(format!("update image {name}"), s))?;
                Ok(())
            }
            Err(s) => Err(AgentError::containerd(format!("create image {name}"), s)),
        }
    }
}

#[async_trait::async_trait]
impl Images for Containerd {
    async fn import_archive(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        if let Some(n) = name {
            normalize_image_ref(n)?;
        }
        progress::started(progress);
        let p = path.to_path_buf();
        let scanned = tokio::task::spawn_blocking(move || archive::scan(&p))
            .await
            .map_err(|e| {
                image_err(&path.display().to_string(), format!("reader panicked: {e}"))
            })??;
        let lease = self.create_lease(LEASE_TTL).await?;
        let result = self
            .import_scanned(path, &scanned, name, &lease, progress)
            .await;
        if let Err(e) = self.delete_lease(&lease).await {
            tracing::warn!(lease = %lease, error = %e, "could not delete import lease");
        }
        let names = result?;
        tracing::info!(archive = %path.display(), images = ?names, "image archive imported");
        progress::finished(progress);
        Ok(names)
    }

    async fn pull_image(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        let registry = Registry::new(ImageRef::parse(reference)?, options);
        progress::started(progress);
        let manifests = registry.manifests().await?;
        let lease = self.create_lease(LEASE_TTL).await?;
        let result = self
            .store_pulled(&registry, &manifests, &lease, progress)
            .await;
        if let Err(e) = self.delete_lease(&lease).await {
            tracing::warn!(lease = %lease, error = %e, "could not delete pull lease");
        }
        result?;
        tracing::info!(image = %registry.name(), "image pulled");
        progress::finished(progress);
        Ok(registry.name().to_string())
    }

    async fn list_images(&self) -> Result<Vec<ImageSummary>, AgentError> {
        let req = self.request(ListImagesRequest { filters: vec![] });
        let out = self
            .images()
            .list(req)
            .await
            .map_err(|s| AgentError::containerd("list images", s))?
            .into_inner();
        Ok(out
            .images
            .into_iter()
            .map(|i| {
                let t = i.target.unwrap_or_default();
                ImageSummary {
                    name: i.name,
                    target_digest: t.digest,
                    media_type: t.media_type,
                    size: t.size,
                    labels: i.labels,
                }
            })
            .collect())
    }

    async fn resolve_image(&self, reference: &str) -> Result<ResolvedImage, AgentError> {
        let image = self.get_image(reference).await?;
        let target = image
            .target
            .ok_or_else(|| image_err(&image.name, "image record has no target"))?;
        let mut manifest_digest = target.digest.clone();
        let mut media_type = target.media_type.clone();
        for _ in 0..4 {
            if !is_index(&media_type) {
                break;
            }
            let index = parse_index(&image.name, &self.read_blob(&manifest_digest).await?)?;
            let mut present = HashSet::new();
            for d in index.manifests() {
                if self.content_info(d.digest().as_ref()).await?.is_some() {
                    present.insert(d.digest().to_string());
                }
            }
            let chosen = pick_platform(&index, |d| present.contains(&d.digest().to_string()))
                .ok_or_else(|| image_err(&image.name, "no linux/amd64 manifest in the store"))?;
            manifest_digest = chosen.digest().to_string();
            media_type = chosen.media_type().to_string();
        }
        let m = parse_manifest(&image.name, &self.read_blob(&manifest_digest).await?)?;
        let config_digest = m.config().digest().to_string();
        let (config, diff_ids) = parse_config(&image.name, &self.read_blob(&config_digest).await?)?;
        let chain_id =
            chain_id(&diff_ids).ok_or_else(|| image_err(&image.name, "image has no layers"))?;
        Ok(ResolvedImage {
            name: image.name,
            target_digest: target.digest,
            manifest_digest,
            config_digest,
            config,
            diff_ids,
            chain_id,
        })
    }

    async fn ensure_unpacked(&self, reference: &str) -> Result<ResolvedImage, AgentError> {
        let resolved = self.resolve_image(reference).await?;
        if self.stat_snapshot(&resolved.chain_id).await?.is_none() {
            tracing::info!(image = %resolved.name, snapshotter = %self.snapshotter, "unpacking image");
            let lease = self.create_lease(LEASE_TTL).await?;
            let r = self
                .unpack_manifest(&resolved.manifest_digest, &lease, &no_progress)
                .await;
            if let Err(e) = self.delete_lease(&lease).await {
                tracing::warn!(lease = %lease, error = %e, "could not delete unpack lease");
            }
            r?;
        }
        Ok(resolved)
    }

    async fn delete_image(&self, reference: &str) -> Result<bool, AgentError> {
        let name = match self.get_image(reference).await {
            Ok(img) => img.name,
            Err(AgentError::ImageNotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let req = self.request(DeleteImageRequest {
            name: name.clone(),
            sync: true,
            target: None,
        });
        match self.images().delete(req).await {
            Ok(_) => {
                tracing::info!(image = %name, "image deleted");
                Ok(true)
            }
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(AgentError::containerd(format!("delete image {name}"), s)),
        }
    }
}
