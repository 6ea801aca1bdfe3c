//! `bot stats`: what bots use against their limits, once or refreshed every two seconds.
//!
//! CPU is shown as a share of one CPU over the time between two samples (the first look takes
//! two, one second apart). Memory, processes and the writable layer are the bot's figures now;
//! the writable layer is measured for one bot and taken from the agent's last measurement
//! (about once a minute) for all bots.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use memoh_proto::pb::agent as pb;
use pb::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::{status_err, CliError};
use crate::bots::limits::format_size;

/// Time between refreshes with `--watch`.
const REFRESH: Duration = Duration::from_secs(2);
/// Time between the two samples of a first look.
const FIRST_GAP: Duration = Duration::from_secs(1);

/// One look at the bots.
struct Sample {
    at: Instant,
    bots: Vec<pb::BotInfo>,
}

async fn sample(
    socket: &Path,
    c: &mut AgentServiceClient<Channel>,
    bot: Option<&str>,
) -> Result<Sample, CliError> {
    let e = |s| status_err(socket, s);
    let bots = match bot {
        Some(b) => vec![c
            .inspect_bot(pb::BotRef {
                bot_id: b.to_string(),
            })
            .await
            .map_err(e)?
            .into_inner()],
        None => {
            c.list_bots(pb::ListBotsRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .bots
        }
    };
    Ok(Sample {
        at: Instant::now(),
        bots,
    })
}

/// CPU use between two samples, in percent of one CPU, per bot.
fn cpu_percent(before: &Sample, now: &Sample) -> HashMap<String, f64> {
    let secs = now.at.duration_since(before.at).as_secs_f64();
    let old: HashMap<&str, u64> = before
        .bots
        .iter()
        .filter_map(|b| Some((b.bot_id.as_str(), b.usage.as_ref()?.cpu_nanos?)))
        .collect();
    now.bots
        .iter()
        .filter_map(|b| {
            let n = b.usage.as_ref()?.cpu_nanos?;
            let o = *old.get(b.bot_id.as_str())?;
            (secs > 0.0 && n >= o).then(|| (b.bot_id.clone(), (n - o) as f64 / 1e9 / secs * 100.0))
        })
        .collect()
}

/// The table of one refresh.
fn table(bots: &[pb::BotInfo], cpu: &HashMap<String, f64>) -> String {
    let mut out = format!(
        "{:<24} {:<8} {:>7} {:>21} {:>6} {:>11} {:>9} {:>4}\n",
        "BOT", "STATUS", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS", "DISK", "OOM"
    );
    for b in bots {
        let u = b.usage.unwrap_or_default();
        let l = b.limits.unwrap_or_default();
        let dash = || "-".to_string();
        let size = |v: Option<u64>| v.map(format_size).unwrap_or_else(dash);
        let limit = |v: u64| {
            if v == 0 {
                "unlimited".to_string()
            } else {
                format_size(v)
            }
        };
        let mem = format!("{} / {}", size(u.memory_bytes), limit(l.memory_bytes));
        let mem_pct = match (u.memory_bytes, l.memory_bytes) {
            (Some(m), lim) if lim > 0 => format!("{:.1}", m as f64 * 100.0 / lim as f64),
            _ => dash(),
        };
        let cpu = cpu
            .get(&b.bot_id)
            .map(|p| format!("{p:.1}"))
            .unwrap_or_else(dash);
        let pids = match (u.pids, l.pids) {
            (Some(p), 0) => p.to_string(),
            (Some(p), lim) => format!("{p} / {lim}"),
            _ => dash(),
        };
        out.push_str(&format!(
            "{:<24} {:<8} {:>7} {:>21} {:>6} {:>11} {:>9} {:>4}\n",
            b.bot_id,
            b.status,
            cpu,
            mem,
            mem_pct,
            pids,
            size(u.disk_bytes),
            u.oom_kills.map(|k| k.to_string()).unwrap_or_else(dash),
        ));
    }
    out
}

fn json(bots: &[pb::BotInfo], cpu: &HashMap<String, f64>) -> String {
    let v: Vec<serde_json::Value> = bots
        .iter()
        .map(|b| {
            let mut j = super::show::bot_json(b);
            j["cpu_percent"] = serde_json::json!(cpu.get(&b.bot_id));
            j
        })
        .collect();
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Runs `bot stats`.
pub(super) async fn stats(
    socket: &Path,
    c: &mut AgentServiceClient<Channel>,
    bot: Option<String>,
    as_json: bool,
    watch: bool,
) -> Result<u8, CliError> {
    let mut before = sample(socket, c, bot.as_deref()).await?;
    tokio::time::sleep(FIRST_GAP).await;
    let clear = watch && std::io::stdout().is_terminal();
    loop {
        let now = sample(socket, c, bot.as_deref()).await?;
        let cpu = cpu_percent(&before, &now);
        let text = if as_json {
            json(&now.bots, &cpu)
        } else {
            table(&now.bots, &cpu)
        };
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", text.trim_end());
        if !watch {
            return Ok(0);
        }
        before = now;
        tokio::time::sleep(REFRESH).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bot(id: &str, cpu_nanos: u64, memory: u64, limit: u64) -> pb::BotInfo {
        pb::BotInfo {
            bot_id: id.into(),
            status: "running".into(),
            limits: Some(pb::BotLimits {
                memory_bytes: limit,
                millicpus: 500,
                pids: 128,
                disk_bytes: 0,
            }),
            usage: Some(pb::BotUsage {
                memory_bytes: Some(memory),
                cpu_nanos: Some(cpu_nanos),
                pids: Some(5),
                oom_kills: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cpu_is_the_share_of_one_cpu_between_samples() {
        let t = Instant::now();
        let before = Sample {
            at: t,
            bots: vec![bot("a", 1_000_000_000, 0, 0), bot("gone", 5, 0, 0)],
        };
        let now = Sample {
            at: t + Duration::from_secs(2),
            bots: vec![bot("a", 2_000_000_000, 0, 0), bot("new", 9, 0, 0)],
        };
        let cpu = cpu_percent(&before, &now);
        assert!((cpu["a"] - 50.0).abs() < 1e-9, "{cpu:?}");
        assert!(!cpu.contains_key("new") && !cpu.contains_key("gone"));
    }

    #[test]
    fn the_table_shows_usage_against_limits() {
        let cpu = HashMap::from([("a".to_string(), 12.5)]);
        let t = table(
            &[bot("a", 0, 64 << 20, 256 << 20), bot("b", 0, 1 << 20, 0)],
            &cpu,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("BOT"), "{t}");
        assert!(
            lines[1].contains("12.5") && lines[1].contains("64MiB / 256MiB"),
            "{t}"
        );
        assert!(
            lines[1].contains("25.0") && lines[1].contains("5 / 128"),
            "{t}"
        );
        assert!(lines[2].contains("1MiB / unlimited"), "{t}");
        let j = json(&[bot("a", 0, 64 << 20, 256 << 20)], &cpu);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v[0]["oom_kills"], 1);
        assert_eq!(v[0]["usage"]["memory"], 64 << 20);
        assert_eq!(v[0]["limits"]["memory"], 256 << 20);
        assert_eq!(v[0]["limits"]["cpus"], 0.5);
        assert_eq!(v[0]["limits"]["disk"], serde_json::Value::Null);
        assert_eq!(v[0]["cpu_percent"], 12.5);
    }
}
