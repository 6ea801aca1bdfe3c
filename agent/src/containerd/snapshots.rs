//! Snapshots of the configured snapshotter: the [`Snapshots`] trait, its types, and its
//! implementation for [`Containerd`].

use std::collections::HashMap;
use std::time::SystemTime;

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest,
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    UpdateSnapshotRequest, UsageRequest,
};
use tonic::Code;

use super::containers::missing;
use super::{to_system_time, Containerd};
use crate::error::AgentError;

/// A mount of a root filesystem, as snapshots hand them out and tasks take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// Mount type (`overlay`, `bind`).
    pub kind: String,
    /// Source.
    pub source: String,
    /// Target; usually empty for rootfs mounts.
    pub target: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Kind of snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Read-only view.
    View,
    /// Writable, mountable.
    Active,
    /// Read-only, can be a parent.
    Committed,
    /// Anything else.
    Unknown,
}

/// A snapshot as containerd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Key (active) or name (committed).
    pub name: String,
    /// Parent's name, if any.
    pub parent: Option<String>,
    /// Kind.
    pub kind: SnapshotKind,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Creation time.
    pub created_at: Option<SystemTime>,
    /// Last update.
    pub updated_at: Option<SystemTime>,
}

/// The disk a snapshot uses of its own, as its snapshotter counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// Bytes.
    pub size: u64,
    /// Inodes, the snapshot's own root directory included.
    pub inodes: u64,
}

/// Snapshots of the configured snapshotter.
#[async_trait::async_trait]
pub trait Snapshots: Send + Sync {
    /// Prepares an active snapshot `key` on `parent` (committed name or chain id; `None` for
    /// an empty one) and returns its mounts. Without a [`LABEL_GC_ROOT`] label containerd's
    /// collector removes an active snapshot as soon as no container references it (right
    /// after its container is deleted, for one).
    async fn prepare_snapshot(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
    ) -> Result<Vec<RootfsMount>, AgentError>;

    /// Mounts of an existing active snapshot.
    async fn snapshot_mounts(&self, key: &str) -> Result<Vec<RootfsMount>, AgentError>;

