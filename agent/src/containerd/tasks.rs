//! Tasks: the running side of containers, and the exit events used for crash detection.

use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{
    events_client::EventsClient, tasks_client::TasksClient, CreateTaskRequest, DeleteTaskRequest,
    GetRequest, KillRequest, PauseTaskRequest, PublishRequest, ResumeTaskRequest, StartRequest,
    SubscribeRequest, UpdateTaskRequest, WaitRequest,
};
use containerd_client::types::v1::Status;
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tonic::Code;

use super::snapshots::{rootfs_to_pb, RootfsMount};
use super::stdio::{stdio_uri, TaskIo};
use super::{to_system_time, Connection, Containerd};
use crate::error::AgentError;
use oci_spec::runtime::LinuxResources;

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

/// Tasks: the running side of containers.
#[async_trait::async_trait]
pub trait Tasks: Send + Sync {
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

    /// Gives a live task new resource limits (its cgroup changes at once; no restart).
    async fn update_task_resources(
        &self,
        container_id: &str,
        resources: &LinuxResources,
    ) -> Result<(), AgentError>;

    /// Freezes every process of the task (the cgroup freezer).
    async fn pause_task(&self, container_id: &str) -> Result<(), AgentError>;

    /// Thaws a paused task.
    async fn resume_task(&self, container_id: &str) -> Result<(), AgentError>;
}

/// The type containerd knows OCI `LinuxResources` by in an update (JSON-encoded).
const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Topic of task exit events.
pub const TASK_EXIT_TOPIC: &str = "/tasks/exit";
/// Topic of the probe events that bring a new subscription to life.
const PROBE_TOPIC: &str = "/memoh/agent/subscribe-probe";
/// Type of the (empty) probe event.
const PROBE_TYPE_URL: &str = "memoh.agent.SubscribeProbe";
/// How often to probe while a subscription is not answered.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long a subscription may take to come alive.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `containerd.runc.v1.Options`, the runc shim's task options; only the fields we set.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    /// runc's state directory.
    #[prost(string, tag = "7")]
    root: String,
}

/// Type URL the shim resolves runc options by.
const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

fn state_from_pb(status: i32) -> TaskState {
    match Status::try_from(status) {
        Ok(Status::Created) => TaskState::Created,
        Ok(Status::Running) => TaskState::Running,
        Ok(Status::Stopped) => TaskState::Stopped,
        Ok(Status::Paused) => TaskState::Paused,
        Ok(Status::Pausing) => TaskState::Pausing,
        _ => TaskState::Unknown,
    }
}

/// How long creating or starting a task may take. Both are normally well under a second; a
/// shim that never answers (seen after a client died in the middle of a create) would
/// otherwise hold the bot's lock, and the reconcile pass that waits on it, for ever.
pub const TASK_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn stuck(what: &str, container_id: &str) -> AgentError {
    AgentError::Timeout(format!(
        "containerd did not {what} task {container_id} within {TASK_CALL_TIMEOUT:?}"
    ))
}

