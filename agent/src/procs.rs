//! Durable processes of `memoh.process.v1.ProcessService` as people and tools see them: signal
//! names, the `ps` table, the JSON objects of `ps --json` and the MCP tools, and the end of a
//! process as an exit status and one line. Pure functions, shared by the CLI and the MCP tools.

use memoh_proto::pb::process::{ProcessInfo, State};
use serde_json::{json, Value};

/// The Linux signals by number (x86-64 and arm64 agree on 1..=31), without the `SIG` prefix.
const SIGNALS: [(i32, &str); 31] = [
    (1, "HUP"),
    (2, "INT"),
    (3, "QUIT"),
    (4, "ILL"),
    (5, "TRAP"),
    (6, "ABRT"),
    (7, "BUS"),
    (8, "FPE"),
    (9, "KILL"),
    (10, "USR1"),
    (11, "SEGV"),
    (12, "USR2"),
    (13, "PIPE"),
    (14, "ALRM"),
    (15, "TERM"),
    (16, "STKFLT"),
    (17, "CHLD"),
    (18, "CONT"),
    (19, "STOP"),
    (20, "TSTP"),
    (21, "TTIN"),
    (22, "TTOU"),
    (23, "URG"),
    (24, "XCPU"),
    (25, "XFSZ"),
    (26, "VTALRM"),
    (27, "PROF"),
    (28, "WINCH"),
    (29, "IO"),
    (30, "PWR"),
    (31, "SYS"),
];

/// The highest signal number Linux knows (`SIGRTMAX`).
pub const MAX_SIGNAL: i32 = 64;

/// A signal as a person writes it: `TERM`, `SIGTERM`, `sigterm` or `15` (1 to 64).
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty signal name".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.parse::<i32>() {
            Ok(n) if (1..=MAX_SIGNAL).contains(&n) => Ok(n),
            _ => Err(format!(
                "signal number {t} is out of range (1 to {MAX_SIGNAL})"
            )),
        };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if name == "IOT" {
        return Ok(6);
    }
    if name == "POLL" {
        return Ok(29);
    }
    SIGNALS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(num, _)| *num)
        .ok_or_else(|| {
            format!("unknown signal {t:?} (use a name such as TERM, KILL, INT, HUP or a number)")
        })
}

/// `SIGTERM` for 15; `SIGRTMIN+N` style numbers and unknown ones give `None`.
pub fn signal_name(n: i32) -> Option<String> {
    SIGNALS
        .iter()
        .find(|(num, _)| *num == n)
        .map(|(_, name)| format!("SIG{name}"))
}

/// The state as a word: `running`, `exited`, `signaled` (`unknown` for anything else).
pub fn state_word(info: &ProcessInfo) -> &'static str {
    match State::try_from(info.state) {
        Ok(State::Running) => "running",
        Ok(State::Exited) => "exited",
        Ok(State::Signaled) => "signaled",
        _ => "unknown",
    }
}

/// Whether the process has ended.
pub fn has_ended(info: &ProcessInfo) -> bool {
    matches!(
        State::try_from(info.state),
        Ok(State::Exited) | Ok(State::Signaled)
    )
}

/// The exit status a shell reports for the ended process: its code, or 128+N after signal N.
pub fn exit_status(info: &ProcessInfo) -> u8 {
    if matches!(State::try_from(info.state), Ok(State::Signaled)) && info.signal > 0 {
        return (128 + info.signal).clamp(0, 255) as u8;
    }
    (info.exit_code & 0xff) as u8
}

/// How the process ended, in one line: `exited with code 3`, `killed by signal 15 (SIGTERM)`
/// (with `after its timeout` when the timeout's kill ended it).
pub fn end_line(info: &ProcessInfo) -> String {
    match State::try_from(info.state) {
        Ok(State::Signaled) => {
            let name = signal_name(info.signal).unwrap_or_else(|| "unknown".into());
            let timeout = if info.timed_out {
                " after its timeout"
            } else {
                ""
            };
            format!("killed by signal {} ({name}){timeout}", info.signal)
        }
        Ok(State::Exited) => format!("exited with code {}", info.exit_code),
        _ => "still running".into(),
    }
}

