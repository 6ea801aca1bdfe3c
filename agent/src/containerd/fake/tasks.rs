//! The fake's [`Tasks`]: created, running and stopped tasks and their published exits.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::Code;

use super::{refused, FakeRuntime, Task};
use crate::containerd::{
    RootfsMount, TaskExit, TaskExitStream, TaskIo, TaskState, TaskStatus, Tasks,
};
use crate::error::AgentError;

#[async_trait::async_trait]
impl Tasks for FakeRuntime {
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
                    resources: None,
                },
            );
            Ok(pid)
        })
    }

    async fn update_task_resources(
        &self,
        container_id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), AgentError> {
        let resources = resources.clone();
        self.call("update_task_resources", |s| {
            let op = format!("update task {container_id}");
            let t = s
                .tasks
                .get_mut(container_id)
                .ok_or_else(|| refused(op, Code::NotFound, "no task"))?;
            t.resources = Some(resources);
            Ok(())
        })
    }

    async fn pause_task(&self, container_id: &str) -> Result<(), AgentError> {
        self.call("pause_task", |s| {
            let op = format!("pause task {container_id}");
            let t = s
                .tasks
                .get_mut(container_id)
                .ok_or_else(|| refused(op.clone(), Code::NotFound, "no task"))?;
            if t.state != TaskState::Running {
                return Err(refused(
                    op,
                    Code::FailedPrecondition,
                    format!("task is {:?}", t.state),
                ));
            }
            t.state = TaskState::Paused;
            Ok(())
        })
    }

    async fn resume_task(&self, container_id: &str) -> Result<(), AgentError> {
        self.call("resume_task", |s| {
            let op = format!("resume task {container_id}");
            let t = s
                .tasks
                .get_mut(container_id)
                .ok_or_else(|| refused(op.clone(), Code::NotFound, "no task"))?;
            if t.state != TaskState::Paused {
                return Err(refused(
                    op,
                    Code::FailedPrecondition,
                    format!("task is {:?}", t.state),
                ));
            }
            t.state = TaskState::Running;
            Ok(())
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
