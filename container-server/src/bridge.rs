//! `bridgepb.ContainerService` (WIRE-BRIDGE.md): today's Memoh protocol, served by the same
//! [`Service`] as `mcpcontainer.ContainerService`.
//!
//! The `bridgepb` messages are a superset of the `mcpcontainer` ones under a new package name.
//! Every method the two share runs the `mcpcontainer` handler's code: this module maps the
//! shared fields across, gives the new fields their documented behaviour, and answers
//! UNIMPLEMENTED, naming the method, for what the server does not build yet (Terminal,
//! WatchDir). Exec's PTY mode, `clean_env`/`unset_env` and its section 3 conventions are in
//! [`crate::bridge_exec`]; Tunnel and ReverseHTTP, which have no `mcpcontainer` counterpart,
//! live in [`crate::tunnel`] and [`crate::reverse_http`].
//!
//! Files: what WIRE-BRIDGE.md section 3 changed for bridge callers without a new field runs the
//! shared code with [`Caller::Bridge`]: ReadFile gives raw lines (no numbers, no cut, up to
//! 2000), WriteFile and WriteRaw replace the target (symlink included, not followed) with a
//! 0600 file from a `.<name>.tmp-*` temp beside it, new directories 0750; ListDir runs
//! [`crate::listing`] (`max_entries`, `collapse_threshold` and `summary`, bytewise order),
//! then [`list_dir_page`]; ReadRawNoFollow and WriteRawNoFollow are [`crate::anchored`].

use futures::StreamExt;
use memoh_proto::pb::bridgepb as bp;
use memoh_proto::pb::mcpcontainer as mp;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ServerError;
use crate::fs::Caller;
use crate::listing::{ListSpec, Listed};
use crate::service::{blocking, BoxStream, Service};
use crate::transfer::Piece;
use crate::window::WindowSpec;
use bp::container_service_server::ContainerService as Bridge;
use mp::container_service_server::ContainerService as Mcp;

/// ListDir's page-size cap: a `limit` above it means this many (WIRE-BRIDGE.md section 3).
pub const LIST_DIR_MAX_LIMIT: usize = 200;

fn unimplemented(what: &str) -> Status {
    ServerError::Unimplemented(format!(
        "{what} is not implemented by this server (bridgepb.ContainerService)"
    ))
    .into()
}

fn file_entry(e: mp::FileEntry) -> bp::FileEntry {
    bp::FileEntry {
        path: e.path,
        is_dir: e.is_dir,
        size: e.size,
        mode: e.mode,
        mod_time: e.mod_time,
        summary: String::new(),
    }
}

fn listed_entry(l: Listed) -> bp::FileEntry {
    bp::FileEntry {
        path: l.entry.path,
        is_dir: l.entry.is_dir,
        size: l.entry.size,
        mode: l.entry.mode,
        mod_time: l.entry.mod_time,
        summary: l.summary,
    }
}

/// The page of a listing a bridge caller asked for (WIRE-BRIDGE.md section 3, ListDir), after
/// `max_entries` and the collapse ([`crate::listing`]): `total_count` counts every entry;
/// `offset` < 0 means 0; `limit` <= 0 means all, above [`LIST_DIR_MAX_LIMIT`] means that cap;
/// `truncated` says entries remain past the page.
pub fn list_dir_page(
    mut entries: Vec<bp::FileEntry>,
    offset: i32,
    limit: i32,
) -> bp::ListDirResponse {
    let total = entries.len();
    let offset = usize::try_from(offset.max(0)).unwrap_or(0).min(total);
    let limit = match usize::try_from(limit) {
        Ok(0) | Err(_) => total,
        Ok(l) => l.min(LIST_DIR_MAX_LIMIT),
    };
    entries.drain(..offset);
    entries.truncate(limit);
    let truncated = offset + entries.len() < total;
    bp::ListDirResponse {
        entries,
        total_count: i32::try_from(total).unwrap_or(i32::MAX),
        truncated,
    }
}

fn exec_input(m: bp::ExecInput) -> mp::ExecInput {
    // `resize` only matters to PTY exec; in pipe mode it is ignored, as the bridge does.
    mp::ExecInput {
        command: m.command,
        work_dir: m.work_dir,
        env: m.env,
        timeout_seconds: m.timeout_seconds,
        stdin_data: m.stdin_data,
    }
}

