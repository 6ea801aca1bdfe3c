//! The connection pool: one cached tonic channel per bot to `IP:9090`.
//!
//! An entry is keyed by the bot and remembers the address and the container generation it
//! was built for: a different IP or a recreated container (new generation) always evicts.
//! Channels connect lazily and reconnect on their own; a channel whose calls fail at the
//! transport level is evicted by [`Pool::evict_if`] and dialled afresh on the next call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use memoh_proto::limits::SERVER_PORT;
use memoh_proto::ContainerClient;
use tracing::debug;

use crate::error::AgentError;
use crate::sync::lock;

/// Where and how to reach one bot's server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The bot's address.
    pub ip: IpAddr,
    /// The bearer token of its current container, when it has one.
    pub token: Option<String>,
    /// Identifies the container incarnation (changes when the container is recreated).
    pub generation: String,
}

struct Entry {
    route: Route,
    client: ContainerClient,
}

/// The pool. Short locks only: building a lazy channel does no I/O.
#[derive(Default)]
pub struct Pool {
    entries: Mutex<HashMap<String, Entry>>,
    unary_deadline: Option<Duration>,
}

impl Pool {
    /// An empty pool whose clients use `unary_deadline` for unary calls.
    pub fn new(unary_deadline: Duration) -> Self {
        Self {
            entries: Mutex::default(),
            unary_deadline: Some(unary_deadline),
        }
    }

    /// The client for `bot` at `route`, reusing the cached channel when the route is unchanged.
    pub fn client(&self, bot: &str, route: &Route) -> Result<ContainerClient, AgentError> {
        let mut map = lock(&self.entries);
        if let Some(e) = map.get(bot) {
            if &e.route == route {
                return Ok(e.client.clone());
            }
            debug!(bot, old = %e.route.ip, new = %route.ip, "route changed; evicting channel");
            crate::metrics::global().eviction(crate::metrics::Eviction::RouteChanged);
        }
        let addr = match route.ip {
            IpAddr::V4(ip) => format!("{ip}:{SERVER_PORT}"),
            IpAddr::V6(ip) => format!("[{ip}]:{SERVER_PORT}"),
        };
        let channel = memoh_proto::client::tcp_channel(&addr).map_err(|e| AgentError::Bot {
            bot: bot.to_string(),
            status: tonic::Status::unavailable(format!("bad address {addr}: {e}")),
        })?;
        let mut client = ContainerClient::with_auth(channel, route.token.as_deref(), None)
            .map_err(|status| AgentError::Bot {
                bot: bot.to_string(),
                status,
            })?;
        if let Some(d) = self.unary_deadline {
            client = client.unary_deadline(d);
        }
        map.insert(
            bot.to_string(),
            Entry {
                route: route.clone(),
                client: client.clone(),
            },
        );
        Ok(client)
    }

    /// Drops the bot's channel.
    pub fn evict(&self, bot: &str) {
        let mut map = lock(&self.entries);
        if map.remove(bot).is_some() {
            debug!(bot, "evicted channel");
            crate::metrics::global().eviction(crate::metrics::Eviction::Explicit);
        }
    }

    /// Drops the bot's channel if it still serves `route` (a failed call evicts only the
    /// channel it used, not a newer one).
    pub fn evict_if(&self, bot: &str, route: &Route) {
        let mut map = lock(&self.entries);
        if map.get(bot).is_some_and(|e| &e.route == route) {
            map.remove(bot);
            debug!(bot, "evicted failing channel");
            crate::metrics::global().eviction(crate::metrics::Eviction::Failure);
        }
    }

    /// Number of cached channels.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether no channel is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ip: &str, generation: &str) -> Route {
        Route {
            ip: ip.parse().unwrap(),
            token: None,
            generation: generation.into(),
        }
    }

    #[tokio::test]
    async fn reuses_and_evicts() {
        let pool = Pool::new(Duration::from_secs(1));
        let a = route("10.0.0.2", "g1");
        pool.client("a", &a).unwrap();
        pool.client("a", &a).unwrap();
        assert_eq!(pool.len(), 1);
        // IP change and container replacement each replace the entry.
        pool.client("a", &route("10.0.0.3", "g1")).unwrap();
        assert_eq!(pool.len(), 1);
        pool.client("a", &route("10.0.0.3", "g2")).unwrap();
        // A stale failure does not evict the newer channel.
        pool.evict_if("a", &a);
        assert_eq!(pool.len(), 1);
        pool.evict_if("a", &route("10.0.0.3", "g2"));
        assert!(pool.is_empty());
        pool.client("b", &a).unwrap();
        pool.evict("b");
        assert!(pool.is_empty());
    }
}
