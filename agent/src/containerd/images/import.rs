//! Importing image archives (OCI layouts and `docker save` archives): planning the blobs
//! and image records an archive holds and writing them into the content store.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use oci_spec::image::{Descriptor, ImageManifestBuilder, MediaType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::manifest::{
    digest_of, gc_content_labels, is_index, parse_index, parse_manifest, pick_platform, Desc,
    MT_OCI_MANIFEST,
};
use super::progress::{BlobStart, Meter, Piece, ProgressFn, Written};
use super::{image_err, NewImage};
use crate::containerd::archive::{self, Scanned, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME};
use crate::containerd::content::{sha256_digest, unique_suffix};
use crate::containerd::reference::normalize_image_ref;
use crate::containerd::Containerd;
use crate::error::AgentError;

/// Where a blob of an import comes from.
#[derive(Debug)]
enum Source {
    /// Bytes already in memory.
    Memory(Vec<u8>),
    /// A large archive entry to stream.
    Entry(String),
}

/// What an import writes.
#[derive(Debug, Default)]
struct Plan {
    /// Blobs with known digests.
    blobs: Vec<(Desc, Source)>,
    images: Vec<NewImage>,
    /// GC labels per parent digest.
    refs: HashMap<String, HashMap<String, String>>,
}

impl Plan {
    fn add_blob(&mut self, desc: Desc, source: Source) {
        if !self.blobs.iter().any(|(d, _)| d.digest == desc.digest) {
            self.blobs.push((desc, source));
        }
    }
}

fn source_for(scanned: &Scanned, digest: &str, size: u64) -> Result<Source, String> {
    let path = archive::blob_path(digest).ok_or_else(|| format!("bad digest {digest:?}"))?;
    let path = scanned.resolve(&path).to_string();
    if let Some(bytes) = scanned.small.get(&path) {
        return Ok(Source::Memory(bytes.clone()));
    }
    match scanned.sizes.get(&path) {
        Some(s) if *s == size => Ok(Source::Entry(path)),
        Some(s) => Err(format!(
            "blob {digest} has {s} bytes, descriptor says {size}"
        )),
        None => Err(format!("archive lacks blob {digest}")),
    }
}

/// Names an OCI index entry carries: the full containerd name, else a reference-looking
/// `ref.name` (a bare tag names nothing).
fn oci_entry_name(d: &Descriptor) -> Option<String> {
    let ann = d.annotations().as_ref()?;
    if let Some(n) = ann.get(ANNOTATION_IMAGE_NAME) {
        return Some(n.clone());
    }
    let r = ann.get(ANNOTATION_REF_NAME)?;
    (r.contains('/') || r.contains(':')).then(|| r.clone())
}

/// Plans the import of an OCI layout.
fn plan_oci(archive: &str, scanned: &Scanned, name: Option<&str>) -> Result<Plan, AgentError> {
    let err = |r: String| image_err(archive, r);
    let index = parse_index(archive, scanned.small("index.json").unwrap_or_default())?;
    let mut plan = Plan::default();
    for entry in index.manifests() {
        let mut names = Vec::new();
        if let Some(n) = name {
            names.push(normalize_image_ref(n)?);
        } else if let Some(n) = oci_entry_name(entry) {
            names.push(normalize_image_ref(&n)?);
        }
        if names.is_empty() {
            return Err(err(
                "the archive names no image (no io.containerd.image.name or reference in \
                 org.opencontainers.image.ref.name); give a name"
                    .into(),
            ));
        }
        let target = Desc::from_oci(entry);
        let mut manifests = Vec::new();
        let mut pending = vec![entry.clone()];
        while let Some(d) = pending.pop() {
            let desc = Desc::from_oci(&d);
            let source = source_for(scanned, &desc.digest, d.size()).map_err(err)?;
            let Source::Memory(bytes) = &source else {
                return Err(err(format!("manifest {} is too large", desc.digest)));
            };
            if is_index(&desc.media_type) {
                let child_index = parse_index(archive, bytes)?;
                let chosen = pick_platform(&child_index, |_| true).ok_or_else(|| {
                    err(format!("index {} has no linux/amd64 manifest", desc.digest))
                })?;
                let pos = child_index
                    .manifests()
                    .iter()
                    .position(|m| m.digest() == chosen.digest())
                    .unwrap_or(0);
                plan.refs.entry(desc.digest.clone()).or_default().insert(
                    format!("containerd.io/gc.ref.content.m.{pos}"),
                    chosen.digest().to_string(),
                );
                pending.push(chosen.clone());
            } else {
                let m = parse_manifest(archive, bytes)?;
                let cfg = Desc::from_oci(m.config());
                let cfg_src = source_for(scanned, &cfg.digest, m.config().size()).map_err(err)?;
                plan.add_blob(cfg, cfg_src);
                for l in m.layers() {
                    let ld = Desc::from_oci(l);
                    let src = source_for(scanned, &ld.digest, l.size()).map_err(err)?;
                    plan.add_blob(ld, src);
                }
                plan.refs
                    .entry(desc.digest.clone())
                    .or_default()
                    .extend(gc_content_labels(&m));
                manifests.push(desc.digest.clone());
            }
            plan.add_blob(desc, source);
        }
        plan.images.push(NewImage {
            names,
            target,
            manifests,
        });
        if name.is_some() {
            break;
        }
    }
    if plan.images.is_empty() {
        return Err(err("index.json lists no image".into()));
    }
    Ok(plan)
}