fn exec_output(m: mp::ExecOutput) -> bp::ExecOutput {
    bp::ExecOutput {
        stream: m.stream,
        data: m.data,
        exit_code: m.exit_code,
        resource_usage: m.resource_usage.map(|u| bp::ResourceUsage {
            user_cpu_micros: u.user_cpu_micros,
            system_cpu_micros: u.system_cpu_micros,
            max_rss_bytes: u.max_rss_bytes,
        }),
    }
}

#[tonic::async_trait]
impl Bridge for Service {
    async fn read_file(
        &self,
        req: Request<bp::ReadFileRequest>,
    ) -> Result<Response<bp::ReadFileResponse>, Status> {
        let r = req.into_inner();
        let spec = WindowSpec::raw_from_request(r.line_offset, r.n_lines);
        let w = crate::convert::read_file_response(self.read_file_window(&r.path, spec).await?);
        Ok(Response::new(bp::ReadFileResponse {
            content: w.content,
            total_lines: w.total_lines,
            binary: w.binary,
        }))
    }

    async fn write_file(
        &self,
        req: Request<bp::WriteFileRequest>,
    ) -> Result<Response<bp::WriteFileResponse>, Status> {
        let r = req.into_inner();
        self.write_file_as(&r.path, r.content, Caller::Bridge)
            .await?;
        Ok(Response::new(bp::WriteFileResponse {}))
    }

    async fn list_dir(
        &self,
        req: Request<bp::ListDirRequest>,
    ) -> Result<Response<bp::ListDirResponse>, Status> {
        let r = req.into_inner();
        let path = self.resolver().resolve_or_data_dir("path", &r.path)?;
        let spec = ListSpec {
            recursive: r.recursive,
            collapse_threshold: r.collapse_threshold,
            max_entries: r.max_entries,
        };
        let listed = blocking(move || crate::listing::list(&path, spec)).await?;
        let entries = listed.into_iter().map(listed_entry).collect();
        Ok(Response::new(list_dir_page(entries, r.offset, r.limit)))
    }

    async fn stat(
        &self,
        req: Request<bp::StatRequest>,
    ) -> Result<Response<bp::StatResponse>, Status> {
        let m = mp::StatRequest {
            path: req.into_inner().path,
        };
        let s = Mcp::stat(self, Request::new(m)).await?.into_inner();
        Ok(Response::new(bp::StatResponse {
            entry: s.entry.map(file_entry),
        }))
    }

    async fn mkdir(
        &self,
        req: Request<bp::MkdirRequest>,
    ) -> Result<Response<bp::MkdirResponse>, Status> {
        self.mkdir_as(&req.into_inner().path, Caller::Bridge)
            .await?;
        Ok(Response::new(bp::MkdirResponse {}))
    }

    async fn rename(
        &self,
        req: Request<bp::RenameRequest>,
    ) -> Result<Response<bp::RenameResponse>, Status> {
        let r = req.into_inner();
        self.rename_as(&r.old_path, &r.new_path, Caller::Bridge)
            .await?;
        Ok(Response::new(bp::RenameResponse {}))
    }

    type ExecStream = BoxStream<bp::ExecOutput>;

    async fn exec(
        &self,
        req: Request<Streaming<bp::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut inbound = req.into_inner();
        // The first message decides what runs: a terminal, or pipes with the bridge's
        // conventions (see `bridge_exec`).
        let first = match inbound.next().await {
            Some(Ok(m)) if m.pty => {
                let out = crate::bridge_exec::pty(self, m, inbound).await?;
                return Ok(Response::new(Box::pin(out.map(|r| r.map(exec_output)))));
            }
            other => other,
        };
        let adjust =
            crate::bridge_exec::pipe_conventions(first.as_ref().and_then(|r| r.as_ref().ok()));
        let all = futures::stream::iter(first)
            .chain(inbound)
            .map(|m| m.map(exec_input));
        let out = self.exec_stream_with(Box::pin(all), adjust).await?;
        Ok(Response::new(Box::pin(out.map(|r| r.map(exec_output)))))
    }

    type ReadRawStream = BoxStream<bp::DataChunk>;

    async fn read_raw(
        &self,
        req: Request<bp::ReadRawRequest>,
    ) -> Result<Response<Self::ReadRawStream>, Status> {
        let m = mp::ReadRawRequest {
            path: req.into_inner().path,
        };
        let s = Mcp::read_raw(self, Request::new(m)).await?.into_inner();
        let s = s.map(|r| r.map(|c| bp::DataChunk { data: c.data }));
        Ok(Response::new(Box::pin(s)))
    }

