//! The fake's [`Containers`]: records taken once, kept while a task exists.

use std::collections::HashMap;

use tonic::Code;

use super::{apply_labels, matches, refused, FakeRuntime};
use crate::containerd::{ContainerInfo, Containers, NewContainer};
use crate::error::AgentError;

#[async_trait::async_trait]
impl Containers for FakeRuntime {
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
}
