//! Container records: the [`Containers`] trait, its types, and its implementation for
//! [`Containerd`].

use std::collections::HashMap;
use std::time::SystemTime;

use containerd_client::services::v1::{
    container::Runtime as PbRuntime, containers_client::ContainersClient, Container,
    CreateContainerRequest, DeleteContainerRequest, GetContainerRequest, ListContainersRequest,
    UpdateContainerRequest,
};
use tonic::Code;

use super::spec::{spec_from_any, spec_to_any};
use super::{to_system_time, Containerd, Tasks};
use crate::error::AgentError;

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

/// Container records.
#[async_trait::async_trait]
pub trait Containers: Send + Sync {
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
}

fn from_pb(c: Container) -> ContainerInfo {
    let spec = c.spec.as_ref().and_then(|any| match spec_from_any(any) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(container = %c.id, error = %e, "container spec does not parse");
            None
        }
    });
    ContainerInfo {
        spec,
        runtime: c.runtime.map(|r| r.name).unwrap_or_default(),
        created_at: to_system_time(c.created_at),
        updated_at: to_system_time(c.updated_at),
        id: c.id,
        image: c.image,
        labels: c.labels,
        snapshotter: c.snapshotter,
        snapshot_key: c.snapshot_key,
    }
}

/// The largest single message taken from the containers service: one container record (its
/// OCI spec is a few KiB; a spec with many mounts or a large environment, tens).
const MAX_CONTAINER_MESSAGE: usize = 16 << 20;

impl Containerd {
    fn containers(&self) -> ContainersClient<tonic::transport::Channel> {
        ContainersClient::new(self.channel.clone()).max_decoding_message_size(MAX_CONTAINER_MESSAGE)
    }
}

#[async_trait::async_trait]
impl Containers for Containerd {
    async fn create_container(&self, c: &NewContainer) -> Result<ContainerInfo, AgentError> {
        let spec = spec_to_any(&c.spec)?;
        let req = self.request(CreateContainerRequest {
            container: Some(Container {
                id: c.id.clone(),
                labels: c.labels.clone(),
                image: c.image.clone(),
                runtime: Some(PbRuntime {
                    name: self.runtime.clone(),
                    options: None,
                }),
                spec: Some(spec),
                snapshotter: self.snapshotter.clone(),
                snapshot_key: c.snapshot_key.clone(),
                ..Default::default()
            }),
        });
        let out = self
            .containers()
            .create(req)
            .await
            .map_err(|s| AgentError::containerd(format!("create container {}", c.id), s))?
            .into_inner();
        tracing::info!(container = %c.id, image = %c.image, "container created");
        out.container
            .map(from_pb)
            .ok_or_else(|| missing(&format!("create container {}", c.id)))
    }

    async fn get_container(&self, id: &str) -> Result<Option<ContainerInfo>, AgentError> {
        let req = self.request(GetContainerRequest { id: id.to_string() });
        match self.containers().get(req).await {
            Ok(r) => Ok(r.into_inner().container.map(from_pb)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(format!("get container {id}"), s)),
        }
    }

    async fn list_containers(&self, filters: &[String]) -> Result<Vec<ContainerInfo>, AgentError> {
        // One message per container: `List` answers in one message, which outgrows the 4 MiB
        // a gRPC client takes by default at about 400 bots (10 KiB of record each).
        let req = self.request(ListContainersRequest {
            filters: filters.to_vec(),
        });
        let mut stream = self
            .containers()
            .list_stream(req)
            .await
            .map_err(|s| AgentError::containerd("list containers", s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream
            .message()
            .await
            .map_err(|s| AgentError::containerd("list containers", s))?
        {
            out.extend(m.container.map(from_pb));
        }
        Ok(out)
    }

    async fn delete_container(&self, id: &str) -> Result<bool, AgentError> {
        // containerd 1.6 deletes the record even under a live task, orphaning the shim.
        if let Some(task) = self.task_status(id).await? {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id} still has a task ({:?}); delete the task first",
                task.state
            )));
        }
        let req = self.request(DeleteContainerRequest { id: id.to_string() });
        match self.containers().delete(req).await {
            Ok(_) => {
                tracing::info!(container = %id, "container deleted");
                Ok(true)
            }
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(AgentError::containerd(format!("delete container {id}"), s)),
        }
    }

    async fn update_container_labels(
        &self,
        id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<ContainerInfo, AgentError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = self.request(UpdateContainerRequest {
            container: Some(Container {
                id: id.to_string(),
                labels: labels.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        });
        let op = || format!("update container {id} labels");
        let out = self
            .containers()
            .update(req)
            .await
            .map_err(|s| AgentError::containerd(op(), s))?
            .into_inner();
        out.container.map(from_pb).ok_or_else(|| missing(&op()))
    }

    async fn update_container_spec(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<ContainerInfo, AgentError> {
        let req = self.request(UpdateContainerRequest {
            container: Some(Container {
                id: id.to_string(),
                spec: Some(spec_to_any(spec)?),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec".to_string()],
            }),
        });
        let op = || format!("update container {id} spec");
        let out = self
            .containers()
            .update(req)
            .await
            .map_err(|s| AgentError::containerd(op(), s))?
            .into_inner();
        tracing::info!(container = %id, "container spec updated");
        out.container.map(from_pb).ok_or_else(|| missing(&op()))
    }
}

pub(crate) fn missing(op: &str) -> AgentError {
    AgentError::containerd(op, tonic::Status::internal("empty answer"))
}
