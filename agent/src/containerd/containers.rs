//! Container records.

use std::collections::HashMap;

use containerd_client::services::v1::{
    container::Runtime as PbRuntime, containers_client::ContainersClient, Container,
    CreateContainerRequest, DeleteContainerRequest, GetContainerRequest, ListContainersRequest,
    UpdateContainerRequest,
};
use tonic::Code;

use super::spec::{spec_from_any, spec_to_any};
use super::{to_system_time, ContainerInfo, Containerd, NewContainer};
use crate::error::AgentError;

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

impl Containerd {
    fn containers(&self) -> ContainersClient<tonic::transport::Channel> {
        ContainersClient::new(self.channel.clone())
    }

    pub(crate) async fn create_container_inner(
        &self,
        c: &NewContainer,
    ) -> Result<ContainerInfo, AgentError> {
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

    pub(crate) async fn get_container_inner(
        &self,
        id: &str,
    ) -> Result<Option<ContainerInfo>, AgentError> {
        let req = self.request(GetContainerRequest { id: id.to_string() });
        match self.containers().get(req).await {
            Ok(r) => Ok(r.into_inner().container.map(from_pb)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(format!("get container {id}"), s)),
        }
    }

    pub(crate) async fn list_containers_inner(
        &self,
        filters: &[String],
    ) -> Result<Vec<ContainerInfo>, AgentError> {
        let req = self.request(ListContainersRequest {
            filters: filters.to_vec(),
        });
        let out = self
            .containers()
            .list(req)
            .await
            .map_err(|s| AgentError::containerd("list containers", s))?
            .into_inner();
        Ok(out.containers.into_iter().map(from_pb).collect())
    }

    pub(crate) async fn delete_container_inner(&self, id: &str) -> Result<bool, AgentError> {
        // containerd 1.6 deletes the record even under a live task, orphaning the shim.
        if let Some(task) = self.task_status_inner(id).await? {
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

    pub(crate) async fn update_container_labels_inner(
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
}

impl Containerd {
    pub(crate) async fn update_container_spec_inner(
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
