//! The agent's containerd layer: images, containers, snapshots and tasks over containerd's
//! gRPC API.
//!
//! One small trait per concern, each implemented for [`Containerd`] (the real client over
//! containerd's unix socket) in its own module: [`Connection`] (namespace, snapshotter,
//! version), [`Images`], [`Containers`], [`Snapshots`] and [`Tasks`]. [`Runtime`] combines
//! them and is what the rest of the agent holds (`Arc<dyn Runtime>`); calling a method needs
//! its concern trait in scope, which [`prelude`] brings in one line. Every request carries the
//! configured namespace in the `containerd-namespace` header.
//!
//! Submodules:
//! - `client`: [`Containerd`] (connecting, namespaced requests) and [`Connection`].
//! - `images`: [`Images`]; folder with `import` (archives), `pull` (registries: auth,
//!   manifests), `unpack` (layers onto snapshots), `manifest` (OCI parsing, platform choice)
//!   and `progress` (the one loop copying blobs into content with progress).
//! - `archive`, `content`: reading archives; containerd's content store and leases.
//! - `containers`, `snapshots`, `tasks`: [`Containers`], [`Snapshots`], [`Tasks`] and their
//!   types; `stdio`: where a task's output goes ([`TaskIo`]: host files or a logging program).
//! - [`reference`]: image reference normalisation.
//! - [`spec`]: the OCI runtime spec of a bot container (`mounts`, `privileges`, `seccomp`).
//! - `fake` (test builds only): an in-memory [`Runtime`] for unit tests of the lifecycle.

mod archive;
mod client;
mod containers;
mod content;
#[cfg(test)]
pub mod fake;
mod images;
mod layers;
pub mod reference;
mod snapshots;
pub mod spec;
mod stdio;
mod tasks;

use std::time::{Duration, SystemTime};

pub use client::{Connection, Containerd};
pub use containers::{ContainerInfo, Containers, NewContainer};
pub use images::{
    chain_id, no_progress, ImageConfig, ImageSummary, Images, Progress, ProgressFn, ProgressPhase,
    PullOptions, ResolvedImage,
};
pub use layers::{LayerBlob, Layers, VersionImage, LABEL_CYCLE_LEASE, MT_LAYER_TAR};
pub use reference::{normalize_image_ref, ImageRef};
pub use snapshots::{RootfsMount, SnapshotInfo, SnapshotKind, SnapshotUsage, Snapshots};
pub use spec::{build_spec, BindMount, SpecOptions};
pub use stdio::{LogProgram, TaskIo};
pub use tasks::{TaskExit, TaskExitStream, TaskState, TaskStatus, Tasks};

/// Label holding the bot id on containers and snapshots (named in one place, [`crate::ids`]).
pub use crate::ids::LABEL_BOT_ID;
/// Label that keeps a snapshot or blob from containerd's garbage collector.
pub const LABEL_GC_ROOT: &str = "containerd.io/gc.root";

/// Everything the agent asks of containerd: every concern trait at once. [`Containerd`] is
/// the real implementation; tests of higher layers may put a fake behind it. Implemented for
/// every type that implements the concern traits.
pub trait Runtime: Connection + Images + Containers + Snapshots + Tasks + Layers {}

impl<T: Connection + Images + Containers + Snapshots + Tasks + Layers + ?Sized> Runtime for T {}

/// The runtime traits, for callers of their methods: `use crate::containerd::prelude::*;`.
pub mod prelude {
    pub use super::{Connection, Containers, Images, Layers, Runtime, Snapshots, Tasks};
}

/// A containerd list filter matching objects whose label `key` equals `value`
/// (`labels."mcp.bot_id"==b1`), or that carry the label at all when `value` is `None`.
pub fn label_filter(key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!("labels.{key:?}=={v:?}"),
        None => format!("labels.{key:?}"),
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
