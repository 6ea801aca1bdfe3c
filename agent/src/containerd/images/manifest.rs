//! OCI manifests, indexes and configs: media types, parsing, choosing this platform's
//! manifest, and the garbage-collector labels a manifest puts on its blobs.

use std::collections::HashMap;
use std::str::FromStr;

use containerd_client::types::Descriptor as PbDescriptor;
use oci_spec::image::{
    Arch, Descriptor, Digest as OciDigest, ImageConfiguration, ImageIndex, ImageManifest, Os,
};

use super::{image_err, ImageConfig};
use crate::error::AgentError;

pub(super) const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

pub(super) fn is_index(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

/// A blob as containerd's API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

impl Desc {
    pub(super) fn from_oci(d: &Descriptor) -> Self {
        Self {
            media_type: d.media_type().to_string(),
            digest: d.digest().to_string(),
            size: d.size() as i64,
        }
    }

    pub(super) fn to_pb(&self) -> PbDescriptor {
        PbDescriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: HashMap::new(),
        }
    }
}

/// Picks the linux/amd64 entry of an index; entries without a platform count as a match when
/// nothing better is there.
pub(super) fn pick_platform(
    index: &ImageIndex,
    mut available: impl FnMut(&Descriptor) -> bool,
) -> Option<&Descriptor> {
    let manifests = index.manifests();
    let exact = manifests.iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
            && available(d)
    });
    exact.or_else(|| {
        manifests
            .iter()
            .find(|d| d.platform().is_none() && !is_index(d.media_type().as_ref()) && available(d))
    })
}

pub(super) fn parse_index(reference: &str, bytes: &[u8]) -> Result<ImageIndex, AgentError> {
    ImageIndex::from_reader(bytes).map_err(|e| image_err(reference, format!("bad index: {e}")))
}

pub(super) fn parse_manifest(reference: &str, bytes: &[u8]) -> Result<ImageManifest, AgentError> {
    ImageManifest::from_reader(bytes)
        .map_err(|e| image_err(reference, format!("bad manifest: {e}")))
}

pub(super) fn parse_config(
    reference: &str,
    bytes: &[u8],
) -> Result<(ImageConfig, Vec<String>), AgentError> {
    let cfg = ImageConfiguration::from_reader(bytes)
        .map_err(|e| image_err(reference, format!("bad image config: {e}")))?;
    let exec = cfg.config().clone().unwrap_or_default();
    let config = ImageConfig {
        env: exec.env().clone().unwrap_or_default(),
        entrypoint: exec.entrypoint().clone().unwrap_or_default(),
        cmd: exec.cmd().clone().unwrap_or_default(),
        working_dir: exec.working_dir().clone().unwrap_or_default(),
        user: exec.user().clone().unwrap_or_default(),
    };
    Ok((config, cfg.rootfs().diff_ids().clone()))
}

/// Media type of a JSON manifest or index whose descriptor we do not have.
pub(super) fn sniff_media_type(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return mt.to_string();
    }
    if v.get("manifests").is_some() {
        MT_OCI_INDEX.to_string()
    } else {
        MT_OCI_MANIFEST.to_string()
    }
}

pub(super) fn gc_content_labels(manifest: &ImageManifest) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        manifest.config().digest().to_string(),
    );
    for (i, l) in manifest.layers().iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest().to_string(),
        );
    }
    labels
}

pub(super) fn digest_of(s: &str) -> Result<OciDigest, AgentError> {
    OciDigest::from_str(s).map_err(|e| image_err(s, format!("bad digest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_choice() {
        let index: ImageIndex = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,
             "digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111",
             "platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":2,
             "digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222",
             "platform":{"os":"linux","architecture":"amd64"}}]}"#,
        )
        .unwrap();
        let d = pick_platform(&index, |_| true).unwrap();
        assert!(d.digest().to_string().ends_with("2222"));
        assert!(pick_platform(&index, |d| d.size() == 1).is_none());
    }

    #[test]
    fn media_type_sniffing() {
        assert_eq!(sniff_media_type(br#"{"manifests":[]}"#), MT_OCI_INDEX);
        assert_eq!(
            sniff_media_type(format!(r#"{{"mediaType":"{MT_DOCKER_LIST}"}}"#).as_bytes()),
            MT_DOCKER_LIST
        );
        assert_eq!(sniff_media_type(br#"{"layers":[]}"#), MT_OCI_MANIFEST);
    }
}
