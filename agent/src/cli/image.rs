//! `image` (import, pull, ls).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use futures::StreamExt;
use memoh_proto::pb::agent as pb;

use super::{control, status_err, CliError};

/// Image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import an OCI or Docker archive.
    Import {
        /// The archive.
        file: PathBuf,
        /// Name for an archive that carries none.
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull from a registry.
    Pull {
        /// Image reference.
        reference: String,
        /// Allow plain HTTP to this registry.
        #[arg(long)]
        insecure: bool,
    },
    /// List images.
    Ls,
}

/// Runs an image subcommand, with a progress line on a terminal.
pub async fn image(socket: &Path, cmd: ImageCmd) -> Result<u8, CliError> {
    let mut c = control(socket).await;
    let e = |s| status_err(socket, s);
    let stream = match cmd {
        ImageCmd::Ls => {
            let images = c
                .list_images(pb::ListImagesRequest {})
                .await
                .map_err(e)?
                .into_inner()
                .images;
            println!("{:<56} DIGEST", "NAME");
            for i in images {
                println!("{:<56} {}", i.name, i.digest);
            }
            return Ok(0);
        }
        ImageCmd::Import { file, name } => {
            let abs = std::fs::canonicalize(&file)
                .map_err(|err| CliError::new(format!("{}: {err}", file.display())))?;
            c.import_image(pb::ImportImageRequest {
                path: abs.to_string_lossy().into_owned(),
                name: name.unwrap_or_default(),
            })
            .await
            .map_err(e)?
            .into_inner()
        }
        ImageCmd::Pull {
            reference,
            insecure,
        } => c
            .pull_image(pb::PullImageRequest {
                reference,
                insecure,
            })
            .await
            .map_err(e)?
            .into_inner(),
    };
    let tty = std::io::stderr().is_terminal();
    let mut stream = stream;
    let mut last = None;
    while let Some(m) = stream.next().await {
        let m = m.map_err(e)?;
        if tty && m.total > 0 {
            let pct = m.current.saturating_mul(100) / m.total.max(1);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!("\r{:<10} [{bar:<25}] {pct:>3}%", m.phase);
        }
        if m.phase == "done" {
            last = Some(m);
        }
    }
    if tty {
        eprintln!();
    }
    match last {
        Some(m) => {
            println!("{}", m.image);
            Ok(0)
        }
        None => Err(CliError::new("image job ended without a result")),
    }
}
