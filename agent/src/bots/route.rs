//! The pooled client of a bot, and what a failed call through it sets off.

use std::time::Duration;

use memoh_proto::ContainerClient;
use tracing::warn;

use super::{lock, status_name, wants_running, Manager};
use crate::containerd::TaskState;
use crate::error::AgentError;
use crate::ids::{self};

/// Least time between two network checks of one bot that failed calls ask for.
pub(super) const NET_CHECK_GAP: Duration = Duration::from_secs(2);

impl Manager {
    pub(super) fn cached_client(&self, bot: &str) -> Option<ContainerClient> {
        let route = lock(&self.routes).get(bot).cloned()?;
        let c = self.pool.client(bot, &route).ok()?;
        Some(c.unary_deadline(Duration::from_secs(2)))
    }

    /// The client of a bot's server: NOT_FOUND for an unknown bot, UNAVAILABLE (with the
    /// reason) for one that is down.
    pub async fn client(&self, bot: &str) -> Result<ContainerClient, AgentError> {
        ids::validate(bot)?;
        let route = lock(&self.routes).get(bot).cloned();
        if let Some(route) = route {
            return self.pool.client(bot, &route);
        }
        // Not cached: explain why, or repair it.
        let c = match self.rt.get_container(&ids::container_id(bot)).await? {
            Some(c) => c,
            None => {
                // No record: recovery may bring the bot back (see `container_locked`); then it
                // is started as the next reconcile would.
                let g = self.lock_bot(bot).await;
                let c = match self.container_locked(bot).await {
                    Ok(c) => c,
                    Err(e) => {
                        drop(g);
                        self.forget_lock(bot);
                        return Err(e);
                    }
                };
                if wants_running(&c) {
                    self.start_locked(bot, &c).await?;
                }
                c
            }
        };
        let st = self.rt.task_status(&c.id).await?;
        let reason = match st.as_ref().map(|s| s.state) {
            Some(TaskState::Running) => {
                // Running but unknown to us (e.g. mid-reconcile): attach and answer.
                let _g = self.lock_bot(bot).await;
                self.attach(bot, &c).await?;
                let route = lock(&self.routes).get(bot).cloned();
                if let Some(route) = route {
                    return self.pool.client(bot, &route);
                }
                "no address".to_string()
            }
            Some(TaskState::Paused | TaskState::Pausing) => "bot is paused".to_string(),
            _ => format!("task is {}", status_name(st.as_ref())),
        };
        Err(AgentError::BotUnavailable {
            bot: bot.to_string(),
            reason,
        })
    }

    /// Reports a failed call on `bot`'s channel: transport failures evict it so the next call
    /// dials afresh, and so does a deadline, which bounds a channel stuck connecting (calls
    /// in flight keep their own handle on the old connection).
    pub fn report_failure(&self, bot: &str, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ) {
            if let Some(route) = lock(&self.routes).get(bot).cloned() {
                self.pool.evict_if(bot, &route);
            }
            self.check_network_soon(bot, false);
        }
    }

    /// A call to `bot` failed at the transport level: its network is checked (and attached
    /// again if broken, the host rules restored) now, not at the next periodic reconcile, so a
    /// deleted veth or a flushed nat table costs a bot about a second instead of up to 15.
    /// At most one check per bot every [`NET_CHECK_GAP`], unless `now` (a link really went).
    pub(super) fn check_network_soon(&self, bot: &str, now: bool) {
        {
            let mut health = lock(&self.health);
            let h = health.entry(bot.to_string()).or_default();
            if !now
                && h.last_net_check
                    .is_some_and(|t| t.elapsed() < NET_CHECK_GAP)
            {
                return;
            }
            h.last_net_check = Some(std::time::Instant::now());
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let bot = bot.to_string();
        self.spawn(async move {
            if now {
                // The kernel reports the host end before the bot's end is gone: give it a
                // moment, or the check can still find the bot's interface up.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _g = me.lock_bot(&bot).await;
            let Ok(Some(c)) = me.rt.get_container(&ids::container_id(&bot)).await else {
                return;
            };
            let running = me
                .rt
                .task_status(&c.id)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.state == TaskState::Running);
            // A stopped task is the exit watcher's to restart.
            if wants_running(&c) && running {
                if let Err(e) = me.attach(&bot, &c).await {
                    warn!(bot, error = %e, "network check after a failed call failed");
                }
            }
        });
    }
}
