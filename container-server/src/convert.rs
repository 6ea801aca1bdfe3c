//! Conversions between the wire types and the server's domain types. The only place both meet.

use memoh_proto::pb::mcpcontainer as pb;

use crate::exec::ExecEvent;
use crate::fs::Entry;
use crate::reaper::Usage;
use crate::window::Window;

/// A domain entry as a wire `FileEntry`.
pub fn file_entry(e: Entry) -> pb::FileEntry {
    pb::FileEntry {
        path: e.path,
        is_dir: e.is_dir,
        size: e.size,
        mode: e.mode,
        mod_time: e.mod_time,
    }
}

/// A window as the `ReadFile` response. Counts saturate at `i32::MAX`.
pub fn read_file_response(w: Window) -> pb::ReadFileResponse {
    pb::ReadFileResponse {
        content: w.content,
        total_lines: i32::try_from(w.total_lines).unwrap_or(i32::MAX),
        binary: w.binary,
    }
}

/// One exec event as an `ExecOutput` message.
pub fn exec_output(ev: ExecEvent) -> pb::ExecOutput {
    use pb::exec_output::Stream;
    match ev {
        ExecEvent::Stdout(data) => pb::ExecOutput {
            stream: Stream::Stdout as i32,
            data,
            exit_code: 0,
            resource_usage: None,
        },
        ExecEvent::Stderr(data) => pb::ExecOutput {
            stream: Stream::Stderr as i32,
            data,
            exit_code: 0,
            resource_usage: None,
        },
        ExecEvent::Exit(code, usage) => pb::ExecOutput {
            stream: Stream::Exit as i32,
            data: Default::default(),
            exit_code: code,
            resource_usage: usage.map(resource_usage),
        },
    }
}

/// The reaper's resource use in wire form (microseconds, bytes).
pub fn resource_usage(u: Usage) -> pb::ResourceUsage {
    pb::ResourceUsage {
        user_cpu_micros: u.user.as_micros().try_into().unwrap_or(u64::MAX),
        system_cpu_micros: u.system.as_micros().try_into().unwrap_or(u64::MAX),
        max_rss_bytes: u.max_rss_bytes,
    }
}
