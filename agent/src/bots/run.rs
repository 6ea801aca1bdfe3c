//! Starting and stopping a bot: its task, its network, the wait for its server.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use super::{lock, BotInfo, Manager, READY_TIMEOUT, STOP_GRACE};
use crate::containerd::spec::apply_privileges;
use crate::containerd::{ContainerInfo, TaskState, TaskStatus};
use crate::error::AgentError;
use crate::ids::{self};
use crate::pool::Route;

/// Why a task that should be starting will never serve: it exited or is gone. `None` while it
/// may still come up.
pub(super) fn task_gone(st: Option<&TaskStatus>) -> Option<String> {
    match st {
        None => Some("has no task (it was removed)".to_string()),
        Some(s) if s.state == TaskState::Stopped => Some(match s.exit_status {
            Some(code) => format!("exited with status {code}"),
            None => "exited".to_string(),
        }),
        Some(_) => None,
    }
}

impl Manager {
    /// Starts a stopped bot (no-op for a running one, which gets its network checked).
    pub async fn start(&self, bot: &str) -> Result<BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        self.set_desired(bot, "running").await?;
        self.start_locked(bot, &c).await?;
        self.migrate_in_background(bot);
        self.info(bot).await
    }

    /// Starts the task of `c` (deleting a stopped task entry first), attaches the network,
    /// and waits until the server answers. The caller holds the bot's lock.
    pub(super) async fn start_locked(
        &self,
        bot: &str,
        c: &ContainerInfo,
    ) -> Result<(), AgentError> {
        let cid = &c.id;
        let mut steps = crate::steps::Steps::start();
        match self.rt.task_status(cid).await? {
            Some(s) if s.state == TaskState::Running => {
                let ip = self.attach(bot, c).await?;
                debug!(bot, %ip, "already running");
                self.wait_ready(bot).await?;
                self.ensure_relay(bot, false);
                return Ok(());
            }
            Some(_) => {
                self.rt.delete_task(cid).await?;
            }
            None => {}
        }
        // containerd has no task for it now: a bundle it left half-deleted is garbage.
        self.clear_stale_bundle(bot, cid).await?;
        // A record an older agent wrote gets today's process privileges and today's names
        // (its namespace and cgroup carry the containerd namespace) before its task runs, and
        // every record its limits (and the server's OOM protection) from its labels.
        let mut renamed = None;
        if let Some(mut spec) = c.spec.clone() {
            let privileges = apply_privileges(&mut spec)?;
            let names = ids::rename_in_spec(
                &mut spec,
                &self.net.netns_path(bot),
                &ids::cgroup_path(&self.cfg.namespace, bot),
            );
            let limits = self.apply_limits(bot, c, &mut spec).await?;
            let dns = self.refresh_resolv_conf(bot, c, &mut spec).await?;
            // The host's server binary and /run/memoh (a record of an older agent moves here).
            let server = self.prepare_server(bot, &mut spec).await?;
            if privileges || names || limits || dns || server {
                self.rt.update_container_spec(cid, &spec).await?;
            }
            if privileges || names {
                info!(
                    bot,
                    privileges, names, "container spec brought up to today's privileges and names"
                );
            }
            if names {
                if let Some(old) = c.spec.as_ref().and_then(ids::recorded_netns) {
                    self.net.retire_netns(bot, &old).await;
                }
            }
            if server {
                info!(bot, "container spec runs the host's server binary");
            }
            if names || limits || dns || server {
                renamed = Some(ContainerInfo {
                    spec: Some(spec),
                    ..c.clone()
                });
            }
        }
        let c = renamed.as_ref().unwrap_or(c);
        steps.mark("spec");
        let mounts = self.rt.snapshot_mounts(&c.snapshot_key).await?;
        steps.mark("mounts");
        self.net.create_netns(bot).await?;
        steps.mark("netns");
        let log = ids::log_path(&self.cfg.state_dir, bot);
        if let Some(parent) = log.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| AgentError::io(parent, e))?;
        }
        crate::logdriver::create_server_task(&*self.rt, &self.cfg, cid, &mounts, &log).await?;
        steps.mark("task_create");
        if let Err(e) = self.rt.start_task(cid).await {
            let _ = self.rt.delete_task(cid).await;
            return Err(e);
        }
        steps.mark("task_start");
        lock(&self.health)
            .entry(bot.to_string())
            .or_default()
            .last_start = Some(std::time::Instant::now());
        // A new task is a new server: drop any channel to the old one.
        self.pool.evict(bot);
        if let Err(e) = self.attach(bot, c).await {
            warn!(bot, error = %e, "network setup failed; stopping the task");
            let _ = self.kill_and_delete_task(cid, Duration::from_secs(5)).await;
            return Err(e);
        }
        steps.mark("attach");
        self.wait_ready(bot).await?;
        steps.mark("ready");
        debug!(bot, total_ms = steps.total_ms(), %steps, "start steps");
        self.ensure_relay(bot, true);
        Ok(())
    }

    /// Attaches the bot (keeping a healthy address), makes sure the host rules exist, and
    /// records its route.
    /// One pass of the host rules and the ruleset serves the new attachment (not one for the
    /// attachment and another for the rules).
    pub(super) async fn attach(&self, bot: &str, c: &ContainerInfo) -> Result<IpAddr, AgentError> {
        let bn = self.net.setup(bot, &self.task_netns(bot, c)).await?;
        self.record_attachment(bot, c, &bn).await;
        Ok(bn.ip)
    }

    /// [`Manager::attach`] without the host rules (the caller ensures them, once per network).
    pub(super) async fn attach_without_host_rules(
        &self,
        bot: &str,
        c: &ContainerInfo,
    ) -> Result<crate::network::BotNetwork, AgentError> {
        let bn = self
            .net
            .setup_without_host_rules(bot, &self.task_netns(bot, c))
            .await?;
        self.record_attachment(bot, c, &bn).await;
        Ok(bn)
    }

    /// The namespace the task runs in: the one its spec names (an older agent's name until the
    /// bot's next start), today's name when the spec names none.
    fn task_netns(&self, bot: &str, c: &ContainerInfo) -> std::path::PathBuf {
        c.spec
            .as_ref()
            .and_then(ids::recorded_netns)
            .unwrap_or_else(|| self.net.netns_path(bot))
    }

    /// Records the route to the attached bot (evicting a channel to an older one) and its
    /// bridge port.
    async fn record_attachment(
        &self,
        bot: &str,
        c: &ContainerInfo,
        bn: &crate::network::BotNetwork,
    ) {
        let token = tokio::fs::read_to_string(ids::token_path(&self.cfg.state_dir, bot))
            .await
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let generation = format!(
            "{}:{}",
            c.snapshot_key,
            c.created_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let route = Route {
            ip: bn.ip,
            token,
            generation,
        };
        {
            let mut routes = lock(&self.routes);
            if routes.get(bot) != Some(&route) {
                self.pool.evict(bot);
                routes.insert(bot.to_string(), route);
            }
        }
        let mut veths = lock(&self.host_veths);
        match &bn.host_veth {
            Some(v) => {
                veths.insert(bot.to_string(), v.clone());
            }
            None => {
                veths.remove(bot);
            }
        }
    }

    /// Polls the bot's server until it answers or [`READY_TIMEOUT`] passes.
    pub(super) async fn wait_ready(&self, bot: &str) -> Result<(), AgentError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(5);
        loop {
            let last = match self.cached_client(bot) {
                Some(c) => match c.ping().await {
                    Ok(()) => return Ok(()),
                    Err(s) => s.message().to_string(),
                },
                None => "no route".into(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::BotUnavailable {
                    bot: bot.to_string(),
                    reason: format!("server did not answer within {READY_TIMEOUT:?}: {last}"),
                });
            }
            // A server whose task already ended will never answer: say so now instead of
            // holding the bot's lock for the whole timeout. Checked once the quick polls are
            // over (a starting server usually answers within a few of them).
            if delay >= Duration::from_millis(100) {
                let cid = ids::container_id(bot);
                if let Ok(st) = self.rt.task_status(&cid).await {
                    if let Some(why) = task_gone(st.as_ref()) {
                        return Err(AgentError::BotUnavailable {
                            bot: bot.to_string(),
                            reason: format!("server {why} before answering: {last}"),
                        });
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    pub(super) async fn kill_and_delete_task(
        &self,
        cid: &str,
        grace: Duration,
    ) -> Result<(), AgentError> {
        let Some(mut st) = self.rt.task_status(cid).await? else {
            return Ok(());
        };
        if matches!(st.state, TaskState::Paused | TaskState::Pausing) {
            // A frozen task takes no signal until it is thawed; then it stops as any other.
            self.rt.resume_task(cid).await?;
            st.state = TaskState::Running;
        }
        if st.state == TaskState::Running || st.state == TaskState::Created {
            if let Some(bot) = ids::bot_of_container(cid) {
                lock(&self.health)
                    .entry(bot.to_string())
                    .or_default()
                    .stopping = true;
            }
            if !grace.is_zero() {
                self.rt.kill_task(cid, libc::SIGTERM, false).await.ok();
                if self.rt.wait_task(cid, grace).await.is_ok() {
                    self.rt.delete_task(cid).await?;
                    return Ok(());
                }
            }
            self.rt.kill_task(cid, libc::SIGKILL, true).await.ok();
            if let Err(e) = self.rt.wait_task(cid, Duration::from_secs(10)).await {
                warn!(container = cid, error = %e, "task did not exit after SIGKILL");
            }
        }
        self.rt.delete_task(cid).await?;
        Ok(())
    }

    /// Stops the bot: SIGTERM, bounded wait, SIGKILL, bounded wait; removes the task entry and
    /// detaches the network. The bot stays stopped across agent restarts.
    pub async fn stop(&self, bot: &str) -> Result<BotInfo, AgentError> {
        let _g = self.lock_bot(bot).await;
        let c = self.container_locked(bot).await?;
        self.set_desired(bot, "stopped").await?;
        self.forget_route(bot);
        self.kill_and_delete_task(&c.id, STOP_GRACE).await?;
        self.net.teardown(bot).await?;
        self.info(bot).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: TaskState, exit_status: Option<u32>) -> TaskStatus {
        TaskStatus {
            state,
            pid: 0,
            exit_status,
            exited_at: None,
        }
    }

    #[test]
    fn only_an_ended_or_missing_task_is_given_up_on() {
        assert_eq!(
            task_gone(None).as_deref(),
            Some("has no task (it was removed)")
        );
        assert_eq!(
            task_gone(Some(&status(TaskState::Stopped, Some(127)))).as_deref(),
            Some("exited with status 127")
        );
        assert_eq!(
            task_gone(Some(&status(TaskState::Stopped, None))).as_deref(),
            Some("exited")
        );
        for state in [TaskState::Running, TaskState::Created, TaskState::Paused] {
            assert_eq!(task_gone(Some(&status(state, None))), None, "{state:?}");
        }
    }
}
