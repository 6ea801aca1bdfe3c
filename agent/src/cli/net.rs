//! `net` (cleanup): the host's network as the agent's containerd namespace left it.

use std::path::Path;

use clap::Subcommand;
use memoh_proto::pb::agent as pb;

use super::{control, status_err, CliError};

/// Network subcommands.
#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// Remove what this agent's namespace left behind and no existing bot uses: network
    /// namespaces, address reservations, and its nftables tables and iptables rules when no
    /// bot is attached.
    Cleanup,
}

/// Runs a net subcommand: one line per thing removed, then a summary.
pub async fn net(socket: &Path, cmd: NetCmd) -> Result<u8, CliError> {
    match cmd {
        NetCmd::Cleanup => {
            let removed = control(socket)
                .await
                .net_cleanup(pb::NetCleanupRequest {})
                .await
                .map_err(|s| status_err(socket, s))?
                .into_inner()
                .removed;
            for r in &removed {
                println!("removed {r}");
            }
            println!("{}", summary(removed.len()));
            Ok(0)
        }
    }
}

/// The last line of `net cleanup`.
fn summary(n: usize) -> String {
    match n {
        0 => "nothing to clean up".to_string(),
        1 => "removed 1 leftover".to_string(),
        n => format!("removed {n} leftovers"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        assert_eq!(summary(0), "nothing to clean up");
        assert_eq!(summary(1), "removed 1 leftover");
        assert_eq!(summary(3), "removed 3 leftovers");
    }
}
