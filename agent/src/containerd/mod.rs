//! The agent's containerd layer: images, containers, snapshots and tasks over containerd's
//! gRPC API.
//!
//! [`Runtime`] is the seam the rest of the agent programs against; [`Containerd`] is the real
//! implementation over containerd's unix socket. Every request carries the configured
//! namespace in the `containerd-namespace` header.
//!
//! Submodules:
//! - [`reference`]: image reference normalisation.
//! - [`spec`]: the OCI runtime spec of a bot container.
//! - `archive`, `content`, `images`: importing archives, pulling from registries, unpacking.
//! - `containers`, `snapshots`, `tasks`: thin typed wrappers of those services.
//! - `fake` (test builds only): an in-memory [`Runtime`] for unit tests of the lifecycle.

mod archive;
mod containers;
mod content;
#[cfg(test)]
pub mod fake;
mod images;
pub mod reference;
mod snapshots;
pub mod spec;
mod tasks;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::version_client::VersionClient;
use futures::stream::BoxStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::Config;
use crate::error::AgentError;

pub use images::chain_id;
pub use reference::{normalize_image_ref, ImageRef};
pub use spec::{build_spec, BindMount, SpecOptions};

/// Label holding the bot id on containers and snapshots (named in one place, [`crate::ids`]).
pub use crate::ids::LABEL_BOT_ID;
/// Label that keeps a snapshot or blob from containerd's garbage collector.
pub const LABEL_GC_ROOT: &str = "containerd.io/gc.root";

/// A containerd list filter matching objects whose label `key` equals `value`
/// (`labels."mcp.bot_id"==b1`), or that carry the label at all when `value` is `None`.
pub fn label_filter(key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!("labels.{key:?}=={v:?}"),
        None => format!("labels.{key:?}"),
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

/// Phase of an import or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressPhase {
    /// Reading the archive's index.
    Reading,
    /// Writing blobs into containerd's content store (or fetching them).
    Writing,
    /// Applying layers onto snapshots.
    Unpacking,
    /// Finished.
    Done,
}

/// Progress of an import or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// What is happening.
    pub phase: ProgressPhase,
    /// Bytes (or layers, while unpacking) done.
    pub current: u64,
    /// Bytes (or layers) in all.
    pub total: u64,
}

/// Progress callback.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// A progress callback that ignores everything.
pub fn no_progress(_: Progress) {}

/// Options of a registry pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Allow plain HTTP to this registry (loopback registries always may).
    pub insecure: bool,
    /// Basic-auth user and password; anonymous when `None`.
    pub credentials: Option<(String, String)>,
}

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

/// What a new container is made of.
#[derive(Debug, Clone)]
pub struct NewContainer {
    /// Container id (`mcp-<bot>`).
    pub id: String,
    /// Image name recorded on the container.
    pub image: String,
    /// Key of the active snapshot holding its root filesystem.
    pub snapshot_key: String,
    /// Labels, e.g. `mcp.bot_id`.
    pub labels: HashMap<String, String>,
    /// The runtime spec.
    pub spec: oci_spec::runtime::Spec,
}

/// A container record.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    /// Container id.
    pub id: String,
    /// Image name.
    pub image: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Snapshotter of its root filesystem.
    pub snapshotter: String,
    /// Snapshot key of its root filesystem.
    pub snapshot_key: String,
    /// Runtime name.
    pub runtime: String,
    /// The runtime spec, when the record holds one that parses.
    pub spec: Option<oci_spec::runtime::Spec>,
    /// When the record was created.
    pub created_at: Option<SystemTime>,
    /// When the record last changed.
    pub updated_at: Option<SystemTime>,
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

/// Where a task's output goes.
#[derive(Debug, Clone, Default)]
pub struct TaskIo {
    /// Host file that receives stdout (appended); `None` discards it.
    pub stdout: Option<PathBuf>,
    /// Host file that receives stderr; `None` discards it.
    pub stderr: Option<PathBuf>,
    /// A logging program the shim starts with both streams as pipes (a `binary://` URI);
    /// when set, `stdout` and `stderr` are not used.
    pub program: Option<LogProgram>,
}

/// A program containerd's shim runs for a task's output: `path ARG VALUE...`, one pair per
/// entry of `args` (the shim passes them in no fixed order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogProgram {
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// Argument pairs.
    pub args: Vec<(String, String)>,
}

