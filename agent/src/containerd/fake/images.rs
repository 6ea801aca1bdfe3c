//! The fake's [`Connection`] and [`Images`]: image records a test registers; archive import
//! and registry pull are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{unsupported, FakeRuntime, Snapshot, State};
use crate::containerd::{
    normalize_image_ref, Connection, ImageSummary, Images, ProgressFn, PullOptions, ResolvedImage,
    SnapshotInfo, SnapshotKind,
};
use crate::error::AgentError;

/// Makes the committed snapshot of `image`'s top layer, unless it exists.
pub(super) fn unpack(s: &mut State, image: &ResolvedImage) {
    if s.snapshots.contains_key(&image.chain_id) {
        return;
    }
    let at = s.now();
    s.snapshots.insert(
        image.chain_id.clone(),
        Snapshot {
            info: SnapshotInfo {
                name: image.chain_id.clone(),
                parent: None,
                kind: SnapshotKind::Committed,
                labels: HashMap::new(),
                created_at: Some(at),
                updated_at: Some(at),
            },
            files: BTreeMap::from([("/app/mcp".to_string(), image.name.clone())]),
            ghost: false,
        },
    );
}

pub(super) fn resolve(s: &State, reference: &str) -> Result<ResolvedImage, AgentError> {
    let name = normalize_image_ref(reference)?;
    s.images
        .get(&name)
        .cloned()
        .ok_or(AgentError::ImageNotFound(name))
}

#[async_trait::async_trait]
impl Connection for FakeRuntime {
    fn namespace(&self) -> &str {
        "fake"
    }

    fn snapshotter(&self) -> &str {
        "fake"
    }

    async fn version(&self) -> Result<String, AgentError> {
        self.call("version", |_| Ok("fake".to_string()))
    }
}

#[async_trait::async_trait]
impl Images for FakeRuntime {
    async fn import_archive(
        &self,
        _path: &Path,
        _name: Option<&str>,
        _progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        self.call("import_archive", |_| Err(unsupported("import archives")))
    }

    async fn pull_image(
        &self,
        _reference: &str,
        _options: &PullOptions,
        _progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        self.call("pull_image", |_| Err(unsupported("pull from registries")))
    }

    async fn list_images(&self) -> Result<Vec<ImageSummary>, AgentError> {
        self.call("list_images", |s| {
            Ok(s.images
                .values()
                .map(|i| ImageSummary {
                    name: i.name.clone(),
                    target_digest: i.target_digest.clone(),
                    media_type: "application/vnd.oci.image.index.v1+json".into(),
                    size: 0,
                    labels: HashMap::new(),
                })
                .collect())
        })
    }

    async fn resolve_image(&self, reference: &str) -> Result<ResolvedImage, AgentError> {
        self.call("resolve_image", |s| resolve(s, reference))
    }

    async fn ensure_unpacked(&self, reference: &str) -> Result<ResolvedImage, AgentError> {
        self.call("ensure_unpacked", |s| {
            let image = resolve(s, reference)?;
            unpack(s, &image);
            Ok(image)
        })
    }

    async fn delete_image(&self, reference: &str) -> Result<bool, AgentError> {
        self.call("delete_image", |s| {
            let name = normalize_image_ref(reference)?;
            Ok(s.images.remove(&name).is_some())
        })
    }
}

/// The fake keeps no content: a live version's layer, its image and pushing are refused;
/// cycle leases are recorded only so recovery can list and delete them.
#[async_trait::async_trait]
impl crate::containerd::Layers for FakeRuntime {
    async fn create_cycle_lease(&self, _bot: &str) -> Result<String, AgentError> {
        Err(unsupported("keep leases"))
    }

    async fn delete_cycle_lease(&self, _id: &str) -> Result<(), AgentError> {
        Ok(())
    }

    async fn cycle_leases(&self, _bot: &str) -> Result<Vec<String>, AgentError> {
        Ok(Vec::new())
    }

    async fn diff_snapshot(
        &self,
        _key: &str,
        _parent: Option<&str>,
        _lease: &str,
    ) -> Result<crate::containerd::LayerBlob, AgentError> {
        Err(unsupported("diff snapshots"))
    }

    async fn write_version_image(
        &self,
        _name: &str,
        _base: &str,
        _stack: bool,
        _layer: &crate::containerd::LayerBlob,
        _comment: &str,
        _labels: &HashMap<String, String>,
        _lease: &str,
    ) -> Result<crate::containerd::VersionImage, AgentError> {
        Err(unsupported("write version images"))
    }

    async fn tag_image(
        &self,
        _source: &str,
        _name: &str,
        _labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        Err(unsupported("tag images"))
    }

    async fn push_image(
        &self,
        _name: &str,
        _target: &str,
        _options: &PullOptions,
    ) -> Result<String, AgentError> {
        Err(unsupported("push to registries"))
    }
}
