//! Images: importing archives, pulling from registries, resolving to a config and chain id,
//! and unpacking layers onto snapshot chains with the diff service.
//!
//! Content written during an import or pull is held by a lease until the image record and
//! the garbage-collector labels that keep it alive are in place:
//! index -> manifests (`gc.ref.content.m.<i>`), manifest -> config and layers
//! (`gc.ref.content.config`, `gc.ref.content.l.<i>`), config -> unpacked snapshot chain
//! (`gc.ref.snapshot.<snapshotter>`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use containerd_client::services::v1::{
    diff_client::DiffClient, images_client::ImagesClient, ApplyRequest, CreateImageRequest,
    DeleteImageRequest, GetImageRequest, Image, ListImagesRequest, UpdateImageRequest,
};
use containerd_client::types::Descriptor as PbDescriptor;
use futures::StreamExt;
use oci_spec::image::{
    Arch, Descriptor, Digest as OciDigest, ImageConfiguration, ImageIndex, ImageManifest,
    ImageManifestBuilder, MediaType, Os,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Code;

use super::archive::{self, Scanned, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME};
use super::content::{hex, sha256_digest, unique_suffix, ContentWriter};
use super::reference::{normalize_image_ref, ImageRef};
use super::{
    Containerd, ImageConfig, ImageSummary, Progress, ProgressFn, ProgressPhase, PullOptions,
    ResolvedImage,
};
use crate::error::AgentError;

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// How long an import's lease may outlive a crashed agent.
const LEASE_TTL: Duration = Duration::from_secs(3600);

fn is_index(media_type: &str) -> bool {
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

/// The chain id of a stack of layers given their diff ids (uncompressed digests), bottom
/// first: `chain(0) = diff(0)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
/// `None` for an empty stack.
pub fn chain_id(diff_ids: &[String]) -> Option<String> {
    let mut iter = diff_ids.iter();
    let mut chain = iter.next()?.clone();
    for diff in iter {
        let mut h = Sha256::new();
        h.update(chain.as_bytes());
        h.update(b" ");
        h.update(diff.as_bytes());
        chain = format!("sha256:{}", hex(&h.finalize()));
    }
    Some(chain)
}

fn image_err(reference: &str, reason: impl Into<String>) -> AgentError {
    AgentError::Image {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

/// A blob as containerd's API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desc {
    media_type: String,
    digest: String,
    size: i64,
}

impl Desc {
    fn from_oci(d: &Descriptor) -> Self {
        Self {
            media_type: d.media_type().to_string(),
            digest: d.digest().to_string(),
            size: d.size() as i64,
        }
    }

    fn to_pb(&self) -> PbDescriptor {
        PbDescriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: HashMap::new(),
        }
    }
}

/// Picks the linux/amd64 entry of an index; entries without a platform count as a match when
/// nothing better is there.
fn pick_platform(
    index: &ImageIndex,
    mut available: impl FnMut(&Descriptor) -> bool,
) -> Option<&Descriptor> {
    let manifests = index.manifests();
    let exact = manifests.iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
            && available(d)
    });
    exact.or_else(|| {
        manifests
            .iter()
            .find(|d| d.platform().is_none() && !is_index(d.media_type().as_ref()) && available(d))
    })
}

fn parse_index(reference: &str, bytes: &[u8]) -> Result<ImageIndex, AgentError> {
    ImageIndex::from_reader(bytes).map_err(|e| image_err(reference, format!("bad index: {e}")))
}

fn parse_manifest(reference: &str, bytes: &[u8]) -> Result<ImageManifest, AgentError> {
    ImageManifest::from_reader(bytes)
        .map_err(|e| image_err(reference, format!("bad manifest: {e}")))
}