impl TaskIo {
    /// Both streams appended to one host log file.
    pub fn log_file(path: impl Into<PathBuf>) -> Self {
        let p = path.into();
        Self {
            stdout: Some(p.clone()),
            stderr: Some(p),
            program: None,
        }
    }

    /// Both streams piped into `program`.
    pub fn log_program(program: LogProgram) -> Self {
        Self {
            program: Some(program),
            ..Self::default()
        }
    }
}

/// State of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited; the entry stays until deleted.
    Stopped,
    /// Paused.
    Paused,
    /// Being paused.
    Pausing,
    /// containerd does not know.
    Unknown,
}

/// A task's state as containerd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    /// State.
    pub state: TaskState,
    /// Host pid of its init process (0 once gone).
    pub pid: u32,
    /// Exit status when stopped.
    pub exit_status: Option<u32>,
    /// Exit time when stopped.
    pub exited_at: Option<SystemTime>,
}

/// A task's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExit {
    /// The container whose init process exited.
    pub container_id: String,
    /// Its host pid.
    pub pid: u32,
    /// Exit status (128 + signal for signalled processes).
    pub exit_status: u32,
    /// When it exited.
    pub exited_at: Option<SystemTime>,
}

/// A stream of task exits.
pub type TaskExitStream = BoxStream<'static, Result<TaskExit, AgentError>>;

/// Everything the agent asks of containerd. [`Containerd`] is the real implementation;
/// tests of higher layers may put a fake behind it.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// The containerd namespace in use.
    fn namespace(&self) -> &str;
    /// The snapshotter in use.
    fn snapshotter(&self) -> &str;

    /// containerd's version string.
    async fn version(&self) -> Result<String, AgentError>;

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

    /// Creates a container record with the configured snapshotter and runtime.
    async fn create_container(&self, container: &NewContainer)
        -> Result<ContainerInfo, AgentError>;

    /// A container record, `None` when missing.
    async fn get_container(&self, id: &str) -> Result<Option<ContainerInfo>, AgentError>;

    /// Container records matching any of `filters` (all when empty); see [`label_filter`].
    async fn list_containers(&self, filters: &[String]) -> Result<Vec<ContainerInfo>, AgentError>;

    /// Deletes a container record (not its snapshot). Returns whether it existed.
    /// Fails with FAILED_PRECONDITION while a task entry exists: delete the task first.
    async fn delete_container(&self, id: &str) -> Result<bool, AgentError>;

    /// Sets labels on a container; an empty value removes the label. Others stay.
    async fn update_container_labels(
        &self,
        id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<ContainerInfo, AgentError>;

    /// Replaces the runtime spec of a container record; the next task runs with it.
    async fn update_container_spec(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<ContainerInfo, AgentError>;

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

    /// Creates the task of a container on `rootfs`, output to host files. Returns its pid.
    async fn create_task(
        &self,
        container_id: &str,
        rootfs: &[RootfsMount],
        io: &TaskIo,
    ) -> Result<u32, AgentError>;

    /// Starts a created task. Returns its pid.
    async fn start_task(&self, container_id: &str) -> Result<u32, AgentError>;

    /// Sends `signal` to the task's init process, or to all its processes when `all`.
    async fn kill_task(&self, container_id: &str, signal: i32, all: bool)
        -> Result<(), AgentError>;

    /// Waits until the task exits; [`AgentError::Timeout`] after `timeout`.
    async fn wait_task(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<TaskExit, AgentError>;

    /// Deletes the task entry. `None` when there was none; [`AgentError::FailedPrecondition`]
    /// while it runs (kill and wait first). Works on created and stopped tasks.
    async fn delete_task(&self, container_id: &str) -> Result<Option<TaskExit>, AgentError>;

    /// The task's state, `None` when there is no task.
    async fn task_status(&self, container_id: &str) -> Result<Option<TaskStatus>, AgentError>;

    /// Exits of tasks' init processes in this namespace, as they happen.
    async fn subscribe_task_exits(&self) -> Result<TaskExitStream, AgentError>;
}

/// The real [`Runtime`]: containerd over its unix socket. Cheap to clone.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    namespace_header: MetadataValue<tonic::metadata::Ascii>,
    snapshotter: String,
    runtime: String,
    runc_root: Option<String>,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("namespace", &self.namespace)
            .field("snapshotter", &self.snapshotter)
            .field("runtime", &self.runtime)
            .field("runc_root", &self.runc_root)
            .finish()
    }
}

fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 76
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && ns.as_bytes()[0].is_ascii_alphanumeric()
        && ns.as_bytes()[ns.len() - 1].is_ascii_alphanumeric()
}

impl Containerd {
    /// Connects to containerd at `socket` and checks it answers.
    /// [`AgentError::ContainerdUnreachable`] when it does not.
    pub async fn connect(
        socket: impl AsRef<Path>,
        namespace: &str,
        snapshotter: &str,
        runtime: &str,
    ) -> Result<Self, AgentError> {
        let socket = socket.as_ref().to_path_buf();
        if !valid_namespace(namespace) {
            return Err(AgentError::InvalidArgument(format!(
                "containerd namespace {namespace:?}: use letters, digits, '.', '_' and '-'"
            )));
        }
        let unreachable = |reason: String| AgentError::ContainerdUnreachable {
            socket: socket.clone(),
            reason,
        };
        let channel =
            tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(&socket))
                .await
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| {
                    let mut reason = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        reason = format!("{reason}: {s}");
                        src = s.source();
                    }
                    unreachable(reason)
                })?;
        let namespace_header = MetadataValue::try_from(namespace)
            .map_err(|_| AgentError::InvalidArgument(format!("namespace {namespace:?}")))?;
        let me = Self {
            channel,
            socket: socket.clone(),
            namespace: namespace.to_string(),
            namespace_header,
            snapshotter: snapshotter.to_string(),
            runtime: runtime.to_string(),
            runc_root: None,
        };
        match tokio::time::timeout(Duration::from_secs(10), me.version_inner()).await {
            Ok(Ok(v)) => {
                tracing::debug!(socket = %socket.display(), version = %v, "connected to containerd");
                Ok(me)
            }
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable("version call timed out".into())),
        }
    }

    /// Connects with the socket, namespace, snapshotter and runtime of `config`.
    pub async fn from_config(config: &Config) -> Result<Self, AgentError> {
        Self::connect(
            &config.containerd_socket,
            &config.namespace,
            &config.snapshotter,
            &config.runtime,
        )
        .await
    }

    /// Makes tasks keep runc's state under `root` instead of runc's default
    /// (`/run/containerd/runc/<namespace>`); a private containerd needs its own.
    pub fn with_runc_root(mut self, root: impl AsRef<Path>) -> Self {
        self.runc_root = Some(root.as_ref().display().to_string());
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The runtime name new containers get.
    pub fn runtime_name(&self) -> &str {
        &self.runtime
    }

    /// The underlying channel, for calls this layer does not wrap.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Wraps a message in a request carrying the namespace.
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace_header.clone());
        r
    }

    /// Like [`Self::request`], also attaching what the call creates to `lease`.
    pub(crate) fn request_leased<T>(&self, msg: T, lease: &str) -> tonic::Request<T> {
        let mut r = self.request(msg);
        if let Ok(v) = MetadataValue::try_from(lease) {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    async fn version_inner(&self) -> Result<String, AgentError> {
        let v = VersionClient::new(self.channel.clone())
            .version(tonic::Request::new(()))
            .await
            .map_err(|s| AgentError::containerd("version", s))?
            .into_inner();
        Ok(v.version)
    }
}

pub(crate) fn to_system_time(ts: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let ts = ts?;
    if ts.seconds <= 0 && ts.nanos <= 0 {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(
        u64::try_from(ts.seconds).ok()?,
        u32::try_from(ts.nanos).ok()?,
    ))
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

#[async_trait::async_trait]
impl Runtime for Containerd {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    async fn version(&self) -> Result<String, AgentError> {
        self.version_inner().await
    }

    async fn import_archive(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        self.import_archive_inner(path, name, progress).await
    }

    async fn pull_image(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        self.pull_image_inner(reference, options, progress).await
    }

    async fn list_images(&self) -> Result<Vec<ImageSummary>, AgentError> {
        self.list_images_inner().await
    }

    async fn resolve_image(&self, reference: &str) -> Result<ResolvedImage, AgentError> {
        self.resolve_image_inner(reference).await
    }

    async fn ensure_unpacked(&self, reference: &str) -> Result<ResolvedImage, AgentError> {
        self.ensure_unpacked_inner(reference).await
    }

    async fn delete_image(&self, reference: &str) -> Result<bool, AgentError> {
        self.delete_image_inner(reference).await
    }

    async fn create_container(
        &self,
        container: &NewContainer,
    ) -> Result<ContainerInfo, AgentError> {
        self.create_container_inner(container).await
    }

    async fn get_container(&self, id: &str) -> Result<Option<ContainerInfo>, AgentError> {
        self.get_container_inner(id).await
    }

    async fn list_containers(&self, filters: &[String]) -> Result<Vec<ContainerInfo>, AgentError> {
        self.list_containers_inner(filters).await
    }

    async fn delete_container(&self, id: &str) -> Result<bool, AgentError> {
        self.delete_container_inner(id).await
    }

    async fn update_container_labels(
        &self,
        id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<ContainerInfo, AgentError> {
        self.update_container_labels_inner(id, labels).await
    }

    async fn update_container_spec(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<ContainerInfo, AgentError> {
        self.update_container_spec_inner(id, spec).await
    }

    async fn prepare_snapshot(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
    ) -> Result<Vec<RootfsMount>, AgentError> {
        self.prepare_snapshot_inner(key, parent, labels, None).await
    }

    async fn snapshot_mounts(&self, key: &str) -> Result<Vec<RootfsMount>, AgentError> {
        self.snapshot_mounts_inner(key).await
    }

    async fn commit_snapshot(
        &self,
        name: &str,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        self.commit_snapshot_inner(name, key, labels, None).await
    }

    async fn remove_snapshot(&self, key: &str) -> Result<bool, AgentError> {
        self.remove_snapshot_inner(key).await
    }

    async fn stat_snapshot(&self, key: &str) -> Result<Option<SnapshotInfo>, AgentError> {
        self.stat_snapshot_inner(key).await
    }

    async fn snapshot_usage(&self, key: &str) -> Result<Option<SnapshotUsage>, AgentError> {
        self.snapshot_usage_inner(key).await
    }

    async fn list_snapshots(&self, filters: &[String]) -> Result<Vec<SnapshotInfo>, AgentError> {
        self.list_snapshots_inner(filters).await
    }

    async fn update_snapshot_labels(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
    ) -> Result<SnapshotInfo, AgentError> {
        self.update_snapshot_labels_inner(key, labels).await
    }

    async fn create_task(
        &self,
        container_id: &str,
        rootfs: &[RootfsMount],
        io: &TaskIo,
    ) -> Result<u32, AgentError> {
        self.create_task_inner(container_id, rootfs, io).await
    }

    async fn start_task(&self, container_id: &str) -> Result<u32, AgentError> {
        self.start_task_inner(container_id).await
    }

    async fn kill_task(
        &self,
        container_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.kill_task_inner(container_id, signal, all).await
    }

    async fn wait_task(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<TaskExit, AgentError> {
        self.wait_task_inner(container_id, timeout).await
    }

    async fn delete_task(&self, container_id: &str) -> Result<Option<TaskExit>, AgentError> {
        self.delete_task_inner(container_id).await
    }

    async fn task_status(&self, container_id: &str) -> Result<Option<TaskStatus>, AgentError> {
        self.task_status_inner(container_id).await
    }

    async fn subscribe_task_exits(&self) -> Result<TaskExitStream, AgentError> {
        self.subscribe_task_exits_inner().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_filters() {
        assert_eq!(
            label_filter(LABEL_BOT_ID, Some("b1")),
            r#"labels."mcp.bot_id"=="b1""#
        );
        assert_eq!(label_filter(LABEL_BOT_ID, None), r#"labels."mcp.bot_id""#);
    }

    #[test]
    fn namespaces() {
        for ok in ["default", "memoh-test_1", "a.b"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in ["", "-a", "a b", "a/b", "a-"] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(to_system_time(None), None);
        assert_eq!(
            to_system_time(Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0
            })),
            None
        );
        assert_eq!(
            to_system_time(Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 5
            })),
            Some(SystemTime::UNIX_EPOCH + Duration::new(10, 5))
        );
    }
}
