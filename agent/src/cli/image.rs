//! `image` (import, pull, ls).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use futures::StreamExt;
use memoh_proto::pb::agent as pb;

use super::progress::{Progress, Unit};
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

/// Runs an image subcommand, with a progress bar on a terminal.
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
    let mut progress = Progress::stderr();
    let mut stream = stream;
    let mut last = None;
    while let Some(m) = stream.next().await {
        let m = m.map_err(e)?;
        if m.phase == "done" {
            last = Some(m);
        } else {
            progress.set(&m.phase, unit_of(&m.phase), m.current, m.total);
        }
    }
    progress.done();
    match last {
        Some(m) => {
            println!("{}", m.image);
            Ok(0)
        }
        None => Err(CliError::new("image job ended without a result")),
    }
}

/// What the counts of an image job's `phase` measure: layers while unpacking, bytes else.
fn unit_of(phase: &str) -> Unit {
    match phase {
        "unpacking" => Unit::Items,
        _ => Unit::Bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_count_bytes_or_layers() {
        assert_eq!(unit_of("reading"), Unit::Bytes);
        assert_eq!(unit_of("fetching"), Unit::Bytes);
        assert_eq!(unit_of("unpacking"), Unit::Items);
    }
}
