//! Reconciling bots from containerd, and the watchers: task exits (crash restarts with
//! backoff) and deleted links (a bot's veth attached again at once).

use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{deleting, exit_code, lock, wants_running, Health, Manager};
use crate::containerd::{label_filter, TaskState};
use crate::error::AgentError;
use crate::ids::{self, LABEL_BOT_ID, LABEL_DESIRED};

/// The interface an `ip -o monitor link` line reports deleted: `Deleted 12: veth1@if3: ...`
/// gives `veth1`.
pub(super) fn deleted_link(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("Deleted ")?;
    let (_, rest) = rest.split_once(": ")?;
    let name = rest.split(':').next()?.split('@').next()?;
    (!name.is_empty()).then_some(name)
}

/// How long to wait, at `now`, before restarting a bot whose task just exited, and the
/// backoff that exit leaves in `h` for the next one: 250 ms doubling per crash, at most 30 s;
/// a bot that ran for a minute starts over; an exit the agent caused (`stopping`) does not
/// count as a crash.
pub(super) fn restart_delay(h: &mut Health, now: Instant) -> Duration {
    // A bot that ran for a minute starts its backoff over.
    if h.last_start
        .is_some_and(|t| now.saturating_duration_since(t) > Duration::from_secs(60))
    {
        h.backoff = 0;
    }
    let d = Duration::from_millis(250) * 2u32.saturating_pow(h.backoff.min(7));
    if std::mem::take(&mut h.stopping) {
        // The agent stopped it on purpose; whoever did restarts it if it should run.
    } else {
        h.backoff += 1;
    }
    d.min(Duration::from_secs(30))
}

impl Manager {
    /// Brings every bot whose desired state is `running` back: a missing or stopped task is
    /// started again and re-networked; a running one keeps its address. Returns how many bots
    /// were started.
    pub async fn reconcile(&self) -> Result<usize, AgentError> {
        // Finish any version cycle an earlier agent died in, before starting anything.
        match self.recover().await {
            Ok(r) if !r.is_empty() => info!(bots = ?r, "recovered bots from an interrupted cycle"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "recovery of interrupted cycles failed"),
        }
        let containers = self
            .rt
            .list_containers(&[label_filter(LABEL_BOT_ID, None)])
            .await?;
        let mut started = 0;
        // Running bots' host rules are per network, not per bot: checked once per pass, after
        // the loop (100 bots would otherwise cost 400 `iptables` runs every pass).
        let mut networks: Vec<crate::network::BotNetwork> = Vec::new();
        for c in containers {
            let Some(bot) = c.labels.get(LABEL_BOT_ID).cloned() else {
                continue;
            };
            if c.labels.get(LABEL_DESIRED).map(String::as_str) == Some("stopped") {
                continue;
            }
            let _g = self.lock_bot(&bot).await;
            // Re-read under the lock: another operation may have changed it.
            let Some(c) = self.rt.get_container(&c.id).await? else {
                continue;
            };
            if let Some(keep_versions) = deleting(&c) {
                info!(bot, "reconcile: finishing an interrupted delete");
                if let Err(e) = self.delete_locked(&bot, &c, keep_versions).await {
                    warn!(bot, error = %e, "finishing the delete failed");
                }
                continue;
            }
            if !wants_running(&c) {
                continue;
            }
            let running = self
                .rt
                .task_status(&c.id)
                .await?
                .is_some_and(|s| s.state == TaskState::Running);
            let r = if running {
                self.attach_without_host_rules(&bot, &c).await.map(|bn| {
                    if !networks
                        .iter()
                        .any(|n| n.subnet() == bn.subnet() && n.bridge == bn.bridge)
                    {
                        networks.push(bn);
                    }
                })
            } else {
                started += 1;
                info!(bot, "reconcile: starting");
                self.start_locked(&bot, &c).await
            };
            match r {
                Ok(()) => {
                    self.ensure_relay(&bot, false);
                    self.migrate_in_background(&bot)
                }
                Err(e) => warn!(bot, error = %e, "reconcile failed for bot"),
            }
        }
        for bn in &networks {
            if let Err(e) = self.net.ensure_host_rules(bn).await {
                warn!(subnet = %bn.subnet(), error = %e, "reconcile: host rules failed");
            }
        }
        Ok(started)
    }