fn parse_config(reference: &str, bytes: &[u8]) -> Result<(ImageConfig, Vec<String>), AgentError> {
    let cfg = ImageConfiguration::from_reader(bytes)
        .map_err(|e| image_err(reference, format!("bad image config: {e}")))?;
    let exec = cfg.config().clone().unwrap_or_default();
    let config = ImageConfig {
        env: exec.env().clone().unwrap_or_default(),
        entrypoint: exec.entrypoint().clone().unwrap_or_default(),
        cmd: exec.cmd().clone().unwrap_or_default(),
        working_dir: exec.working_dir().clone().unwrap_or_default(),
        user: exec.user().clone().unwrap_or_default(),
    };
    Ok((config, cfg.rootfs().diff_ids().clone()))
}

/// Media type of a JSON manifest or index whose descriptor we do not have.
fn sniff_media_type(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return mt.to_string();
    }
    if v.get("manifests").is_some() {
        MT_OCI_INDEX.to_string()
    } else {
        MT_OCI_MANIFEST.to_string()
    }
}

/// Whether a registry host is on this machine (plain HTTP is then allowed).
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a blob of an import comes from.
#[derive(Debug)]
enum Source {
    /// Bytes already in memory.
    Memory(Vec<u8>),
    /// A large archive entry to stream.
    Entry(String),
}

/// One image an archive holds.
#[derive(Debug)]
struct ArchiveImage {
    names: Vec<String>,
    target: Desc,
    /// Manifests (of this platform) under the target, with their indexes' child positions.
    manifests: Vec<String>,
}