impl Containerd {
    /// Streams archive entries into the content store, each under its own ingest; `wanted`
    /// maps entry paths to their expected digests when known.
    async fn stream_archive_entries(
        &self,
        path: &Path,
        wanted: HashMap<String, Option<String>>,
        lease: &str,
        meter: &mut Meter<'_>,
    ) -> Result<Written, AgentError> {
        if wanted.is_empty() {
            return Ok(Written::new());
        }
        let (tx, rx) = mpsc::channel::<Result<Piece<Vec<u8>>, AgentError>>(4);
        let archive_path = path.to_path_buf();
        let expected = wanted;
        let wanted: HashSet<String> = expected.keys().cloned().collect();
        let reader = tokio::task::spawn_blocking(move || {
            let mut open: Option<String> = None;
            archive::stream_entries(&archive_path, &wanted, |name, chunk| {
                let send = |piece| {
                    tx.blocking_send(Ok(piece))
                        .map_err(|_| image_err(name, "import cancelled"))
                };
                if open.as_deref() != Some(name) {
                    open = Some(name.to_string());
                    send(Piece::Begin(BlobStart {
                        key: name.to_string(),
                        ingest: format!(
                            "memoh-import-{}-{}",
                            sha256_digest(name.as_bytes()).trim_start_matches("sha256:"),
                            unique_suffix()
                        ),
                        size: 0,
                        expected: expected.get(name).cloned().flatten(),
                    }))?;
                }
                if chunk.is_empty() {
                    open = None;
                    send(Piece::End)
                } else {
                    send(Piece::Bytes(chunk.to_vec()))
                }
            })
        });
        let result = self.copy_blobs(ReceiverStream::new(rx), lease, meter).await;
        let read = reader
            .await
            .map_err(|e| image_err(&path.display().to_string(), format!("reader panicked: {e}")))?;
        let out = result?;
        read?;
        Ok(out)
    }

    /// Plans and writes what a scanned archive holds, then records and unpacks its images.
    pub(super) async fn import_scanned(
        &self,
        path: &Path,
        scanned: &Scanned,
        name: Option<&str>,
        lease: &str,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        let archive_name = path.display().to_string();
        let mut plan = if scanned.small("index.json").is_some() {
            plan_oci(&archive_name, scanned, name)?
        } else if scanned.small("manifest.json").is_some() {
            self.plan_docker(path, scanned, name, lease, progress)
                .await?
        } else {
            return Err(image_err(
                &archive_name,
                "neither an OCI layout (index.json) nor a docker archive (manifest.json)",
            ));
        };

        // Write the blobs containerd lacks.
        let mut missing = Vec::new();
        for (desc, source) in plan.blobs.drain(..) {
            if self.content_info(&desc.digest).await?.is_none() {
                missing.push((desc, source));
            }
        }
        let total: u64 = missing.iter().map(|(d, _)| d.size.max(0) as u64).sum();
        let mut meter = Meter::new(progress, 0, total);
        let mut wanted = HashMap::new();
        for (desc, source) in &missing {
            match source {
                Source::Memory(bytes) => {
                    let got = self.write_blob(bytes, lease, HashMap::new()).await?;
                    if got != desc.digest {
                        return Err(image_err(
                            &archive_name,
                            format!("blob {} has digest {got}", desc.digest),
                        ));
                    }
                    meter.add(bytes.len() as u64);
                }
                Source::Entry(entry) => {
                    wanted.insert(entry.clone(), Some(desc.digest.clone()));
                }
            }
        }
        self.stream_archive_entries(path, wanted, lease, &mut meter)
            .await?;

        self.finish_images(&plan.images, &plan.refs, lease, progress)
            .await
    }

