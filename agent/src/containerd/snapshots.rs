//! Snapshots of the configured snapshotter.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest,
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    UpdateSnapshotRequest, UsageRequest,
};
use tonic::Code;

use super::containers::missing;
use super::{
    rootfs_from_pb, to_system_time, Containerd, RootfsMount, SnapshotInfo, SnapshotKind,
    SnapshotUsage,
};
use crate::error::AgentError;

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

    pub(crate) async fn prepare_snapshot_inner(
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

    pub(crate) async fn snapshot_mounts_inner(
        &self,
        key: &str,
    ) -> Result<Vec<RootfsMount>, AgentError> {
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

    pub(crate) async fn commit_snapshot_inner(
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

    pub(crate) async fn remove_snapshot_inner(&self, key: &str) -> Result<bool, AgentError> {
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

    pub(crate) async fn stat_snapshot_inner(
        &self,
        key: &str,
    ) -> Result<Option<SnapshotInfo>, AgentError> {
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

    pub(crate) async fn snapshot_usage_inner(
        &self,
        key: &str,
    ) -> Result<Option<SnapshotUsage>, AgentError> {
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

    pub(crate) async fn list_snapshots_inner(
        &self,
        filters: &[String],
    ) -> Result<Vec<SnapshotInfo>, AgentError> {
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

    pub(crate) async fn update_snapshot_labels_inner(
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