/// What an import writes.
#[derive(Debug, Default)]
struct Plan {
    /// Blobs with known digests.
    blobs: Vec<(Desc, Source)>,
    images: Vec<ArchiveImage>,
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

fn gc_content_labels(manifest: &ImageManifest) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        manifest.config().digest().to_string(),
    );
    for (i, l) in manifest.layers().iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest().to_string(),
        );
    }
    labels
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
        plan.images.push(ArchiveImage {
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

/// Result of streaming archive entries into content: digest, size and first bytes by path.
type Streamed = HashMap<String, (String, i64, Vec<u8>)>;

impl Containerd {
    fn images(&self) -> ImagesClient<tonic::transport::Channel> {
        ImagesClient::new(self.channel.clone())
    }

    /// Streams archive entries into the content store, each under its own ingest.
    async fn stream_archive_entries(
        &self,
        path: &Path,
        wanted: HashMap<String, Option<String>>,
        lease: &str,
        done_before: u64,
        total: u64,
        progress: ProgressFn<'_>,
    ) -> Result<Streamed, AgentError> {
        let mut out = Streamed::new();
        if wanted.is_empty() {
            return Ok(out);
        }
        let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(4);
        let archive_path = path.to_path_buf();
        let expected = wanted;
        let wanted: HashSet<String> = expected.keys().cloned().collect();
        let reader = tokio::task::spawn_blocking(move || {
            archive::stream_entries(&archive_path, &wanted, |name, chunk| {
                tx.blocking_send((name.to_string(), chunk.to_vec()))
                    .map_err(|_| image_err(name, "import cancelled"))
            })
        });
        let mut current: Option<(String, ContentWriter, Vec<u8>)> = None;
        let mut done = done_before;
        let result: Result<(), AgentError> = async {
            while let Some((name, chunk)) = rx.recv().await {
                if current.as_ref().is_none_or(|(n, _, _)| *n != name) {
                    let reference = format!(
                        "memoh-import-{}-{}",
                        sha256_digest(name.as_bytes()).trim_start_matches("sha256:"),
                        unique_suffix()
                    );
                    let w = self
                        .content_writer(
                            &reference,
                            lease,
                            0,
                            expected.get(&name).and_then(|e| e.as_deref()),
                        )
                        .await?;
                    current = Some((name.clone(), w, Vec::new()));
                }
                let (_, w, head) = current.as_mut().expect("writer is open");
                if chunk.is_empty() {
                    let (name, w, head) = current.take().expect("writer is open");
                    let (digest, size) = w.commit(HashMap::new()).await?;
                    out.insert(name, (digest, size, head));
                    continue;
                }
                if head.len() < 16 {
                    head.extend_from_slice(&chunk[..chunk.len().min(16)]);
                }
                w.write(&chunk).await?;
                done += chunk.len() as u64;
                progress(Progress {
                    phase: ProgressPhase::Writing,
                    current: done,
                    total,
                });
            }
            Ok(())
        }
        .await;
        drop(rx);
        let read = reader
            .await
            .map_err(|e| image_err(&path.display().to_string(), format!("reader panicked: {e}")))?;
        result?;
        read?;
        Ok(out)
    }

    pub(crate) async fn import_archive_inner(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        if let Some(n) = name {
            normalize_image_ref(n)?;
        }
        progress(Progress {
            phase: ProgressPhase::Reading,
            current: 0,
            total: 0,
        });
        let p = path.to_path_buf();
        let scanned = tokio::task::spawn_blocking(move || archive::scan(&p))
            .await
            .map_err(|e| {
                image_err(&path.display().to_string(), format!("reader panicked: {e}"))
            })??;
        let lease = self.create_lease(LEASE_TTL).await?;
        let result = self
            .import_scanned(path, &scanned, name, &lease, progress)
            .await;
        if let Err(e) = self.delete_lease(&lease).await {
            tracing::warn!(lease = %lease, error = %e, "could not delete import lease");
        }
        let names = result?;
        tracing::info!(archive = %path.display(), images = ?names, "image archive imported");
        progress(Progress {
            phase: ProgressPhase::Done,
            current: 1,
            total: 1,
        });
        Ok(names)
    }

    async fn import_scanned(
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
        let mut done = 0u64;
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
                    done += bytes.len() as u64;
                    progress(Progress {
                        phase: ProgressPhase::Writing,
                        current: done,
                        total,
                    });
                }
                Source::Entry(entry) => {
                    wanted.insert(entry.clone(), Some(desc.digest.clone()));
                }
            }
        }
        self.stream_archive_entries(path, wanted, lease, done, total, progress)
            .await?;

        self.finish_images(&plan.images, &plan.refs, lease, progress)
            .await
    }

    /// Labels parents, creates the records and unpacks; returns the names.
    async fn finish_images(
        &self,
        images: &[ArchiveImage],
        refs: &HashMap<String, HashMap<String, String>>,
        lease: &str,
        progress: ProgressFn<'_>,
    ) -> Result<Vec<String>, AgentError> {
        for (digest, labels) in refs {
            self.label_content(digest, labels).await?;
        }
        let mut names = Vec::new();
        for image in images {
            for manifest in &image.manifests {
                self.unpack_manifest(manifest, lease, progress).await?;
            }
            for n in &image.names {
                self.put_image(n, &image.target).await?;
                names.push(n.clone());
            }
        }
        Ok(names)
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
            .stream_archive_entries(path, wanted, lease, 0, total, progress)
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
            plan.images.push(ArchiveImage {
                names,
                manifests: vec![manifest_desc.digest.clone()],
                target: manifest_desc,
            });
        }
        Ok(plan)
    }

    /// Creates the image record, or points an existing one at `target`.
    async fn put_image(&self, name: &str, target: &Desc) -> Result<(), AgentError> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target.to_pb()),
            created_at: None,
            updated_at: None,
        };
        let req = self.request(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        });
        match self.images().create(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let req = self.request(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_string()],
                    }),
                    source_date_epoch: None,
                });
                self.images()
                    .update(req)
                    .await
                    .map_err(|s| AgentError::containerd(format!("update image {name}"), s))?;
                Ok(())
            }
            Err(s) => Err(AgentError::containerd(format!("create image {name}"), s)),
        }
    }

    /// Applies a manifest's layers onto the snapshot chain of its diff ids, skipping the part
    /// that exists, and labels the config so the chain lives as long as the image.
    async fn unpack_manifest(
        &self,
        manifest_digest: &str,
        lease: &str,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        let m = parse_manifest(manifest_digest, &self.read_blob(manifest_digest).await?)?;
        let cfg_digest = m.config().digest().to_string();
        let (_, diff_ids) = parse_config(&cfg_digest, &self.read_blob(&cfg_digest).await?)?;
        if diff_ids.len() != m.layers().len() {
            return Err(image_err(
                manifest_digest,
                format!(
                    "{} layers but {} diff ids in the config",
                    m.layers().len(),
                    diff_ids.len()
                ),
            ));
        }
        let top =
            chain_id(&diff_ids).ok_or_else(|| image_err(manifest_digest, "image has no layers"))?;
        let total = diff_ids.len() as u64;
        let mut parent: Option<String> = None;
        for (i, layer) in m.layers().iter().enumerate() {
            let chain = chain_id(&diff_ids[..=i]).expect("non-empty");
            if self.stat_snapshot_inner(&chain).await?.is_none() {
                self.apply_layer(
                    &Desc::from_oci(layer),
                    &diff_ids[i],
                    &chain,
                    parent.as_deref(),
                    lease,
                )
                .await?;
                let mut labels = HashMap::new();
                labels.insert(
                    "containerd.io/uncompressed".to_string(),
                    diff_ids[i].clone(),
                );
                self.label_content(layer.digest().as_ref(), &labels).await?;
            }
            progress(Progress {
                phase: ProgressPhase::Unpacking,
                current: i as u64 + 1,
                total,
            });
            parent = Some(chain);
        }
        let mut labels = HashMap::new();
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
            top.clone(),
        );
        self.label_content(&cfg_digest, &labels).await?;
        Ok(top)
    }

    /// Prepares a temporary snapshot on `parent`, applies one layer, checks the diff id and
    /// commits it as `chain`.
    async fn apply_layer(
        &self,
        layer: &Desc,
        diff_id: &str,
        chain: &str,
        parent: Option<&str>,
        lease: &str,
    ) -> Result<(), AgentError> {
        let key = format!("memoh-extract-{}-{chain}", unique_suffix());
        let mounts = self
            .prepare_snapshot_inner(&key, parent, &HashMap::new(), Some(lease))
            .await?;
        let result: Result<(), AgentError> = async {
            let req = self.request(ApplyRequest {
                diff: Some(layer.to_pb()),
                mounts: mounts.iter().map(super::rootfs_to_pb).collect(),
                payloads: HashMap::new(),
                sync_fs: false,
            });
            let applied = DiffClient::new(self.channel.clone())
                .apply(req)
                .await
                .map_err(|s| AgentError::containerd(format!("apply layer {}", layer.digest), s))?
                .into_inner()
                .applied
                .map(|d| d.digest)
                .unwrap_or_default();
            if applied != diff_id {
                return Err(image_err(
                    &layer.digest,
                    format!("layer unpacked to {applied}, config says {diff_id}"),
                ));
            }
            match self
                .commit_snapshot_inner(chain, &key, &HashMap::new(), Some(lease))
                .await
            {
                Ok(()) => Ok(()),
                Err(AgentError::Containerd { status, .. })
                    if status.code() == Code::AlreadyExists =>
                {
                    // Unpacked concurrently by someone else: theirs is as good.
                    Err(AgentError::Containerd {
                        op: String::new(),
                        status,
                    })
                }
                Err(e) => Err(e),
            }
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.remove_snapshot_inner(&key).await;
                match e {
                    AgentError::Containerd { op, status }
                        if op.is_empty() && status.code() == Code::AlreadyExists =>
                    {
                        Ok(())
                    }
                    e => Err(e),
                }
            }
        }
    }

    /// The image record of `reference` (normalised; the name as given is tried too).
    async fn get_image(&self, reference: &str) -> Result<Image, AgentError> {
        let normalised = normalize_image_ref(reference)?;
        let mut candidates = vec![normalised.clone()];
        if reference != normalised {
            candidates.push(reference.to_string());
        }
        for name in candidates {
            let req = self.request(GetImageRequest { name: name.clone() });
            match self.images().get(req).await {
                Ok(r) => {
                    if let Some(img) = r.into_inner().image {
                        return Ok(img);
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(AgentError::containerd(format!("get image {name}"), s)),
            }
        }
        Err(AgentError::ImageNotFound(normalised))
    }

    pub(crate) async fn resolve_image_inner(
        &self,
        reference: &str,
    ) -> Result<ResolvedImage, AgentError> {
        let image = self.get_image(reference).await?;
        let target = image
            .target
            .ok_or_else(|| image_err(&image.name, "image record has no target"))?;
        let mut manifest_digest = target.digest.clone();
        let mut media_type = target.media_type.clone();
        for _ in 0..4 {
            if !is_index(&media_type) {
                break;
            }
            let index = parse_index(&image.name, &self.read_blob(&manifest_digest).await?)?;
            let mut present = HashSet::new();
            for d in index.manifests() {
                if self.content_info(d.digest().as_ref()).await?.is_some() {
                    present.insert(d.digest().to_string());
                }
            }
            let chosen = pick_platform(&index, |d| present.contains(&d.digest().to_string()))
                .ok_or_else(|| image_err(&image.name, "no linux/amd64 manifest in the store"))?;
            manifest_digest = chosen.digest().to_string();
            media_type = chosen.media_type().to_string();
        }
        let m = parse_manifest(&image.name, &self.read_blob(&manifest_digest).await?)?;
        let config_digest = m.config().digest().to_string();
        let (config, diff_ids) = parse_config(&image.name, &self.read_blob(&config_digest).await?)?;
        let chain_id =
            chain_id(&diff_ids).ok_or_else(|| image_err(&image.name, "image has no layers"))?;
        Ok(ResolvedImage {
            name: image.name,
            target_digest: target.digest,
            manifest_digest,
            config_digest,
            config,
            diff_ids,
            chain_id,
        })
    }

    pub(crate) async fn ensure_unpacked_inner(
        &self,
        reference: &str,
    ) -> Result<ResolvedImage, AgentError> {
        let resolved = self.resolve_image_inner(reference).await?;
        if self
            .stat_snapshot_inner(&resolved.chain_id)
            .await?
            .is_none()
        {
            tracing::info!(image = %resolved.name, snapshotter = %self.snapshotter, "unpacking image");
            let lease = self.create_lease(LEASE_TTL).await?;
            let r = self
                .unpack_manifest(&resolved.manifest_digest, &lease, &super::no_progress)
                .await;
            if let Err(e) = self.delete_lease(&lease).await {
                tracing::warn!(lease = %lease, error = %e, "could not delete unpack lease");
            }
            r?;
        }
        Ok(resolved)
    }

    pub(crate) async fn list_images_inner(&self) -> Result<Vec<ImageSummary>, AgentError> {
        let req = self.request(ListImagesRequest { filters: vec![] });
        let out = self
            .images()
            .list(req)
            .await
            .map_err(|s| AgentError::containerd("list images", s))?
            .into_inner();
        Ok(out
            .images
            .into_iter()
            .map(|i| {
                let t = i.target.unwrap_or_default();
                ImageSummary {
                    name: i.name,
                    target_digest: t.digest,
                    media_type: t.media_type,
                    size: t.size,
                    labels: i.labels,
                }
            })
            .collect())
    }

    pub(crate) async fn delete_image_inner(&self, reference: &str) -> Result<bool, AgentError> {
        let name = match self.get_image(reference).await {
            Ok(img) => img.name,
            Err(AgentError::ImageNotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let req = self.request(DeleteImageRequest {
            name: name.clone(),
            sync: true,
            target: None,
        });
        match self.images().delete(req).await {
            Ok(_) => {
                tracing::info!(image = %name, "image deleted");
                Ok(true)
            }
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(AgentError::containerd(format!("delete image {name}"), s)),
        }
    }

    pub(crate) async fn pull_image_inner(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: ProgressFn<'_>,
    ) -> Result<String, AgentError> {
        use oci_client::client::{ClientConfig, ClientProtocol};
        use oci_client::secrets::RegistryAuth;

        let r = ImageRef::parse(reference)?;
        let name = r.to_string();
        let err = |reason: String| image_err(&name, reason);
        let registry_ref = match (&r.digest, &r.tag) {
            (Some(d), _) => oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.clone(),
            ),
            (None, Some(t)) => {
                oci_client::Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone())
            }
            (None, None) => unreachable!("normalised references carry a tag or digest"),
        };
        let plain_http = options.insecure || is_loopback_registry(&r.registry);
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::HttpsExcept(vec![r.registry.clone()])
            } else {
                ClientProtocol::Https
            },
            ..Default::default()
        };
        let client = oci_client::Client::new(config);
        let auth = match &options.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let accepted = [
            MT_OCI_MANIFEST,
            MT_DOCKER_MANIFEST,
            MT_OCI_INDEX,
            MT_DOCKER_LIST,
        ];
        progress(Progress {
            phase: ProgressPhase::Reading,
            current: 0,
            total: 0,
        });
        let (top_bytes, top_digest) = client
            .pull_manifest_raw(&registry_ref, &auth, &accepted)
            .await
            .map_err(|e| err(format!("fetching manifest: {e}")))?;
        check_digest(&name, &top_bytes, &top_digest)?;
        let top = Desc {
            media_type: sniff_media_type(&top_bytes),
            digest: top_digest.clone(),
            size: top_bytes.len() as i64,
        };
        let mut refs: HashMap<String, HashMap<String, String>> = HashMap::new();
        let mut memory_blobs: Vec<Vec<u8>> = vec![top_bytes.to_vec()];
        let (manifest_digest, manifest_bytes) = if is_index(&top.media_type) {
            let index = parse_index(&name, &top_bytes)?;
            let chosen = pick_platform(&index, |_| true)
                .ok_or_else(|| err("no linux/amd64 manifest in the index".into()))?;
            let pos = index
                .manifests()
                .iter()
                .position(|m| m.digest() == chosen.digest())
                .unwrap_or(0);
            let child = chosen.digest().to_string();
            refs.entry(top.digest.clone()).or_default().insert(
                format!("containerd.io/gc.ref.content.m.{pos}"),
                child.clone(),
            );
            let child_ref = oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                child.clone(),
            );
            let (bytes, digest) = client
                .pull_manifest_raw(&child_ref, &auth, &accepted)
                .await
                .map_err(|e| err(format!("fetching manifest {child}: {e}")))?;
            check_digest(&name, &bytes, &child)?;
            let _ = digest;
            memory_blobs.push(bytes.to_vec());
            (child, bytes.to_vec())
        } else {
            (top.digest.clone(), top_bytes.to_vec())
        };
        let manifest = parse_manifest(&name, &manifest_bytes)?;
        refs.entry(manifest_digest.clone())
            .or_default()
            .extend(gc_content_labels(&manifest));

        let lease = self.create_lease(LEASE_TTL).await?;
        let result: Result<(), AgentError> = async {
            for bytes in &memory_blobs {
                self.write_blob(bytes, &lease, HashMap::new()).await?;
            }
            let blobs: Vec<Desc> = std::iter::once(manifest.config())
                .chain(manifest.layers().iter())
                .map(Desc::from_oci)
                .collect();
            let mut missing = Vec::new();
            for b in blobs {
                if self.content_info(&b.digest).await?.is_none() {
                    missing.push(b);
                }
            }
            let total: u64 = missing.iter().map(|b| b.size.max(0) as u64).sum();
            let mut done = 0u64;
            for b in &missing {
                let mut stream = client
                    .pull_blob_stream(&registry_ref, b.digest.as_str())
                    .await
                    .map_err(|e| err(format!("fetching blob {}: {e}", b.digest)))?;
                let ingest = format!(
                    "memoh-pull-{}-{}",
                    b.digest.replace(':', "-"),
                    unique_suffix()
                );
                let mut w = self
                    .content_writer(&ingest, &lease, b.size, Some(&b.digest))
                    .await?;
                while let Some(chunk) = stream.stream.next().await {
                    let chunk =
                        chunk.map_err(|e| err(format!("fetching blob {}: {e}", b.digest)))?;
                    w.write(&chunk).await?;
                    done += chunk.len() as u64;
                    progress(Progress {
                        phase: ProgressPhase::Writing,
                        current: done,
                        total,
                    });
                }
                w.commit(HashMap::new()).await?;
            }
            let image = ArchiveImage {
                names: vec![name.clone()],
                target: top.clone(),
                manifests: vec![manifest_digest.clone()],
            };
            self.finish_images(&[image], &refs, &lease, progress)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = self.delete_lease(&lease).await {
            tracing::warn!(lease = %lease, error = %e, "could not delete pull lease");
        }
        result?;
        tracing::info!(image = %name, "image pulled");
        progress(Progress {
            phase: ProgressPhase::Done,
            current: 1,
            total: 1,
        });
        Ok(name)
    }
}