    /// Plans a docker archive: layers are streamed in first since only then are their
    /// digests known; the OCI manifest is generated.
    async fn plan_docker(
        &self,
        path: &Path,
        scanned: &Scanned,
        name: Option<&str>,
        lease: &str,
        progress: ProgressFn<'_>,
    ) -> Result<Plan, AgentError> {
        let archive_name = path.display().to_string();
        let err = |r: String| image_err(&archive_name, r);
        let entries = archive::docker_manifest(scanned.small("manifest.json").unwrap_or_default())
            .map_err(err)?;
        if entries.is_empty() {
            return Err(err("manifest.json lists no image".into()));
        }
        // Stream every large layer once; small ones are hashed in memory.
        let mut wanted = HashMap::new();
        let mut total = 0u64;
        for e in &entries {
            for l in &e.layers {
                let p = scanned
                    .resolve(&archive::clean(Path::new(l)).unwrap_or_default())
                    .to_string();
                if !scanned.small.contains_key(&p) {
                    total += scanned
                        .sizes
                        .get(&p)
                        .copied()
                        .ok_or_else(|| err(format!("archive lacks layer {l}")))?;
                    wanted.insert(p, None);
                }
            }
        }
        let streamed = self
            .stream_archive_entries(path, wanted, lease, &mut Meter::new(progress, 0, total))
            .await?;

        let mut plan = Plan::default();
        for e in entries
            .iter()
            .take(if name.is_some() { 1 } else { usize::MAX })
        {
            let cfg_path = archive::clean(Path::new(&e.config)).unwrap_or_default();
            let cfg_bytes = scanned
                .small(&cfg_path)
                .ok_or_else(|| err(format!("archive lacks config {}", e.config)))?
                .to_vec();
            let cfg_desc = Descriptor::new(
                MediaType::ImageConfig,
                cfg_bytes.len() as u64,
                digest_of(&sha256_digest(&cfg_bytes))?,
            );
            let mut layers = Vec::new();
            for l in &e.layers {
                let p = scanned
                    .resolve(&archive::clean(Path::new(l)).unwrap_or_default())
                    .to_string();
                let (digest, size, head) = if let Some(bytes) = scanned.small.get(&p) {
                    plan.add_blob(
                        Desc {
                            media_type: String::new(),
                            digest: sha256_digest(bytes),
                            size: bytes.len() as i64,
                        },
                        Source::Memory(bytes.clone()),
                    );
                    (
                        sha256_digest(bytes),
                        bytes.len() as i64,
                        bytes[..bytes.len().min(16)].to_vec(),
                    )
                } else {
                    streamed
                        .get(&p)
                        .cloned()
                        .ok_or_else(|| err(format!("layer {l} was not written")))?
                };
                layers.push(Descriptor::new(
                    MediaType::from(archive::layer_media_type(&head)),
                    size as u64,
                    digest_of(&digest)?,
                ));
            }
            let manifest = ImageManifestBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageManifest)
                .config(cfg_desc.clone())
                .layers(layers)
                .build()
                .map_err(|e| err(format!("building manifest: {e}")))?;
            let manifest_bytes = manifest
                .to_string()
                .map_err(|e| err(format!("serialising manifest: {e}")))?
                .into_bytes();
            let manifest_desc = Desc {
                media_type: MT_OCI_MANIFEST.to_string(),
                digest: sha256_digest(&manifest_bytes),
                size: manifest_bytes.len() as i64,
            };
            plan.add_blob(Desc::from_oci(&cfg_desc), Source::Memory(cfg_bytes));
            plan.refs
                .insert(manifest_desc.digest.clone(), gc_content_labels(&manifest));
            plan.add_blob(manifest_desc.clone(), Source::Memory(manifest_bytes));
            let names = match name {
                Some(n) => vec![normalize_image_ref(n)?],
                None => e
                    .repo_tags
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .map(|t| normalize_image_ref(t))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if names.is_empty() {
                return Err(err(
                    "the archive names no image (no RepoTags); give a name".into()
                ));
            }
            plan.images.push(NewImage {
                names,
                manifests: vec![manifest_desc.digest.clone()],
                target: manifest_desc,
            });
        }
        Ok(plan)
    }
}