impl Containerd {
    fn tasks(&self) -> TasksClient<tonic::transport::Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// Publishes a probe event that only our own subscriptions see.
    async fn publish_probe(&self) -> Result<(), AgentError> {
        let req = self.request(PublishRequest {
            topic: PROBE_TOPIC.to_string(),
            event: Some(prost_types::Any {
                type_url: PROBE_TYPE_URL.to_string(),
                value: Vec::new(),
            }),
        });
        EventsClient::new(self.channel.clone())
            .publish(req)
            .await
            .map_err(|s| AgentError::containerd("publish subscription probe", s))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Tasks for Containerd {
    async fn create_task(
        &self,
        container_id: &str,
        rootfs: &[RootfsMount],
        io: &TaskIo,
    ) -> Result<u32, AgentError> {
        let req = self.request(CreateTaskRequest {
            container_id: container_id.to_string(),
            rootfs: rootfs.iter().map(rootfs_to_pb).collect(),
            stdin: String::new(),
            stdout: stdio_uri(io, io.stdout.as_deref())?,
            stderr: stdio_uri(io, io.stderr.as_deref())?,
            terminal: false,
            options: self.runc_root.as_ref().map(|root| prost_types::Any {
                type_url: RUNC_OPTIONS_TYPE_URL.to_string(),
                value: RuncOptions { root: root.clone() }.encode_to_vec(),
            }),
            ..Default::default()
        });
        let retry = req.get_ref().clone();
        let create = async {
            match self.tasks().create(req).await {
                // containerd killed while it created a task keeps, after its restart, a shim whose
                // init process never came to be: Get answers NOT_FOUND (so the caller saw no task)
                // but Create answers ALREADY_EXISTS, for ever. Delete removes that shim (it
                // tolerates the missing process); then create once more. A real task is not
                // harmed: Delete refuses a live one, and the second Create fails as the first.
                Err(s) if s.code() == Code::AlreadyExists => {
                    tracing::warn!(
                        container = %container_id,
                        "containerd holds a stale task entry; deleting it and creating again"
                    );
                    let del = self.request(DeleteTaskRequest {
                        container_id: container_id.to_string(),
                    });
                    if let Err(e) = self.tasks().delete(del).await {
                        tracing::debug!(container = %container_id, error = %e, "deleting the stale task");
                    }
                    self.tasks().create(self.request(retry)).await
                }
                r => r,
            }
        };
        let out = tokio::time::timeout(TASK_CALL_TIMEOUT, create)
            .await
            .map_err(|_| stuck("create", container_id))?
            .map_err(|s| AgentError::containerd(format!("create task {container_id}"), s))?
            .into_inner();
        tracing::debug!(container = %container_id, pid = out.pid, "task created");
        Ok(out.pid)
    }

    async fn start_task(&self, container_id: &str) -> Result<u32, AgentError> {
        let req = self.request(StartRequest {
            container_id: container_id.to_string(),
            exec_id: String::new(),
        });
        let out = tokio::time::timeout(TASK_CALL_TIMEOUT, self.tasks().start(req))
            .await
            .map_err(|_| stuck("start", container_id))?
            .map_err(|s| AgentError::containerd(format!("start task {container_id}"), s))?
            .into_inner();
        tracing::info!(container = %container_id, pid = out.pid, "task started");
        Ok(out.pid)
    }

    async fn kill_task(
        &self,
        container_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let signal = u32::try_from(signal)
            .map_err(|_| AgentError::InvalidArgument(format!("signal {signal}")))?;
        let req = self.request(KillRequest {
            container_id: container_id.to_string(),
            exec_id: String::new(),
            signal,
            all,
        });
        self.tasks()
            .kill(req)
            .await
            .map_err(|s| AgentError::containerd(format!("kill task {container_id}"), s))?;
        Ok(())
    }

    async fn wait_task(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<TaskExit, AgentError> {
        let pid = self
            .task_status(container_id)
            .await?
            .map(|s| s.pid)
            .unwrap_or(0);
        let req = self.request(WaitRequest {
            container_id: container_id.to_string(),
            exec_id: String::new(),
        });
        let mut client = self.tasks();
        let out = tokio::time::timeout(timeout, client.wait(req))
            .await
            .map_err(|_| {
                AgentError::Timeout(format!(
                    "task {container_id} still running after {timeout:?}"
                ))
            })?
            .map_err(|s| AgentError::containerd(format!("wait task {container_id}"), s))?
            .into_inner();
        Ok(TaskExit {
            container_id: container_id.to_string(),
            pid,
            exit_status: out.exit_status,
            exited_at: to_system_time(out.exited_at),
        })
    }

    async fn delete_task(&self, container_id: &str) -> Result<Option<TaskExit>, AgentError> {
        // containerd 1.6 answers UNKNOWN for a live task; say what is wrong instead.
        match self.task_status(container_id).await? {
            None => return Ok(None),
            Some(t)
                if matches!(
                    t.state,
                    TaskState::Running | TaskState::Paused | TaskState::Pausing
                ) =>
            {
                return Err(AgentError::FailedPrecondition(format!(
                    "task of container {container_id} is {:?}; kill it and wait for it first",
                    t.state
                )));
            }
            Some(_) => {}
        }
        let req = self.request(DeleteTaskRequest {
            container_id: container_id.to_string(),
        });
        match self.tasks().delete(req).await {
            Ok(r) => {
                let r = r.into_inner();
                tracing::debug!(container = %container_id, status = r.exit_status, "task deleted");
                Ok(Some(TaskExit {
                    container_id: container_id.to_string(),
                    pid: r.pid,
                    exit_status: r.exit_status,
                    exited_at: to_system_time(r.exited_at),
                }))
            }
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(
                format!("delete task {container_id}"),
                s,
            )),
        }
    }

    async fn task_status(&self, container_id: &str) -> Result<Option<TaskStatus>, AgentError> {
        let req = self.request(GetRequest {
            container_id: container_id.to_string(),
            exec_id: String::new(),
        });
        match self.tasks().get(req).await {
            Ok(r) => Ok(r.into_inner().process.map(|p| {
                let state = state_from_pb(p.status);
                let stopped = state == TaskState::Stopped;
                TaskStatus {
                    state,
                    pid: p.pid,
                    exit_status: stopped.then_some(p.exit_status),
                    exited_at: if stopped {
                        to_system_time(p.exited_at)
                    } else {
                        None
                    },
                }
            })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(AgentError::containerd(
                format!("get task {container_id}"),
                s,
            )),
        }
    }

    async fn update_task_resources(
        &self,
        container_id: &str,
        resources: &LinuxResources,
    ) -> Result<(), AgentError> {
        let value = serde_json::to_vec(resources).map_err(|e| {
            AgentError::InvalidArgument(format!("resource limits of {container_id}: {e}"))
        })?;
        let req = self.request(UpdateTaskRequest {
            container_id: container_id.to_string(),
            resources: Some(prost_types::Any {
                type_url: LINUX_RESOURCES_TYPE_URL.to_string(),
                value,
            }),
            annotations: Default::default(),
        });
        tokio::time::timeout(TASK_CALL_TIMEOUT, self.tasks().update(req))
            .await
            .map_err(|_| stuck("update", container_id))?
            .map_err(|s| AgentError::containerd(format!("update task {container_id}"), s))?;
        Ok(())
    }

    async fn pause_task(&self, container_id: &str) -> Result<(), AgentError> {
        let req = self.request(PauseTaskRequest {
            container_id: container_id.to_string(),
        });
        tokio::time::timeout(TASK_CALL_TIMEOUT, self.tasks().pause(req))
            .await
            .map_err(|_| stuck("pause", container_id))?
            .map_err(|s| AgentError::containerd(format!("pause task {container_id}"), s))?;
        Ok(())
    }

    async fn resume_task(&self, container_id: &str) -> Result<(), AgentError> {
        let req = self.request(ResumeTaskRequest {
            container_id: container_id.to_string(),
        });
        tokio::time::timeout(TASK_CALL_TIMEOUT, self.tasks().resume(req))
            .await
            .map_err(|_| stuck("resume", container_id))?
            .map_err(|s| AgentError::containerd(format!("resume task {container_id}"), s))?;
        Ok(())
    }

    async fn subscribe_task_exits(&self) -> Result<TaskExitStream, AgentError> {
        let ns = format!("{:?}", self.namespace());
        let req = self.request(SubscribeRequest {
            filters: vec![
                format!("topic=={TASK_EXIT_TOPIC:?},namespace=={ns}"),
                format!("topic=={PROBE_TOPIC:?},namespace=={ns}"),
            ],
        });
        // containerd answers a subscription (headers included) only with its first event, so
        // the call would block until some task exits. Probes published until the answer comes
        // make it come now, and prove the subscription is live before the caller goes on.
        let mut client = EventsClient::new(self.channel.clone());
        let call = client.subscribe(req);
        tokio::pin!(call);
        let deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT;
        let stream = loop {
            self.publish_probe().await?;
            tokio::select! {
                r = &mut call => {
                    break r
                        .map_err(|s| AgentError::containerd("subscribe to task exits", s))?
                        .into_inner();
                }
                _ = tokio::time::sleep(PROBE_INTERVAL) => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(AgentError::Timeout(
                            "subscribing to containerd's task exit events".into(),
                        ));
                    }
                }
            }
        };
        let out = stream.filter_map(|item| async move {
            match item {
                Err(s) => Some(Err(AgentError::containerd("task exit events", s))),
                Ok(env) if env.topic != TASK_EXIT_TOPIC => None,
                Ok(env) => {
                    let any = env.event?;
                    match containerd_client::events::TaskExit::decode(any.value.as_slice()) {
                        // Exits of exec'd processes carry their exec id; only the init
                        // process's exit means the container stopped.
                        Ok(e) if e.id.is_empty() || e.id == e.container_id => Some(Ok(TaskExit {
                            container_id: e.container_id,
                            pid: e.pid,
                            exit_status: e.exit_status,
                            exited_at: to_system_time(e.exited_at),
                        })),
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable task exit event");
                            None
                        }
                    }
                }
            }
        });
        Ok(out.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        assert_eq!(state_from_pb(Status::Running as i32), TaskState::Running);
        assert_eq!(state_from_pb(Status::Stopped as i32), TaskState::Stopped);
        assert_eq!(state_from_pb(99), TaskState::Unknown);
    }
}