    /// Watches task exits and restarts bots that should be running, with backoff; re-runs
    /// [`Manager::reconcile`] periodically and after containerd comes back. Ends on
    /// [`Manager::shutdown`].
    pub fn spawn_watchers(self: &Arc<Self>) {
        let stop = self.stop.clone();
        let me = self.clone();
        let s = stop.clone();
        self.spawn(async move {
            loop {
                let events = tokio::select! {
                    _ = s.cancelled() => return,
                    r = me.rt.subscribe_task_exits() => r,
                };
                match events {
                    Ok(mut events) => loop {
                        let ev = tokio::select! {
                            _ = s.cancelled() => return,
                            ev = events.next() => ev,
                        };
                        match ev {
                            Some(Ok(exit)) => me.on_exit(exit),
                            Some(Err(e)) => {
                                warn!(error = %e, "task event stream failed");
                                break;
                            }
                            None => break,
                        }
                    },
                    Err(e) => debug!(error = %e, "cannot subscribe to task events yet"),
                }
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // containerd may have restarted: make sure every bot is up.
                if let Err(e) = me.reconcile().await {
                    debug!(error = %e, "reconcile after event stream loss failed");
                }
            }
        });
        let me = self.clone();
        let s = stop.clone();
        self.spawn(async move { me.watch_links(s).await });
        let me = self.clone();
        self.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = me.reconcile().await {
                    debug!(error = %e, "periodic reconcile failed");
                }
            }
        });
        let me = self.clone();
        let stop = self.stop.clone();
        self.spawn(async move {
            let mut tick = tokio::time::interval(super::resources::USAGE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pass = 0u32;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let disk = pass % super::resources::DISK_EVERY_PASSES == 0;
                pass = pass.wrapping_add(1);
                if let Err(e) = me.usage_pass(disk).await {
                    debug!(error = %e, "usage pass failed");
                }
            }
        });
    }

    /// Follows link deletions (`ip -o monitor link`, in the agent's network namespace): when
    /// the host end of a running bot's veth goes, that bot is attached again at once instead
    /// of at the next periodic reconcile (its calls would hang on the dead link until then).
    /// Without `ip` the periodic reconcile still repairs it.
    pub(super) async fn watch_links(self: Arc<Self>, stop: CancellationToken) {
        use tokio::io::AsyncBufReadExt;
        loop {
            let child = tokio::process::Command::new("ip")
                .args(["-o", "monitor", "link"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "cannot follow link deletions (ip monitor); relying on the periodic reconcile");
                    return;
                }
            };
            let Some(out) = child.stdout.take() else {
                return;
            };
            let mut lines = tokio::io::BufReader::new(out).lines();
            // A bridge port's deletion is reported twice in a row.
            let mut last: Option<String> = None;
            loop {
                let line = tokio::select! {
                    _ = stop.cancelled() => return,
                    l = lines.next_line() => l,
                };
                match line {
                    Ok(Some(l)) => match deleted_link(&l) {
                        Some(link) if last.as_deref() != Some(link) => {
                            last = Some(link.to_string());
                            self.on_link_deleted(link);
                        }
                        _ => {}
                    },
                    _ => break,
                }
            }
            debug!("ip monitor ended; starting it again");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// `link` was deleted: the running bot whose host veth it was gets its network checked.
    pub(super) fn on_link_deleted(&self, link: &str) {
        let bot = lock(&self.host_veths)
            .iter()
            .find(|(_, veth)| *veth == link)
            .map(|(bot, _)| bot.clone());
        if let Some(bot) = bot {
            info!(bot, link, "the bot's veth was deleted; attaching it again");
            self.check_network_soon(&bot, true);
        }
    }

    pub(super) fn on_exit(self: &Arc<Self>, exit: crate::containerd::TaskExit) {
        let Some(bot) = ids::bot_of_container(&exit.container_id).map(str::to_string) else {
            return;
        };
        let delay = {
            let mut h = lock(&self.health);
            let h = h.entry(bot.clone()).or_default();
            h.last_exit_code = Some(exit_code(exit.exit_status));
            h.last_exit_at = exit.exited_at.or(Some(SystemTime::now()));
            restart_delay(h, Instant::now())
        };
        let me = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = me.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let _g = me.lock_bot(&bot).await;
            let Ok(Some(c)) = me.rt.get_container(&ids::container_id(&bot)).await else {
                return;
            };
            if !wants_running(&c) {
                return;
            }
            if let Ok(Some(st)) = me.rt.task_status(&c.id).await {
                if st.state == TaskState::Running {
                    return;
                }
            }
            me.forget_route(&bot);
            info!(bot, ?delay, "bot's server exited; restarting");
            match me.start_locked(&bot, &c).await {
                Ok(()) => {
                    crate::metrics::global().restart();
                    lock(&me.health)
                        .entry(bot.clone())
                        .or_default()
                        .restart_count += 1;
                }
                Err(e) => warn!(bot, error = %e, "restart failed; will retry"),
            }
        });
    }

    /// Starts the one-time migration of the bot's legacy data in the background, if it has
    /// any. It waits for the bot's lock, so it never blocks the start that triggered it.
    pub(super) fn migrate_in_background(&self, bot: &str) {
        if !self.has_legacy_data(bot) || !lock(&self.auto_migrated).insert(bot.to_string()) {
            return;
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let bot = bot.to_string();
        self.spawn(async move {
            info!(bot, "legacy data found; migrating in the background");
            match me.migrate(&bot, &|_| {}).await {
                Ok(r) if r.failures.is_empty() => {
                    info!(
                        bot,
                        entries = r.entries,
                        renamed = r.renamed,
                        "background migration done"
                    )
                }
                Ok(r) => warn!(bot, failures = ?r.failures, "background migration incomplete"),
                Err(e) => warn!(bot, error = %e, "background migration failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_links_are_read_from_ip_monitor_lines() {
        let del = "Deleted 1304: veth5c1e2f3a@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop \
                   master cni0 state DOWN group default \\    link/ether 8a:51:63:e6:3e:6f";
        assert_eq!(deleted_link(del), Some("veth5c1e2f3a"));
        assert_eq!(
            deleted_link("Deleted 7: tap0: <BROADCAST> mtu 1500"),
            Some("tap0")
        );
        let add = "1304: veth5c1e2f3a@if2: <BROADCAST,MULTICAST> mtu 1500 master cni0";
        assert_eq!(deleted_link(add), None);
        assert_eq!(deleted_link("Deleted "), None);
        assert_eq!(deleted_link("Deleted 3: : <>"), None);
    }
}