    async fn write_raw(
        &self,
        req: Request<Streaming<bp::WriteRawChunk>>,
    ) -> Result<Response<bp::WriteRawResponse>, Status> {
        let chunks = req.into_inner().map(|r| {
            r.map(|c| mp::WriteRawChunk {
                path: c.path,
                data: c.data,
                abort: c.abort,
            })
        });
        let w = self
            .write_raw_stream(Box::pin(chunks), Caller::Bridge)
            .await?;
        Ok(Response::new(bp::WriteRawResponse {
            bytes_written: w.bytes_written,
        }))
    }

    async fn delete_file(
        &self,
        req: Request<bp::DeleteFileRequest>,
    ) -> Result<Response<bp::DeleteFileResponse>, Status> {
        let r = req.into_inner();
        let m = mp::DeleteFileRequest {
            path: r.path,
            recursive: r.recursive,
        };
        Mcp::delete_file(self, Request::new(m)).await?;
        Ok(Response::new(bp::DeleteFileResponse {}))
    }

    type TunnelStream = BoxStream<bp::TunnelFrame>;

    async fn tunnel(
        &self,
        req: Request<Streaming<bp::TunnelFrame>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        crate::tunnel::open(Box::pin(req.into_inner()))
            .await
            .map(Response::new)
    }

    type ReverseHTTPStream = BoxStream<bp::ReverseHttpFrame>;

    async fn reverse_http(
        &self,
        req: Request<Streaming<bp::ReverseHttpFrame>>,
    ) -> Result<Response<Self::ReverseHTTPStream>, Status> {
        let route = crate::reverse_http::route_of(req.metadata())?;
        let inbound = Box::pin(req.into_inner());
        Ok(Response::new(self.reverse_http().attach(route, inbound)))
    }

    type ReadRawNoFollowStream = BoxStream<bp::DataChunk>;

    async fn read_raw_no_follow(
        &self,
        req: Request<bp::ReadRawNoFollowRequest>,
    ) -> Result<Response<Self::ReadRawNoFollowStream>, Status> {
        let r = req.into_inner();
        let s = crate::anchored::read(&r.root, &r.relative_path).await?;
        let s = s.map(|r| r.map(|c| bp::DataChunk { data: c.data }));
        Ok(Response::new(Box::pin(s)))
    }

    async fn write_raw_no_follow(
        &self,
        req: Request<Streaming<bp::WriteRawNoFollowChunk>>,
    ) -> Result<Response<bp::WriteRawResponse>, Status> {
        let chunks = req.into_inner().map(|r| {
            r.map(|c| crate::anchored::Chunk {
                root: c.root,
                relative_path: c.relative_path,
                piece: Piece {
                    data: c.data,
                    abort: c.abort,
                },
            })
        });
        let written = crate::anchored::write(Box::pin(chunks), self.kill()).await?;
        Ok(Response::new(bp::WriteRawResponse {
            bytes_written: i64::try_from(written).unwrap_or(i64::MAX),
        }))
    }

    type TerminalStream = BoxStream<bp::TerminalServer>;

    async fn terminal(
        &self,
        _req: Request<Streaming<bp::TerminalClient>>,
    ) -> Result<Response<Self::TerminalStream>, Status> {
        Err(unimplemented("Terminal"))
    }

    type WatchDirStream = BoxStream<bp::WatchDirEvent>;

    async fn watch_dir(
        &self,
        _req: Request<bp::WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        Err(unimplemented("WatchDir"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<bp::FileEntry> {
        (0..n)
            .map(|i| bp::FileEntry {
                path: format!("f{i:03}"),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn list_dir_pages() {
        // (count, offset, limit) -> (first path, returned, total, truncated)
        let cases = [
            (5, 0, 0, Some("f000"), 5, 5, false),
            (5, -3, 2, Some("f000"), 2, 5, true),
            (5, 3, 2, Some("f003"), 2, 5, false),
            (5, 9, 2, None, 0, 5, false),
            (300, 0, 1000, Some("f000"), 200, 300, true),
            (300, 150, i32::MAX, Some("f150"), 150, 300, false),
            (5, i32::MAX, 1, None, 0, 5, false),
        ];
        for (n, off, lim, first, ret, total, trunc) in cases {
            let r = list_dir_page(entries(n), off, lim);
            let case = (n, off, lim);
            assert_eq!(
                r.entries.first().map(|e| e.path.as_str()),
                first,
                "{case:?}"
            );
            assert_eq!(r.entries.len(), ret, "{case:?}");
            assert_eq!(r.total_count, total, "{case:?}");
            assert_eq!(r.truncated, trunc, "{case:?}");
        }
    }
}
