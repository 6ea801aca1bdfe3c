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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use tonic::Code;

use super::{
    normalize_image_ref, ContainerInfo, ImageConfig, ImageSummary, NewContainer, ProgressFn,
    PullOptions, ResolvedImage, RootfsMount, Runtime, SnapshotInfo, SnapshotKind, SnapshotUsage,
    TaskExit, TaskExitStream, TaskIo, TaskState, TaskStatus, LABEL_GC_ROOT,
};
use crate::error::AgentError;
use crate::sync::lock;

/// The methods faults can be injected into (every method of [`Runtime`] that calls out).
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

/// Makes the committed snapshot of `image`'s top layer, unless it exists.
fn unpack(s: &mut State, image: &ResolvedImage) {
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

fn mounts_of(key: &str) -> Vec<RootfsMount> {
    vec![RootfsMount {
        kind: "fake".into(),
        source: key.to_string(),
        target: String::new(),
        options: Vec::new(),
    }]
}

fn resolve(s: &State, reference: &str) -> Result<ResolvedImage, AgentError> {
    let name = normalize_image_ref(reference)?;
    s.images
        .get(&name)
        .cloned()
        .ok_or(AgentError::ImageNotFound(name))
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn namespace(&self) -> &str {
        "fake"
    }

    fn snapshotter(&self) -> &str {
        "fake"
    }

    async fn version(&self) -> Result<String, AgentError> {
        self.call("version", |_| Ok("fake".to_string()))
    }

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

    async fn create_container(
        &self,
        container: &NewContainer,
    ) -> Result<ContainerInfo, AgentError> {
        self.call("create_container", |s| {
            let op = format!("create container {}", container.id);
            if s.containers.contains_key(&container.id) {
                return Err(refused(op, Code::AlreadyExists, "container already exists"));
            }
            let at = s.now();
            let c = ContainerInfo {
                id: container.id.clone(),
                image: container.image.clone(),
                labels: container.labels.clone(),
                snapshotter: "fake".into(),
                snapshot_key: container.snapshot_key.clone(),
                runtime: "io.containerd.runc.v2".into(),
                spec: Some(container.spec.clone()),
                created_at: Some(at),
                updated_at: Some(at),
            };
            s.containers.insert(c.id.clone(), c.clone());
            Ok(c)
        })
    }

    async fn get_container(&self, id: &str) -> Result<Option<ContainerInfo>, AgentError> {
        self.call("get_container", |s| Ok(s.containers.get(id).cloned()))
    }

    async fn list_containers(&self, filters: &[String]) -> Result<Vec<ContainerInfo>, AgentError> {
        self.call("list_containers", |s| {
            let mut out = Vec::new();
            for c in s.containers.values() {
                if matches(&c.labels, filters)? {
                    out.push(c.clone());
                }
            }
            Ok(out)
        })
    }

    async fn delete_container(&self, id: &str) -> Result<bool, AgentError> {
        self.call("delete_container", |s| {
            if let Some(t) = s.tasks.get(id) {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id} still has a task ({:?}); delete the task first",
                    t.state
                )));
            }
            Ok(s.containers.remove(id).is_some())
        })
    }

    async fn update_container_labels(
        &self,
        id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<ContainerInfo, AgentError> {
        self.call("update_container_labels", |s| {
            let at = s.now();
            let c = s.containers.get_mut(id).ok_or_else(|| {
                refused(
                    format!("update container {id} labels"),
                    Code::NotFound,
                    "container not found",
                )
            })?;
            apply_labels(&mut c.labels, labels);
            c.updated_at = Some(at);
            Ok(c.clone())
        })
    }

    async fn update_container_spec(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<ContainerInfo, AgentError> {
        self.call("update_container_spec", |s| {
            let at = s.now();
            let c = s.containers.get_mut(id).ok_or_else(|| {
                refused(
                    format!("update container {id} spec"),
                    Code::NotFound,
                    "container not found",
                )
            })?;
            c.spec = Some(spec.clone());
            c.updated_at = Some(at);
            Ok(c.clone())
        })
    }

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

    async fn create_task(
        &self,
        container_id: &str,
        _rootfs: &[RootfsMount],
        _io: &TaskIo,
    ) -> Result<u32, AgentError> {
        self.call("create_task", |s| {
            let op = format!("create task {container_id}");
            if !s.containers.contains_key(container_id) {
                return Err(refused(op, Code::NotFound, "container not found"));
            }
            if s.tasks.contains_key(container_id) {
                return Err(refused(op, Code::AlreadyExists, "task already exists"));
            }
            s.next_pid += 1;
            let pid = 1000 + s.next_pid;
            s.tasks.insert(
                container_id.to_string(),
                Task {
                    state: TaskState::Created,
                    pid,
                    exit_status: None,
                    exited_at: None,
                },
            );
            Ok(pid)
        })
    }

    async fn start_task(&self, container_id: &str) -> Result<u32, AgentError> {
        self.call("start_task", |s| {
            let op = format!("start task {container_id}");
            let t = s
                .tasks
                .get_mut(container_id)
                .ok_or_else(|| refused(op.clone(), Code::NotFound, "no task"))?;
            if t.state != TaskState::Created {
                return Err(refused(
                    op,
                    Code::FailedPrecondition,
                    format!("task is {:?}", t.state),
                ));
            }
            t.state = TaskState::Running;
            Ok(t.pid)
        })
    }

    async fn kill_task(
        &self,
        container_id: &str,
        signal: i32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.call("kill_task", |s| {
            let op = format!("kill task {container_id}");
            match s.tasks.get(container_id).map(|t| t.state) {
                None => Err(refused(op, Code::NotFound, "no task")),
                Some(TaskState::Stopped) => {
                    Err(refused(op, Code::NotFound, "process already finished"))
                }
                Some(_) => {
                    let signal = u32::try_from(signal)
                        .map_err(|_| AgentError::InvalidArgument(format!("signal {signal}")))?;
                    s.end_task(container_id, 128 + signal);
                    Ok(())
                }
            }
        })
    }

    async fn wait_task(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<TaskExit, AgentError> {
        self.call("wait_task", |_| Ok(()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.task_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(exit) = self.task_exit_now(container_id)? {
                return Ok(exit);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(AgentError::Timeout(format!(
                    "task {container_id} still running after {timeout:?}"
                )));
            }
        }
    }

    async fn delete_task(&self, container_id: &str) -> Result<Option<TaskExit>, AgentError> {
        self.call("delete_task", |s| {
            let Some(t) = s.tasks.get(container_id) else {
                return Ok(None);
            };
            if matches!(
                t.state,
                TaskState::Running | TaskState::Paused | TaskState::Pausing
            ) {
                return Err(AgentError::FailedPrecondition(format!(
                    "task of container {container_id} is {:?}; kill it and wait for it first",
                    t.state
                )));
            }
            let t = s.tasks.remove(container_id).expect("checked above");
            Ok(Some(TaskExit {
                container_id: container_id.to_string(),
                pid: t.pid,
                exit_status: t.exit_status.unwrap_or_default(),
                exited_at: t.exited_at,
            }))
        })
    }

    async fn task_status(&self, container_id: &str) -> Result<Option<TaskStatus>, AgentError> {
        self.call("task_status", |s| {
            Ok(s.tasks.get(container_id).map(|t| {
                let stopped = t.state == TaskState::Stopped;
                TaskStatus {
                    state: t.state,
                    pid: if stopped { 0 } else { t.pid },
                    exit_status: t.exit_status.filter(|_| stopped),
                    exited_at: t.exited_at.filter(|_| stopped),
                }
            }))
        })
    }

    async fn subscribe_task_exits(&self) -> Result<TaskExitStream, AgentError> {
        let rx = self.call("subscribe_task_exits", |s| {
            let (tx, rx) = mpsc::unbounded_channel();
            s.exits.push(tx);
            Ok(rx)
        })?;
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::label_filter;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_filters_read_back_what_label_filter_builds() {
        for (key, value) in [
            ("mcp.bot_id", Some("b1")),
            ("mcp.bot_id", None),
            ("odd \"key\"", Some("a\\b")),
        ] {
            let f = label_filter(key, value);
            assert_eq!(
                parse_label_filter(&f).unwrap(),
                (key.to_string(), value.map(str::to_string)),
                "{f}"
            );
        }
        for bad in [
            "",
            "labels.",
            "name==x",
            r#"labels."a"=b"#,
            r#"labels."a"=="b"x"#,
        ] {
            assert!(parse_label_filter(bad).is_err(), "{bad:?}");
        }
        let l = labels(&[("mcp.bot_id", "b1")]);
        assert!(matches(&l, &[]).unwrap());
        assert!(matches(&l, &[label_filter("mcp.bot_id", Some("b1"))]).unwrap());
        assert!(matches(&l, &[label_filter("mcp.bot_id", None)]).unwrap());
        assert!(!matches(&l, &[label_filter("mcp.bot_id", Some("b2"))]).unwrap());
        // Filters are alternatives.
        assert!(matches(
            &l,
            &[
                label_filter("x", None),
                label_filter("mcp.bot_id", Some("b1"))
            ]
        )
        .unwrap());
    }

    #[tokio::test]
    async fn snapshots_commit_have_children_and_are_lost() {
        let rt = FakeRuntime::new();
        let img = rt.add_image("busybox");
        let l = labels(&[("mcp.bot_id", "b")]);
        rt.prepare_snapshot("k", Some(&img.chain_id), &l)
            .await
            .unwrap();
        // A parent must be committed; a key is taken once.
        assert!(rt.prepare_snapshot("k2", Some("k"), &l).await.is_err());
        assert!(rt.prepare_snapshot("k", None, &l).await.is_err());
        rt.write("k", "/data/f", "x");
        assert_eq!(
            rt.snapshot_usage("k").await.unwrap(),
            Some(SnapshotUsage { size: 1, inodes: 2 })
        );
        rt.commit_snapshot("v", "k", &labels(&[("memoh.version", "1")]))
            .await
            .unwrap();
        assert_eq!(rt.stat_snapshot("k").await.unwrap(), None);
        let v = rt.stat_snapshot("v").await.unwrap().unwrap();
        assert_eq!(
            (v.kind, v.parent.as_deref()),
            (SnapshotKind::Committed, Some(img.chain_id.as_str()))
        );
        assert_eq!(v.labels, labels(&[("memoh.version", "1")]));
        rt.prepare_snapshot("a", Some("v"), &l).await.unwrap();
        assert_eq!(rt.view("a").get("/data/f").map(String::as_str), Some("x"));
        assert!(rt.view("a").contains_key("/app/mcp"));
        assert!(rt.remove_snapshot("v").await.is_err(), "v has a child");
        // Lost: invisible, still a child of v, removable once.
        rt.lose("a");
        assert_eq!(rt.stat_snapshot("a").await.unwrap(), None);
        assert_eq!(rt.snapshot_usage("a").await.unwrap(), None);
        let listed = rt
            .list_snapshots(&[label_filter("mcp.bot_id", Some("b"))])
            .await
            .unwrap();
        assert!(listed.is_empty(), "{listed:?}");
        assert!(
            rt.remove_snapshot("v").await.is_err(),
            "v still has a child"
        );
        assert!(rt.remove_snapshot("a").await.unwrap());
        assert!(!rt.remove_snapshot("a").await.unwrap());
        assert!(rt.remove_snapshot("v").await.unwrap());
    }

    #[tokio::test]
    async fn tasks_containers_and_exit_events() {
        let rt = FakeRuntime::new();
        let mut exits = rt.subscribe_task_exits().await.unwrap();
        let spec = oci_spec::runtime::Spec::default();
        let new = NewContainer {
            id: "mcp-b".into(),
            image: "img".into(),
            snapshot_key: "mcp-b".into(),
            labels: labels(&[("mcp.bot_id", "b")]),
            spec,
        };
        rt.create_container(&new).await.unwrap();
        assert!(
            rt.create_container(&new).await.is_err(),
            "ids are taken once"
        );
        rt.create_task("mcp-b", &[], &TaskIo::default())
            .await
            .unwrap();
        rt.start_task("mcp-b").await.unwrap();
        let e = rt.delete_container("mcp-b").await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(rt.delete_task("mcp-b").await.is_err(), "it runs");
        assert!(rt
            .wait_task("mcp-b", Duration::from_millis(10))
            .await
            .is_err());
        rt.kill_task("mcp-b", libc::SIGTERM, false).await.unwrap();
        let exit = rt.wait_task("mcp-b", Duration::from_secs(1)).await.unwrap();
        assert_eq!(exit.exit_status, 143);
        assert_eq!(exits.next().await.unwrap().unwrap(), exit);
        let st = rt.task_status("mcp-b").await.unwrap().unwrap();
        assert_eq!((st.state, st.exit_status), (TaskState::Stopped, Some(143)));
        rt.delete_task("mcp-b").await.unwrap();
        let c = rt
            .update_container_labels("mcp-b", &labels(&[("mcp.bot_id", ""), ("x", "1")]))
            .await
            .unwrap();
        assert_eq!(c.labels, labels(&[("x", "1")]));
        assert!(rt.delete_container("mcp-b").await.unwrap());
        assert!(!rt.delete_container("mcp-b").await.unwrap());
    }

    #[tokio::test]
    async fn faults_fire_on_the_nth_call_before_or_after_the_work() {
        let rt = FakeRuntime::new();
        let l = HashMap::new();
        rt.fail("prepare_snapshot", 2);
        rt.prepare_snapshot("a", None, &l).await.unwrap();
        assert!(rt.prepare_snapshot("b", None, &l).await.is_err());
        assert_eq!(rt.stat_snapshot("b").await.unwrap(), None, "failed before");
        rt.prepare_snapshot("b", None, &l).await.unwrap();
        rt.fail_after("prepare_snapshot", 1);
        let e = rt.prepare_snapshot("c", None, &l).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(rt.snapshot("c").is_some(), "done, answer lost");
        rt.fail_always("get_container");
        for _ in 0..3 {
            assert!(rt.get_container("x").await.is_err());
        }
        rt.heal("get_container");
        assert!(rt.get_container("x").await.unwrap().is_none());
        assert!(rt.pending_faults().is_empty());
        assert!(rt
            .pull_image("x", &PullOptions::default(), &super::super::no_progress)
            .await
            .unwrap_err()
            .to_string()
            .contains("fake runtime"));
    }

    #[test]
    fn garbage_collection_keeps_what_is_held() {
        let rt = FakeRuntime::new();
        let img = rt.add_image("busybox");
        {
            let mut s = lock(&rt.state);
            for (key, parent, root) in [("held", None, true), ("loose", None, false)] {
                let at = s.now();
                let l = if root {
                    labels(&[(LABEL_GC_ROOT, "x")])
                } else {
                    HashMap::new()
                };
                s.snapshots.insert(
                    key.to_string(),
                    Snapshot {
                        info: SnapshotInfo {
                            name: key.into(),
                            parent,
                            kind: SnapshotKind::Active,
                            labels: l,
                            created_at: Some(at),
                            updated_at: Some(at),
                        },
                        files: BTreeMap::new(),
                        ghost: false,
                    },
                );
            }
        }
        assert_eq!(rt.collect_garbage(), vec!["loose".to_string()]);
        assert!(rt.snapshot(&img.chain_id).is_some());
        assert!(rt.snapshot("held").is_some());
    }
}