/// Unix milliseconds as `2026-12-07T13:44:05Z`.
fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// The JSON object of one process (`ps --json`, `process_list`): always the same keys; what
/// is not known yet (exit code, signal, resource use of a running process) is `null`.
pub fn info_json(p: &ProcessInfo) -> Value {
    let ended = has_ended(p);
    let usage = p.usage.filter(|_| ended);
    json!({
        "id": p.id,
        "tag": p.tag,
        "command": p.command,
        "pid": p.pid,
        "state": state_word(p),
        "exit_code": ended.then_some(p.exit_code),
        "signal": (ended && p.signal > 0).then_some(p.signal),
        "signal_name": (ended && p.signal > 0).then(|| signal_name(p.signal)).flatten(),
        "timed_out": p.timed_out,
        "pty": p.pty,
        "started_at": utc(p.started_at_ms),
        "started_at_ms": p.started_at_ms,
        "ended_at_ms": (p.ended_at_ms > 0).then_some(p.ended_at_ms),
        "user_cpu_ms": usage.map(|u| u.user_cpu_micros / 1000),
        "system_cpu_ms": usage.map(|u| u.system_cpu_micros / 1000),
        "max_rss_bytes": usage.map(|u| u.max_rss_bytes),
        "stdout_bytes": p.stdout_bytes,
        "stderr_bytes": p.stderr_bytes,
        "stdout_first_offset": p.stdout_first_offset,
        "stderr_first_offset": p.stderr_first_offset,
    })
}

