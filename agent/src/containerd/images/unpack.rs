//! Unpacking: applying an image's layers with containerd's diff service onto the snapshot
//! chain named by their chain ids.

use std::collections::HashMap;

use containerd_client::services::v1::{diff_client::DiffClient, ApplyRequest};
use sha2::{Digest, Sha256};
use tonic::Code;

use super::image_err;
use super::manifest::{parse_config, parse_manifest, Desc};
use super::progress::{report, ProgressFn, ProgressPhase};
use crate::containerd::content::{hex, unique_suffix};
use crate::containerd::snapshots::rootfs_to_pb;
use crate::containerd::{Containerd, Snapshots};
use crate::error::AgentError;

/// The chain id of a stack of layers given their diff ids (uncompressed digests), bottom
/// first: `chain(0) = diff(0)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
/// `None` for an empty stack.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let mut iter = diff_ids.iter();
    let mut chain = iter.next()?.clone();
    for diff in iter {
        let mut h = Sha256::new();
        h.update(chain.as_bytes());
        h.update(b" ");
        h.update(diff.as_bytes());
        chain = format!("sha256:{}", hex(&h.finalize()));
    }
    Some(chain)
}

impl Containerd {
    /// Applies a manifest's layers onto the snapshot chain of its diff ids, skipping the part
    /// that exists, and labels the config so the chain lives as long as the image.
    pub(super) async fn unpack_manifest(
        &self,
        manifest_digest: &str,
        lease: &str,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        let m = parse_manifest(manifest_digest, &self.read_blob(manifest_digest).await?)?;
        let cfg_digest = m.config().digest().to_string();
        let (_, diff_ids) = parse_config(&cfg_digest, &self.read_blob(&cfg_digest).await?)?;
        if diff_ids.len() != m.layers().len() {
            return Err(image_err(
                manifest_digest,
                format!(
                    "{} layers but {} diff ids in the config",
                    m.layers().len(),
                    diff_ids.len()
                ),
            ));
        }
        let top =
            chain_id(&diff_ids).ok_or_else(|| image_err(manifest_digest, "image has no layers"))?;
        let total = diff_ids.len() as u64;
        let mut parent: Option<String> = None;
        for (i, layer) in m.layers().iter().enumerate() {
            let chain = chain_id(&diff_ids[..=i]).expect("non-empty");
            if self.stat_snapshot(&chain).await?.is_none() {
                self.apply_layer(
                    &Desc::from_oci(layer),
                    &diff_ids[i],
                    &chain,
                    parent.as_deref(),
                    lease,
                )
                .await?;
                let mut labels = HashMap::new();
                labels.insert(
                    "containerd.io/uncompressed".to_string(),
                    diff_ids[i].clone(),
                );
                self.label_content(layer.digest().as_ref(), &labels).await?;
            }
            report(progress, ProgressPhase::Unpacking, i as u64 + 1, total);
            parent = Some(chain);
        }
        let mut labels = HashMap::new();
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
            top.clone(),
        );
        self.label_content(&cfg_digest, &labels).await?;
        Ok(top)
    }

    /// Prepares a temporary snapshot on `parent`, applies one layer, checks the diff id and
    /// commits it as `chain`.
    async fn apply_layer(
        &self,
        layer: &Desc,
        diff_id: &str,
        chain: &str,
        parent: Option<&str>,
        lease: &str,
    ) -> Result<(), AgentError> {
        let key = format!("memoh-extract-{}-{chain}", unique_suffix());
        let mounts = self
            .prepare_snapshot_leased(&key, parent, &HashMap::new(), Some(lease))
            .await?;
        let result: Result<(), AgentError> = async {
            let req = self.request(ApplyRequest {
                diff: Some(layer.to_pb()),
                mounts: mounts.iter().map(rootfs_to_pb).collect(),
                payloads: HashMap::new(),
                sync_fs: false,
            });
            let applied = DiffClient::new(self.channel.clone())
                .apply(req)
                .await
                .map_err(|s| AgentError::containerd(format!("apply layer {}", layer.digest), s))?
                .into_inner()
                .applied
                .map(|d| d.digest)
                .unwrap_or_default();
            if applied != diff_id {
                return Err(image_err(
                    &layer.digest,
                    format!("layer unpacked to {applied}, config says {diff_id}"),
                ));
            }
            match self
                .commit_snapshot_leased(chain, &key, &HashMap::new(), Some(lease))
                .await
            {
                Ok(()) => Ok(()),
                Err(AgentError::Containerd { status, .. })
                    if status.code() == Code::AlreadyExists =>
                {
                    // Unpacked concurrently by someone else: theirs is as good.
                    Err(AgentError::Containerd {
                        op: String::new(),
                        status,
                    })
                }
                Err(e) => Err(e),
            }
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.remove_snapshot(&key).await;
                match e {
                    AgentError::Containerd { op, status }
                        if op.is_empty() && status.code() == Code::AlreadyExists =>
                    {
                        Ok(())
                    }
                    e => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids() {
        let a =
            "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4".to_string();
        let b =
            "sha256:2b9d7a1a0b3c1f1b8b0b9b1c1c3a3e8e0d6b7b2f8c5f1f1f1f1f1f1f1f1f1f1f".to_string();
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let mut h = Sha256::new();
        h.update(format!("{a} {b}").as_bytes());
        let want = format!("sha256:{}", hex(&h.finalize()));
        assert_eq!(chain_id(&[a.clone(), b.clone()]), Some(want.clone()));
        // Three layers chain on the previous chain id, not on the diff id.
        let c = "sha256:00".to_string();
        let mut h = Sha256::new();
        h.update(format!("{want} {c}").as_bytes());
        assert_eq!(
            chain_id(&[a, b, c]),
            Some(format!("sha256:{}", hex(&h.finalize())))
        );
    }

    #[test]
    fn chain_id_known_value() {
        // Two identical empty-tar layers; value computed independently with sha256sum.
        let empty =
            "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef".to_string();
        let got = chain_id(&[empty.clone(), empty.clone()]).unwrap();
        let mut h = Sha256::new();
        h.update(format!("{empty} {empty}"));
        assert_eq!(got, format!("sha256:{}", hex(&h.finalize())));
    }
}
