//! The fake's [`Snapshots`]: kinds, parents, labels and the files tests write on them.

use std::collections::{BTreeMap, HashMap};

use tonic::Code;

use super::{apply_labels, matches, refused, FakeRuntime, Snapshot};
use crate::containerd::{RootfsMount, SnapshotInfo, SnapshotKind, SnapshotUsage, Snapshots};
use crate::error::AgentError;

fn mounts_of(key: &str) -> Vec<RootfsMount> {
    vec![RootfsMount {
        kind: "fake".into(),
        source: key.to_string(),
        target: String::new(),
        options: Vec::new(),
    }]
}

#[async_trait::async_trait]
impl Snapshots for FakeRuntime {
    async fn prepare_snapshot(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
    ) -> Result<Vec<RootfsMount>, AgentError> {
        self.call("prepare_snapshot", |s| {
            let op = format!("prepare snapshot {key}");
            if s.snapshots.contains_key(key) {
                return Err(refused(op, Code::AlreadyExists, "snapshot already exists"));
            }
            if let Some(p) = parent {
                match s.visible(p) {
                    None => return Err(refused(op, Code::NotFound, format!("parent {p}"))),
                    Some(ps) if ps.info.kind != SnapshotKind::Committed => {
                        return Err(refused(
                            op,
                            Code::InvalidArgument,
                            format!("parent {p} is not a committed snapshot"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            let at = s.now();
            s.snapshots.insert(
                key.to_string(),
                Snapshot {
                    info: SnapshotInfo {
                        name: key.to_string(),
                        parent: parent.map(str::to_string),
                        kind: SnapshotKind::Active,
                        labels: labels.clone(),
                        created_at: Some(at),
                        updated_at: Some(at),
                    },
                    files: BTreeMap::new(),
                    ghost: false,
                },
            );
            Ok(mounts_of(key))
        })
    }

    async fn snapshot_mounts(&self, key: &str) -> Result<Vec<RootfsMount>, AgentError> {
        self.call("snapshot_mounts", |s| {
            let op = format!("snapshot mounts {key}");
            match s.visible(key) {
                None => Err(refused(op, Code::NotFound, "snapshot not found")),
                Some(snap) if snap.info.kind != SnapshotKind::Active => Err(refused(
                    op,
                    Code::FailedPrecondition,
                    "a committed snapshot has no mounts",
                )),
                Some(_) => Ok(mounts_of(key)),
            }
        })
    }

    async fn commit_snapshot(
        &self,
        name: &str,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        self.call("commit_snapshot", |s| {
            let op = format!("commit snapshot {key} as {name}");
            match s.visible(key) {
                None => return Err(refused(op, Code::NotFound, "snapshot not found")),
                Some(snap) if snap.info.kind != SnapshotKind::Active => {
                    return Err(refused(
                        op,
                        Code::FailedPrecondition,
                        "not an active snapshot",
                    ))
                }
                Some(_) => {}
            }
            if s.snapshots.contains_key(name) {
                return Err(refused(op, Code::AlreadyExists, "snapshot already exists"));
            }
            let at = s.now();
            let mut snap = s.snapshots.remove(key).expect("checked above");
            // containerd gives the committed snapshot the commit's labels, not the key's.
            snap.info = SnapshotInfo {
                name: name.to_string(),
                parent: snap.info.parent,
                kind: SnapshotKind::Committed,
                labels: labels.clone(),
                created_at: Some(at),
                updated_at: Some(at),
            };
            s.snapshots.insert(name.to_string(), snap);
            Ok(())
        })
    }

    async fn remove_snapshot(&self, key: &str) -> Result<bool, AgentError> {
        self.call("remove_snapshot", |s| {
            if !s.snapshots.contains_key(key) {
                return Ok(false);
            }
            if s.children(key) > 0 {
                return Err(refused(
                    format!("remove snapshot {key}"),
                    Code::FailedPrecondition,
                    "cannot remove snapshot with child",
                ));
            }
            s.snapshots.remove(key);
            Ok(true)
        })
    }

    async fn stat_snapshot(&self, key: &str) -> Result<Option<SnapshotInfo>, AgentError> {
        self.call("stat_snapshot", |s| {
            Ok(s.visible(key).map(|s| s.info.clone()))
        })
    }

    async fn snapshot_usage(&self, key: &str) -> Result<Option<SnapshotUsage>, AgentError> {
        self.call("snapshot_usage", |s| {
            Ok(s.visible(key).map(Snapshot::usage))
        })
    }

    async fn list_snapshots(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.call("list_snapshots", |s| {
            let mut out = Vec::new();
            for snap in s.snapshots.values().filter(|s| !s.ghost) {
                if matches(&snap.info.labels, filters)? {
                    out.push(snap.info.clone());
                }
            }
            Ok(out)
        })
    }

    async fn update_snapshot_labels(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<SnapshotInfo, AgentError> {
        self.call("update_snapshot_labels", |s| {
            let at = s.now();
            let snap = s
                .snapshots
                .get_mut(key)
                .filter(|s| !s.ghost)
                .ok_or_else(|| {
                    refused(
                        format!("update snapshot {key} labels"),
                        Code::NotFound,
                        "snapshot not found",
                    )
                })?;
            apply_labels(&mut snap.info.labels, labels);
            snap.info.updated_at = Some(at);
            Ok(snap.info.clone())
        })
    }
}