/// `12.3M`-style sizes for the table.
fn short_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// The `ps` table: a header and one line per process, columns ID, TAG, PID, STATE, EXIT,
/// STARTED, CPU, MAXRSS, COMMAND (a dash where a value is not known yet; COMMAND on one line).
pub fn table(procs: &[ProcessInfo]) -> String {
    let header = [
        "ID", "TAG", "PID", "STATE", "EXIT", "STARTED", "CPU", "MAXRSS", "COMMAND",
    ];
    let mut rows: Vec<[String; 9]> = vec![header.map(str::to_string)];
    for p in procs {
        let ended = has_ended(p);
        let usage = p.usage.filter(|_| ended);
        rows.push([
            p.id.clone(),
            if p.tag.is_empty() {
                "-".into()
            } else {
                p.tag.clone()
            },
            p.pid.to_string(),
            state_word(p).into(),
            if ended {
                p.exit_code.to_string()
            } else {
                "-".into()
            },
            utc(p.started_at_ms),
            usage.map_or("-".into(), |u| {
                format!(
                    "{:.2}s",
                    (u.user_cpu_micros + u.system_cpu_micros) as f64 / 1e6
                )
            }),
            usage.map_or("-".into(), |u| short_size(u.max_rss_bytes)),
            p.command.replace(['\n', '\r', '\t'], " "),
        ]);
    }
    let mut widths = [0usize; 9];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i == r.len() - 1 {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use memoh_proto::pb::process::ResourceUsage;

    #[test]
    fn signals_by_name_prefix_and_number() {
        for s in ["TERM", "SIGTERM", "sigterm", "term", "15", " 15 "] {
            assert_eq!(parse_signal(s), Ok(15), "{s}");
        }
        assert_eq!(parse_signal("KILL"), Ok(9));
        assert_eq!(parse_signal("SIGINT"), Ok(2));
        assert_eq!(parse_signal("hup"), Ok(1));
        assert_eq!(parse_signal("USR1"), Ok(10));
        assert_eq!(parse_signal("IOT"), Ok(6));
        assert_eq!(parse_signal("64"), Ok(64));
        for bad in [
            "",
            "0",
            "65",
            "-1",
            "SIG",
            "TERMINATE",
            "SIGFOO",
            "15x",
            "99999999999",
        ] {
            let e = parse_signal(bad).unwrap_err();
            assert!(!e.contains('\n') && !e.is_empty(), "{bad}: {e}");
        }
        assert!(parse_signal("FOO").unwrap_err().contains("unknown signal"));
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(15).as_deref(), Some("SIGTERM"));
        assert_eq!(signal_name(9).as_deref(), Some("SIGKILL"));
        assert_eq!(signal_name(40), None);
        for (n, name) in SIGNALS {
            assert_eq!(parse_signal(name), Ok(n));
            assert_eq!(parse_signal(&signal_name(n).unwrap()), Ok(n));
        }
    }

    fn running() -> ProcessInfo {
        ProcessInfo {
            id: "p1".into(),
            tag: "web".into(),
            command: "python3 -m http.server\n8000".into(),
            pid: 42,
            started_at_ms: 1_796_651_045_000,
            state: State::Running as i32,
            stdout_bytes: 10,
            ..Default::default()
        }
    }

    fn killed() -> ProcessInfo {
        ProcessInfo {
            id: "p2".into(),
            command: "sleep 100".into(),
            pid: 43,
            started_at_ms: 1_796_651_045_000,
            ended_at_ms: 1_796_651_046_000,
            state: State::Signaled as i32,
            exit_code: 143,
            signal: 15,
            usage: Some(ResourceUsage {
                user_cpu_micros: 1_500_000,
                system_cpu_micros: 250_000,
                max_rss_bytes: 3 * 1024 * 1024,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn end_of_a_process() {
        let k = killed();
        assert_eq!(exit_status(&k), 143);
        assert_eq!(end_line(&k), "killed by signal 15 (SIGTERM)");
        let mut t = k.clone();
        t.signal = 9;
        t.exit_code = 137;
        t.timed_out = true;
        assert_eq!(exit_status(&t), 137);
        assert_eq!(
            end_line(&t),
            "killed by signal 9 (SIGKILL) after its timeout"
        );
        let e = ProcessInfo {
            state: State::Exited as i32,
            exit_code: 3,
            ..Default::default()
        };
        assert_eq!(exit_status(&e), 3);
        assert_eq!(end_line(&e), "exited with code 3");
        assert!(has_ended(&e) && !has_ended(&running()));
        assert_eq!(end_line(&running()), "still running");
    }

    #[test]
    fn json_keys_are_stable_whatever_the_state() {
        let a = info_json(&running());
        let b = info_json(&killed());
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&a), keys(&b));
        for k in [
            "id",
            "tag",
            "command",
            "pid",
            "state",
            "exit_code",
            "signal",
            "signal_name",
            "started_at",
            "user_cpu_ms",
            "max_rss_bytes",
            "stdout_bytes",
        ] {
            assert!(a.get(k).is_some(), "{k} missing");
        }
        assert_eq!(a["state"], "running");
        assert!(a["exit_code"].is_null() && a["signal"].is_null() && a["max_rss_bytes"].is_null());
        assert_eq!(b["state"], "signaled");
        assert_eq!(b["exit_code"], 143);
        assert_eq!(b["signal"], 15);
        assert_eq!(b["signal_name"], "SIGTERM");
        assert_eq!(b["user_cpu_ms"], 1500);
        assert_eq!(b["max_rss_bytes"], 3 * 1024 * 1024);
        assert_eq!(a["started_at"], "2026-12-07T13:44:05Z");
    }

    #[test]
    fn table_columns_line_up() {
        let t = table(&[running(), killed()]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let cols: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            cols,
            ["ID", "TAG", "PID", "STATE", "EXIT", "STARTED", "CPU", "MAXRSS", "COMMAND"]
        );
        // Every column starts where its header does.
        for h in [
            "PID", "STATE", "EXIT", "STARTED", "CPU", "MAXRSS", "COMMAND",
        ] {
            let at = lines[0].find(h).unwrap();
            for l in &lines[1..] {
                assert_ne!(l.as_bytes()[at], b' ', "{h} in {l:?}");
                assert_eq!(l.as_bytes()[at - 1], b' ', "{h} in {l:?}");
            }
        }
        assert!(lines[1].contains(" web ") && lines[1].contains(" running "));
        assert!(lines[1].ends_with("python3 -m http.server 8000"), "{t}");
        let k: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            k,
            [
                "p2",
                "-",
                "43",
                "signaled",
                "143",
                "2026-12-07T13:44:05Z",
                "1.75s",
                "3.0M",
                "sleep",
                "100"
            ]
        );
        assert_eq!(table(&[]).lines().count(), 1);
    }
}
