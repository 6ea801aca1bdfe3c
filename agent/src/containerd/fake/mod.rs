//! An in-memory [`Runtime`] for unit tests of the lifecycle's logic (test builds only).
//!
//! It keeps what the lifecycle reads and writes of containerd: container records, snapshots
//! (kind, parent, labels, creation time, and the files a test wrote on them), tasks and their
//! exits, and the image records a test registers. Where the lifecycle depends on containerd
//! 1.6's rules, the fake follows them: a container id is taken once; a container record cannot
//! go while a task entry exists; committing turns an active key into a committed name and the
//! key is gone; a snapshot with children cannot be removed; a parent must be committed; a
//! killed task is stopped with `128 + signal` as its exit status and its exit is published.
//!
//! It is no stand-in for containerd: archive import and registry pull are refused, nothing is
//! mounted, and the system tier runs against the real thing. Two states only containerd's
//! crashes make can be built on purpose: [`FakeRuntime::lose`] (a snapshot containerd lost
//! mid-commit) and [`FakeRuntime::collect_garbage`] (its collector ran while nothing held an
//! unlabelled snapshot).
//!
//! Fault injection: [`FakeRuntime::fail`] makes the Nth call of a method, counted from now,
//! fail before it does anything (a crash or a containerd gone between two steps);
//! [`FakeRuntime::fail_after`] makes it fail after doing its work (an answer lost on the way
//! back); [`FakeRuntime::fail_always`] makes every call fail until [`FakeRuntime::heal`].

mod containers;
mod images;
mod snapshots;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use tonic::Code;

use super::{
    normalize_image_ref, ContainerInfo, ImageConfig, NewContainer, PullOptions, ResolvedImage,
    SnapshotInfo, SnapshotKind, SnapshotUsage, TaskExit, TaskIo, TaskState, LABEL_GC_ROOT,
};
use crate::error::AgentError;
use crate::sync::lock;
use images::unpack;

/// The methods faults can be injected into (every method of [`Runtime`](super::Runtime) that calls out).
const METHODS: &[&str] = &[
    "version",
    "import_archive",
    "pull_image",
    "list_images",
    "resolve_image",
    "ensure_unpacked",
    "delete_image",
    "create_container",
    "get_container",
    "list_containers",
    "delete_container",
    "update_container_labels",
    "update_container_spec",
    "prepare_snapshot",
    "snapshot_mounts",
    "commit_snapshot",
    "remove_snapshot",
    "stat_snapshot",
    "snapshot_usage",
    "list_snapshots",
    "update_snapshot_labels",
    "create_task",
    "start_task",
    "kill_task",
    "wait_task",
    "delete_task",
    "task_status",
    "subscribe_task_exits",
];

/// The error of an injected fault: containerd unavailable, as when it died mid-call.
fn injected(method: &str) -> AgentError {
    AgentError::containerd(
        format!("{method} (fault injected by the test)"),
        tonic::Status::unavailable("injected fault"),
    )
}

fn refused(op: impl Into<String>, code: Code, message: impl Into<String>) -> AgentError {
    AgentError::containerd(op, tonic::Status::new(code, message.into()))
}

fn unsupported(what: &str) -> AgentError {
    AgentError::FailedPrecondition(format!(
        "the fake runtime does not {what}; unit tests register images with FakeRuntime::add_image"
    ))
}

/// Reads one string as `{:?}` quotes it; returns it and what follows the closing quote.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 2..])),
            '\\' => match chars.next()?.1 {
                c @ ('"' | '\\') => out.push(c),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}

/// The label key and value of a filter [`super::label_filter`] built: `labels."K"=="V"` or
/// `labels."K"` (value `None`: the label is present). Anything else is refused, so a test
/// never passes on a filter the fake silently ignored.
pub fn parse_label_filter(filter: &str) -> Result<(String, Option<String>), AgentError> {
    let bad = || {
        AgentError::InvalidArgument(format!(
            "the fake runtime only understands label filters, not {filter:?}"
        ))
    };
    let (key, rest) = filter
        .strip_prefix("labels.")
        .and_then(unquote)
        .ok_or_else(bad)?;
    if rest.is_empty() {
        return Ok((key, None));
    }
    let (value, rest) = rest.strip_prefix("==").and_then(unquote).ok_or_else(bad)?;
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok((key, Some(value)))
}