    /// Commits active snapshot `key` as read-only `name`; `key` is gone afterwards.
    async fn commit_snapshot(
        &self,
        name: &str,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError>;

    /// Removes a snapshot. Returns whether it existed. Fails while it has children.
    async fn remove_snapshot(&self, key: &str) -> Result<bool, AgentError>;

    /// A snapshot's info, `None` when missing.
    async fn stat_snapshot(&self, key: &str) -> Result<Option<SnapshotInfo>, AgentError>;

    /// What a snapshot holds of its own (for an active one: what was written on top of its
    /// parent), `None` when missing.
    async fn snapshot_usage(&self, key: &str) -> Result<Option<SnapshotUsage>, AgentError>;

    /// Snapshots matching any of `filters` (all when empty).
    async fn list_snapshots(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, AgentError>;

    /// Sets labels on a snapshot; an empty value removes the label. Others stay.
    async fn update_snapshot_labels(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<SnapshotInfo, AgentError>;
}

pub(crate) fn rootfs_to_pb(m: &RootfsMount) -> containerd_client::types::Mount {
    containerd_client::types::Mount {
        r#type: m.kind.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
    }
}

pub(crate) fn rootfs_from_pb(m: containerd_client::types::Mount) -> RootfsMount {
    RootfsMount {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

fn from_pb(i: Info) -> SnapshotInfo {
    let kind = match Kind::try_from(i.kind) {
        Ok(Kind::View) => SnapshotKind::View,
        Ok(Kind::Active) => SnapshotKind::Active,
        Ok(Kind::Committed) => SnapshotKind::Committed,
        _ => SnapshotKind::Unknown,
    };
    SnapshotInfo {
        parent: (!i.parent.is_empty()).then_some(i.parent),
        name: i.name,
        kind,
        labels: i.labels,
        created_at: to_system_time(i.created_at),
        updated_at: to_system_time(i.updated_at),
    }
}

impl Containerd {
    pub(crate) fn snapshots(&self) -> SnapshotsClient<tonic::transport::Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    fn with_lease<T>(&self, msg: T, lease: Option<&str>) -> tonic::Request<T> {
        match lease {
            Some(l) => self.request_leased(msg, l),
            None => self.request(msg),
        }
    }

    /// [`Snapshots::prepare_snapshot`], attaching the snapshot to `lease` when given.
    pub(crate) async fn prepare_snapshot_leased(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
        lease: Option<&str>,
    ) -> Result<Vec<RootfsMount>, AgentError> {
        let req = self.with_lease(
            PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
                parent: parent.unwrap_or_default().to_string(),
                labels: labels.clone(),
            },
            lease,
        );
        let out = self
            .snapshots()
            .prepare(req)
            .await
            .map_err(|s| AgentError::containerd(format!("prepare snapshot {key}"), s))?
            .into_inner();
        Ok(out.mounts.into_iter().map(rootfs_from_pb).collect())
    }

    /// [`Snapshots::commit_snapshot`], attaching the snapshot to `lease` when given.
    pub(crate) async fn commit_snapshot_leased(
        &self,
        name: &str,
        key: &str,
        labels: &HashMap<String, String>,
        lease: Option<&str>,
    ) -> Result<(), AgentError> {
        let req = self.with_lease(
            CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: name.to_string(),
                key: key.to_string(),
                labels: labels.clone(),
            },
            lease,
        );
        self.snapshots()
            .commit(req)
            .await
            .map_err(|s| AgentError::containerd(format!("commit snapshot {key} as {name}"), s))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Snapshots for Containerd {
    async fn prepare_snapshot(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
    ) -> Result<Vec<RootfsMount>, AgentError> {
        self.prepare_snapshot_leased(key, parent, labels, None)
            .await
    }

    async fn commit_snapshot(
        &self,
        name: &str,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        self.commit_snapshot_leased(name, key, labels, None).await
    }

    async fn snapshot_mounts(&self, key: &str) -> Result<Vec<RootfsMount>, AgentError> {
        let req = self.request(MountsRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        let out = self
            .snapshots()
            .mounts(req)
            .await
            .map_err(|s| AgentError::containerd(format!("snapshot mounts {key}"), s))?
            .into_inner();
        Ok(out.mounts.into_iter().map(rootfs_from_pb).collect())
    }

    async fn remove_snapshot(&self, key: &str) -> Result<bool, AgentError> {
        let req = self.request(RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        match self.snapshots().remove(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(AgentError::containerd(format!("remove snapshot {key}"), s)),
        }
    }

    async fn stat_snapshot(&self, key: &str) -> Result<Option<SnapshotInfo>, AgentError> {
        let req = self.request(StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        match self.snapshots().stat(req).await {
            Ok(r) => Ok(r.into_inner().info.map(from_pb)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(format!("stat snapshot {key}"), s)),
        }
    }

    async fn snapshot_usage(&self, key: &str) -> Result<Option<SnapshotUsage>, AgentError> {
        let req = self.request(UsageRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        match self.snapshots().usage(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok(Some(SnapshotUsage {
                    size: u64::try_from(r.size).unwrap_or(0),
                    inodes: u64::try_from(r.inodes).unwrap_or(0),
                }))
            }
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(
                format!("usage of snapshot {key}"),
                s,
            )),
        }
    }

    async fn list_snapshots(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, AgentError> {
        let req = self.request(ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: filters.to_vec(),
        });
        let mut stream = self
            .snapshots()
            .list(req)
            .await
            .map_err(|s| AgentError::containerd("list snapshots", s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| AgentError::containerd("list snapshots", s))?
        {
            out.extend(msg.info.into_iter().map(from_pb));
        }
        Ok(out)
    }

    async fn update_snapshot_labels(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<SnapshotInfo, AgentError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = self.request(UpdateSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            info: Some(Info {
                name: key.to_string(),
                labels: labels.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        });
        let op = || format!("update snapshot {key} labels");
        let out = self
            .snapshots()
            .update(req)
            .await
            .map_err(|s| AgentError::containerd(op(), s))?
            .into_inner();
        out.info.map(from_pb).ok_or_else(|| missing(&op()))
    }
}
