//! Images, as the lifecycle offers them to the control API: import, pull, list, and the
//! containerd version. The control API reaches containerd only through here.

use crate::containerd::{ImageSummary, ProgressFn, PullOptions, ResolvedImage};
use crate::error::AgentError;

use super::Manager;

impl Manager {
    /// Imports an OCI or Docker archive; returns the image names it held.
    pub async fn import_image(
        &self,
        path: &std::path::Path,
        name: Option<&str>,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        self.rt.import_archive(path, name, progress).await
    }

    /// Pulls `reference`; returns the image's normalised name.
    pub async fn pull_image(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        self.rt.pull_image(reference, opts, progress).await
    }

    /// The image record of `name`.
    pub async fn resolve_image(&self, name: &str) -> Result<ResolvedImage, AgentError> {
        self.rt.resolve_image(name).await
    }

    /// Every image.
    pub async fn list_images(&self) -> Result<Vec<ImageSummary>, AgentError> {
        self.rt.list_images().await
    }

    /// containerd's version string.
    pub async fn containerd_version(&self) -> Result<String, AgentError> {
        self.rt.version().await
    }
}