/// Whether `labels` match any of `filters` (all labels match no filter at all).
fn matches(labels: &HashMap<String, String>, filters: &[String]) -> Result<bool, AgentError> {
    if filters.is_empty() {
        return Ok(true);
    }
    for f in filters {
        let (key, value) = parse_label_filter(f)?;
        let hit = match (labels.get(&key), value) {
            (Some(have), Some(want)) => *have == want,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if hit {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sets `changes` on `labels`; an empty value removes the label.
fn apply_labels(labels: &mut HashMap<String, String>, changes: &HashMap<String, String>) {
    for (k, v) in changes {
        if v.is_empty() {
            labels.remove(k);
        } else {
            labels.insert(k.clone(), v.clone());
        }
    }
}

fn sha256(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[derive(Debug, Clone)]
struct Snapshot {
    info: SnapshotInfo,
    /// What was written on this snapshot itself (path to content); its parents' files show
    /// through.
    files: BTreeMap<String, String>,
    /// containerd lost it mid-commit: its metadata still holds it (its parent counts it as a
    /// child, remove finds it) but stat, list, usage and mounts no longer see it.
    ghost: bool,
}

impl Snapshot {
    fn usage(&self) -> SnapshotUsage {
        SnapshotUsage {
            size: self.files.values().map(|c| c.len() as u64).sum(),
            // The snapshot's own root directory counts, as overlayfs counts it.
            inodes: 1 + self.files.len() as u64,
        }
    }
}

#[derive(Debug, Clone)]
struct Task {
    state: TaskState,
    pid: u32,
    exit_status: Option<u32>,
    exited_at: Option<SystemTime>,
    /// Limits given by an update.
    resources: Option<oci_spec::runtime::LinuxResources>,
}

#[derive(Debug, Clone)]
struct Fault {
    method: String,
    /// The call number (per method, from the fake's start) that fails; every call when `None`.
    at: Option<u64>,
    /// Fail after doing the work (the answer is lost) instead of before.
    after: bool,
}

#[derive(Default)]
struct State {
    tick: u64,
    next_pid: u32,
    images: BTreeMap<String, ResolvedImage>,
    containers: BTreeMap<String, ContainerInfo>,
    snapshots: BTreeMap<String, Snapshot>,
    tasks: BTreeMap<String, Task>,
    faults: Vec<Fault>,
    counts: HashMap<String, u64>,
    calls: Vec<String>,
    exits: Vec<mpsc::UnboundedSender<Result<TaskExit, AgentError>>>,
}

impl State {
    /// A creation or update time: one second later than the last, so "newest" is well
    /// defined.
    fn now(&mut self) -> SystemTime {
        self.tick += 1;
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + self.tick)
    }

    /// Records a call of `method` and applies a fault armed for it: `Err` fails it now,
    /// `Ok(true)` fails it once its work is done.
    fn enter(&mut self, method: &str) -> Result<bool, AgentError> {
        self.calls.push(method.to_string());
        let n = {
            let c = self.counts.entry(method.to_string()).or_default();
            *c += 1;
            *c
        };
        // A fault armed for this very call first, then one armed for every call.
        let Some(i) = self
            .faults
            .iter()
            .position(|f| f.method == method && f.at == Some(n))
            .or_else(|| {
                self.faults
                    .iter()
                    .position(|f| f.method == method && f.at.is_none())
            })
        else {
            return Ok(false);
        };
        let fault = if self.faults[i].at.is_some() {
            self.faults.remove(i)
        } else {
            self.faults[i].clone()
        };
        if fault.after {
            Ok(true)
        } else {
            Err(injected(method))
        }
    }

    fn visible(&self, key: &str) -> Option<&Snapshot> {
        self.snapshots.get(key).filter(|s| !s.ghost)
    }

    fn children(&self, name: &str) -> usize {
        self.snapshots
            .values()
            .filter(|s| s.info.parent.as_deref() == Some(name))
            .count()
    }

    fn publish(&mut self, exit: TaskExit) {
        self.exits.retain(|tx| tx.send(Ok(exit.clone())).is_ok());
    }

    /// Ends the task of `cid` with `status` and publishes its exit.
    fn end_task(&mut self, cid: &str, status: u32) {
        let at = self.now();
        let Some(t) = self.tasks.get_mut(cid) else {
            return;
        };
        let pid = t.pid;
        t.state = TaskState::Stopped;
        t.exit_status = Some(status);
        t.exited_at = Some(at);
        self.publish(TaskExit {
            container_id: cid.to_string(),
            pid,
            exit_status: status,
            exited_at: Some(at),
        });
    }
}

/// A container record as [`FakeRuntime::world`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldContainer {
    /// Its snapshot key.
    pub snapshot_key: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A snapshot as [`FakeRuntime::world`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldSnapshot {
    /// Active or committed.
    pub kind: SnapshotKind,
    /// Its parent.
    pub parent: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The files written on it.
    pub files: BTreeMap<String, String>,
    /// Lost by containerd mid-commit (see [`FakeRuntime::lose`]).
    pub ghost: bool,
}

/// Everything the fake holds, in a form tests compare (no timestamps): equal worlds before
/// and after an operation mean it changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Container records by id.
    pub containers: BTreeMap<String, WorldContainer>,
    /// Snapshots by key or name.
    pub snapshots: BTreeMap<String, WorldSnapshot>,
    /// Task states by container id.
    pub tasks: BTreeMap<String, TaskState>,
}

/// The in-memory [`Runtime`]. See the module documentation.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
    /// Woken whenever a task may have changed (for `wait_task`).
    task_changed: Notify,
}

impl FakeRuntime {
    /// An empty containerd: no images, containers, snapshots or tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs one call of `method`: the fault gate, then `work` on the state.
    fn call<T>(
        &self,
        method: &str,
        work: impl FnOnce(&mut State) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let (lost_answer, r) = {
            let mut s = lock(&self.state);
            let lost_answer = s.enter(method)?;
            (lost_answer, work(&mut s))
        };
        self.task_changed.notify_waiters();
        match r {
            Ok(_) if lost_answer => Err(injected(method)),
            r => r,
        }
    }

    fn arm(&self, method: &str, nth: Option<u64>, after: bool) {
        assert!(
            METHODS.contains(&method),
            "no Runtime method {method:?} to inject a fault into"
        );
        let mut s = lock(&self.state);
        let at = nth.map(|n| {
            assert!(n >= 1, "calls are counted from 1");
            s.counts.get(method).copied().unwrap_or(0) + n
        });
        s.faults.push(Fault {
            method: method.to_string(),
            at,
            after,
        });
    }

    /// Makes the `nth` call of `method` from now (1: the next one) fail before it does
    /// anything, with containerd's UNAVAILABLE.
    pub fn fail(&self, method: &str, nth: u64) {
        self.arm(method, Some(nth), false);
    }

    /// Makes the `nth` call of `method` from now do its work and then fail: containerd did
    /// it, the caller never heard.
    pub fn fail_after(&self, method: &str, nth: u64) {
        self.arm(method, Some(nth), true);
    }

    /// Makes every call of `method` fail before doing anything, until [`FakeRuntime::heal`].
    pub fn fail_always(&self, method: &str) {
        self.arm(method, None, false);
    }

    /// Removes every fault armed on `method`.
    pub fn heal(&self, method: &str) {
        lock(&self.state).faults.retain(|f| f.method != method);
    }

    /// Faults armed with [`FakeRuntime::fail`] or [`FakeRuntime::fail_after`] that have not
    /// fired yet, as method names.
    pub fn pending_faults(&self) -> Vec<String> {
        lock(&self.state)
            .faults
            .iter()
            .filter(|f| f.at.is_some())
            .map(|f| f.method.clone())
            .collect()
    }

    /// Every call made so far, by method name, in order.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    /// Registers image `reference` (normalised) and unpacks it: its top layer is a committed
    /// snapshot named by its chain id, holding `/app/mcp`. Returns it as resolved.
    pub fn add_image(&self, reference: &str) -> ResolvedImage {
        let name = normalize_image_ref(reference).expect("a valid image reference");
        let layer = sha256(&format!("layer of {name}"));
        let resolved = ResolvedImage {
            name: name.clone(),
            target_digest: sha256(&format!("index of {name}")),
            manifest_digest: sha256(&format!("manifest of {name}")),
            config_digest: sha256(&format!("config of {name}")),
            config: ImageConfig {
                env: vec!["PATH=/usr/bin:/bin".into()],
                entrypoint: vec!["/app/mcp".into()],
                cmd: Vec::new(),
                working_dir: "/".into(),
                user: String::new(),
            },
            diff_ids: vec![layer.clone()],
            chain_id: layer,
        };
        let mut s = lock(&self.state);
        s.images.insert(name.clone(), resolved.clone());
        unpack(&mut s, &resolved);
        resolved
    }

    /// Writes `content` at `path` on active snapshot `key`, as the bot would.
    pub fn write(&self, key: &str, path: &str, content: &str) {
        let mut s = lock(&self.state);
        let snap = s
            .snapshots
            .get_mut(key)
            .unwrap_or_else(|| panic!("no snapshot {key:?} to write on"));
        assert_eq!(
            snap.info.kind,
            SnapshotKind::Active,
            "{key:?} is not writable"
        );
        snap.files.insert(path.to_string(), content.to_string());
    }

    /// What a container on snapshot `key` sees: its files over its parents' (path to
    /// content). Panics when there is no such snapshot.
    pub fn view(&self, key: &str) -> BTreeMap<String, String> {
        let s = lock(&self.state);
        let mut chain = Vec::new();
        let mut next = Some(key.to_string());
        while let Some(k) = next {
            let snap = s
                .snapshots
                .get(&k)
                .unwrap_or_else(|| panic!("no snapshot {k:?} (in the chain of {key:?})"));
            chain.push(snap.files.clone());
            next = snap.info.parent.clone();
        }
        let mut out = BTreeMap::new();
        for files in chain.into_iter().rev() {
            out.extend(files);
        }
        out
    }

    /// containerd loses snapshot `key` mid-commit: stat, list, usage and mounts no longer see
    /// it, yet it stays in its metadata (its parent cannot be removed; removing it succeeds).
    pub fn lose(&self, key: &str) {
        let mut s = lock(&self.state);
        s.snapshots
            .get_mut(key)
            .unwrap_or_else(|| panic!("no snapshot {key:?} to lose"))
            .ghost = true;
    }

    /// The task of `cid` ends on its own with `status` (a crash); its exit is published.
    pub fn exit(&self, cid: &str, status: u32) {
        {
            let mut s = lock(&self.state);
            assert!(s.tasks.contains_key(cid), "no task of {cid:?} to end");
            s.end_task(cid, status);
        }
        self.task_changed.notify_waiters();
    }

    /// containerd's garbage collector: removes every snapshot that no container, image or
    /// [`LABEL_GC_ROOT`] label holds, directly or as an ancestor. Returns what it removed.
    pub fn collect_garbage(&self) -> Vec<String> {
        let mut s = lock(&self.state);
        let mut keep: BTreeSet<String> = BTreeSet::new();
        let mut roots: Vec<String> = s
            .snapshots
            .iter()
            .filter(|(_, snap)| snap.info.labels.contains_key(LABEL_GC_ROOT))
            .map(|(k, _)| k.clone())
            .collect();
        roots.extend(s.containers.values().map(|c| c.snapshot_key.clone()));
        roots.extend(s.images.values().map(|i| i.chain_id.clone()));
        for root in roots {
            let mut next = Some(root);
            while let Some(k) = next.take() {
                if let Some(snap) = s.snapshots.get(&k) {
                    next = snap.info.parent.clone();
                }
                if !keep.insert(k) {
                    break;
                }
            }
        }
        let gone: Vec<String> = s
            .snapshots
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in &gone {
            s.snapshots.remove(k);
        }
        gone
    }

    /// The container record `id`, without counting a call.
    pub fn container(&self, id: &str) -> Option<ContainerInfo> {
        lock(&self.state).containers.get(id).cloned()
    }

    /// Snapshot `key` as stat shows it, without counting a call.
    pub fn snapshot(&self, key: &str) -> Option<SnapshotInfo> {
        lock(&self.state).visible(key).map(|s| s.info.clone())
    }

    /// The state of the task of `cid`, without counting a call.
    pub fn task_state(&self, cid: &str) -> Option<TaskState> {
        lock(&self.state).tasks.get(cid).map(|t| t.state)
    }

    /// The limits the task of `cid` was last updated to.
    pub fn task_resources(&self, cid: &str) -> Option<oci_spec::runtime::LinuxResources> {
        lock(&self.state)
            .tasks
            .get(cid)
            .and_then(|t| t.resources.clone())
    }

    /// Everything the fake holds, to compare.
    pub fn world(&self) -> World {
        let s = lock(&self.state);
        let sorted =
            |l: &HashMap<String, String>| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        World {
            containers: s
                .containers
                .iter()
                .map(|(id, c)| {
                    let wc = WorldContainer {
                        snapshot_key: c.snapshot_key.clone(),
                        labels: sorted(&c.labels),
                    };
                    (id.clone(), wc)
                })
                .collect(),
            snapshots: s
                .snapshots
                .iter()
                .map(|(k, snap)| {
                    let ws = WorldSnapshot {
                        kind: snap.info.kind,
                        parent: snap.info.parent.clone(),
                        labels: sorted(&snap.info.labels),
                        files: snap.files.clone(),
                        ghost: snap.ghost,
                    };
                    (k.clone(), ws)
                })
                .collect(),
            tasks: s
                .tasks
                .iter()
                .map(|(id, t)| (id.clone(), t.state))
                .collect(),
        }
    }

    fn task_exit_now(&self, cid: &str) -> Result<Option<TaskExit>, AgentError> {
        let s = lock(&self.state);
        let t = s.tasks.get(cid).ok_or_else(|| {
            refused(
                format!("wait task {cid}"),
                Code::NotFound,
                "no running task",
            )
        })?;
        Ok((t.state == TaskState::Stopped).then(|| TaskExit {
            container_id: cid.to_string(),
            pid: t.pid,
            exit_status: t.exit_status.unwrap_or_default(),
            exited_at: t.exited_at,
        }))
    }
}