fn check_digest(name: &str, bytes: &[u8], want: &str) -> Result<(), AgentError> {
    let got = sha256_digest(bytes);
    if want.starts_with("sha256:") && got != want {
        return Err(image_err(name, format!("registry sent {got} for {want}")));
    }
    Ok(())
}

fn digest_of(s: &str) -> Result<OciDigest, AgentError> {
    OciDigest::from_str(s).map_err(|e| image_err(s, format!("bad digest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids() {
        let a =
            "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4".to_string();
        let b =
            "sha256:2b9d7a1a0b3c1f1b8b0b9b1c1c3a3e8e0d6b7b2f8c5f1f1f1f1f1f1f1f1f1f1f".to_string();
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let mut h = Sha256::new();
        h.update(format!("{a} {b}").as_bytes());
        let want = format!("sha256:{}", hex(&h.finalize()));
        assert_eq!(chain_id(&[a.clone(), b.clone()]), Some(want.clone()));
        // Three layers chain on the previous chain id, not on the diff id.
        let c = "sha256:00".to_string();
        let mut h = Sha256::new();
        h.update(format!("{want} {c}").as_bytes());
        assert_eq!(
            chain_id(&[a, b, c]),
            Some(format!("sha256:{}", hex(&h.finalize())))
        );
    }

    #[test]
    fn chain_id_known_value() {
        // Two identical empty-tar layers; value computed independently with sha256sum.
        let empty =
            "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef".to_string();
        let got = chain_id(&[empty.clone(), empty.clone()]).unwrap();
        let mut h = Sha256::new();
        h.update(format!("{empty} {empty}"));
        assert_eq!(got, format!("sha256:{}", hex(&h.finalize())));
    }

    #[test]
    fn loopback_registries() {
        for (r, want) in [
            ("127.0.0.1:5000", true),
            ("localhost:5000", true),
            ("localhost", true),
            ("[::1]:5000", true),
            ("127.1.2.3", true),
            ("docker.io", false),
            ("10.0.0.1:5000", false),
            ("registry.local:5000", false),
        ] {
            assert_eq!(is_loopback_registry(r), want, "{r}");
        }
    }

    #[test]
    fn platform_choice() {
        let index: ImageIndex = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,
             "digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111",
             "platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":2,
             "digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222",
             "platform":{"os":"linux","architecture":"amd64"}}]}"#,
        )
        .unwrap();
        let d = pick_platform(&index, |_| true).unwrap();
        assert!(d.digest().to_string().ends_with("2222"));
        assert!(pick_platform(&index, |d| d.size() == 1).is_none());
    }

    #[test]
    fn media_type_sniffing() {
        assert_eq!(sniff_media_type(br#"{"manifests":[]}"#), MT_OCI_INDEX);
        assert_eq!(
            sniff_media_type(format!(r#"{{"mediaType":"{MT_DOCKER_LIST}"}}"#).as_bytes()),
            MT_DOCKER_LIST
        );
        assert_eq!(sniff_media_type(br#"{"layers":[]}"#), MT_OCI_MANIFEST);
    }
}
