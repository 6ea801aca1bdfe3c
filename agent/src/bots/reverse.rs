//! The ReverseHTTP relay of each running bot (see [`crate::reverse_http`]): opened after a
//! start or when reconcile finds a running bot, nudged to reopen at every start, closed with
//! the bot's route (stop, delete, crash).

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{lock, Manager};
use crate::reverse_http::forward::REQUEST_TIMEOUT;
use crate::reverse_http::relay::{keep_open, Counters, RelayContext, MAX_BYTES_IN_FLIGHT};

/// A bot's running relay.
pub(super) struct Relay {
    stop: CancellationToken,
    nudge: Arc<Notify>,
}

impl Manager {
    /// Makes sure the bot has a relay when `[reverse_http] allow` is set; `nudge` makes a
    /// running one reopen its stream now (the bot's server was just started).
    pub(super) fn ensure_relay(&self, bot: &str, nudge: bool) {
        if !self.cfg.reverse_http.enabled() {
            return;
        }
        let Some(me) = self.me.get().cloned() else {
            return;
        };
        let mut relays = lock(&self.relays);
        if let Some(r) = relays.get(bot).filter(|r| !r.stop.is_cancelled()) {
            if nudge {
                r.nudge.notify_one();
            }
            return;
        }
        let ctx = RelayContext {
            bot: bot.to_string(),
            allow: Arc::new(self.cfg.reverse_http.allow_list()),
            timeout: REQUEST_TIMEOUT,
            counters: Arc::new(Counters::default()),
            stop: self.stop.child_token(),
            nudge: Arc::new(Notify::new()),
            max_bytes: MAX_BYTES_IN_FLIGHT,
        };
        relays.insert(
            bot.to_string(),
            Relay {
                stop: ctx.stop.clone(),
                nudge: ctx.nudge.clone(),
            },
        );
        drop(relays);
        let b = bot.to_string();
        self.spawn(keep_open(ctx, move || {
            let (me, b) = (me.clone(), b.clone());
            async move { me.upgrade()?.relay_client(&b) }
        }));
    }

    /// Ends the bot's relay, if it has one.
    pub(super) fn stop_relay(&self, bot: &str) {
        if let Some(r) = lock(&self.relays).remove(bot) {
            r.stop.cancel();
        }
    }

    /// The pooled client of the bot's current route, if it has one.
    fn relay_client(&self, bot: &str) -> Option<memoh_proto::ContainerClient> {
        let route = lock(&self.routes).get(bot).cloned()?;
        self.pool.client(bot, &route).ok()
    }
}
