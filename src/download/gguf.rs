//! GGUF models on the hub, fetched by layer range. A model id `org/name/file.gguf` names one
//! GGUF file of a repository (a split GGUF by its first part). Each part's header is read
//! with HTTP range requests (its size is not known up front: the first bytes are fetched, and
//! more while candle's reader runs out of them); the header gives every tensor's byte range,
//! and only the ranges of the shard's tensors are fetched, into a file of the full size that
//! the engine maps like the whole file (see [`super::sparse`]).
//!
//! Checks: each part's size is the hub's, every tensor of its header lies inside it, and the
//! server's `Content-Range` answers the range asked for. A part's SHA-256 can only be checked
//! once all of its bytes are present (a later shard, or a whole-model one, completes it).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Content;

use super::hub::{verify, RemoteFile, RepoListing};
use super::layout::{hf_cache_snapshot, link_or_copy, HubSettings};
use super::progress::ProgressTracker;
use super::ranges::ByteRanges;
use super::sparse::{present_bytes, record_path, recorded_ranges, LocalFile};
use super::{cached_copy_matches, HfDownloader, REVISION};
use crate::engine::candle::{gguf_part_names, gguf_tensor_range};
use crate::error::{Error, Result};
use crate::gguf_header::read_gguf_header;
use crate::models::hub_gguf_file;
use crate::shard::Shard;

/// Bytes fetched first for a header; each retry fetches four times as many.
const FIRST_HEADER_BYTES: u64 = 64 << 10;
/// Gaps between needed ranges up to this size are fetched along (alignment padding, small
/// tensors) rather than costing another request.
const BRIDGED_GAP: u64 = 64 << 10;

/// A GGUF file in a hub repository, as a model id names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufRef {
    /// The repository (`org/name`).
    pub repo_id: String,
    /// The file's path in it (a split GGUF's first part).
    pub path: String,
}

impl GgufRef {
    /// The GGUF a repository string `org/name/path/file.gguf` names; `None` for other strings.
    pub fn parse(repo: &str) -> Option<Self> {
        hub_gguf_file(repo).map(|(repo_id, path)| Self { repo_id: repo_id.into(), path: path.into() })
    }

    /// The paths in the repository of every part, in order.
    fn parts(&self) -> Result<Vec<String>> {
        Ok(gguf_part_names(Path::new(&self.path))?.iter().map(|p| p.to_string_lossy().into_owned()).collect())
    }
}

/// Reads the first bytes of a file as if they were the whole of it: seeks see the file's
/// full size (candle's reader checks lengths against it), and a read past the bytes at hand
/// fails and is remembered, telling "needs more bytes" from "not a GGUF header".
struct PrefixReader<'a> {
    bytes: &'a [u8],
    size: u64,
    position: u64,
    ran_out: bool,
}

impl Read for PrefixReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.position >= self.bytes.len() as u64 {
            if self.position < self.size && !buffer.is_empty() {
                self.ran_out = true;
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(0);
        }
        let available = &self.bytes[self.position as usize..];
        let n = available.len().min(buffer.len());
        buffer[..n].copy_from_slice(&available[..n]);
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for PrefixReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        self.position = target.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        Ok(self.position)
    }
}

/// The header of a GGUF file of `size` bytes from its first bytes `prefix`; `None` when the
/// header runs past them.
pub(crate) fn parse_header(prefix: &[u8], size: u64, what: &str) -> Result<Option<Content>> {
    let mut reader = PrefixReader { bytes: prefix, size, position: 0, ran_out: false };
    match read_gguf_header(&mut reader) {
        Ok(content) if content.tensor_data_offset <= size => Ok(Some(content)),
        Ok(content) => Err(Error::InvalidModel(format!(
            "{what}: its tensor data would start at byte {}, past its {size} bytes",
            content.tensor_data_offset
        ))),
        Err(_) if reader.ran_out => Ok(None),
        Err(e) => Err(Error::InvalidModel(format!("{what} is not a readable GGUF file: {e}"))),
    }
}

/// The decoder layer of a GGUF tensor (`blk.{i}.…`), or None for the others.
fn layer_of(tensor: &str) -> Option<i32> {
    let (number, _) = tensor.strip_prefix("blk.")?.split_once('.')?;
    number.parse().ok()
}

/// Whether a download needs the tensor `name`: for a shard, its layers, the embeddings on the
/// first shard (and on the last when the head is `tied` to them), the norm and head on the
/// last; for the metadata alone (`shard` None) none of these. Other tensors (`rope_freqs`)
/// are small and read by every node's config.
fn needs_tensor(shard: Option<&Shard>, name: &str, tied: bool) -> bool {
    if let Some(layer) = layer_of(name) {
        return shard.is_some_and(|s| s.start_layer <= layer && layer <= s.end_layer);
    }
    if name.starts_with("token_embd.") {
        return shard.is_some_and(|s| s.is_first_layer() || (tied && s.is_last_layer()));
    }
    if name.starts_with("output.") || name.starts_with("output_norm.") {
        return shard.is_some_and(|s| s.is_last_layer());
    }
    true
}

/// The bytes of a part that a download needs: its header and the tensors of [`needs_tensor`].
/// Every tensor of the header must lie inside the part's `size` bytes.
pub(crate) fn needed_ranges(
    content: &Content,
    shard: Option<&Shard>,
    tied: bool,
    size: u64,
    what: &str,
) -> Result<ByteRanges> {
    let mut needed = ByteRanges::default();
    needed.insert(0..content.tensor_data_offset);
    for (name, info) in &content.tensor_infos {
        let range = gguf_tensor_range(content, name, info)?;
        if range.end > size {
            return Err(Error::InvalidModel(format!(
                "{what}: tensor {name} (bytes {}..{}) lies past the end of the {size}-byte file",
                range.start, range.end
            )));
        }
        if needs_tensor(shard, name, tied) {
            needed.insert(range);
        }
    }
    Ok(needed)
}

/// One part of a GGUF being fetched.
struct Part {
    remote: RemoteFile,
    dest: PathBuf,
    header: Content,
}

impl HfDownloader {
    /// Makes the bytes of `gguf` that `shard` needs present (only the headers and the small
    /// tensors the config reads when `shard` is None) and returns the first part's path.
    pub(super) async fn ensure_gguf(&self, gguf: &GgufRef, shard: Option<&Shard>) -> Result<PathBuf> {
        let settings = HubSettings::from_env();
        let target = self.repo_dir(&gguf.repo_id);
        let parts = gguf.parts()?;
        let snapshot = hf_cache_snapshot(&gguf.repo_id, REVISION);
        let all_cached = snapshot.is_some_and(|s| parts.iter().all(|p| s.join(p).is_file()));
        let listing = match self.cached_listing(&gguf.repo_id) {
            // The Hugging Face cache has every part: used as it is, without network.
            None if all_cached => None,
            None => self.listing(&settings, &gguf.repo_id).await?,
            cached => cached,
        };
        let revision = listing.as_ref().map_or(REVISION, |l| l.pinned_revision()).to_string();
        let headers: Vec<_> = parts
            .into_iter()
            .map(|path| self.gguf_part(&settings, gguf, listing.as_ref(), &revision, path, &target))
            .collect();
        let parts = futures::future::try_join_all(headers).await?;
        let tied = !parts.iter().any(|p| p.header.tensor_infos.contains_key("output.weight"));
        let mut plans = Vec::new();
        for part in &parts {
            let what = format!("{} of {}", part.remote.path, gguf.repo_id);
            let size = part.remote.size.unwrap_or_default();
            let needed = needed_ranges(&part.header, shard, tied, size, &what)?;
            let present = match recorded_ranges(&part.dest) {
                Some(present) => present.overlap(&needed),
                None => needed.total(),
            };
            plans.push((part, needed, present));
        }
        let initial: Vec<(String, u64, u64)> = plans
            .iter()
            .map(|(part, needed, present)| (part.remote.path.clone(), *present, needed.total()))
            .collect();
        let tracker =
            shard.map(|s| Mutex::new(ProgressTracker::new(s.clone(), &gguf.repo_id, &revision, &initial)));
        let tracker = tracker.as_ref();
        if let Some(tracker) = tracker {
            self.emit(tracker, false);
        }
        let fetches: Vec<_> = plans
            .iter()
            .map(|(part, needed, _)| {
                self.gguf_fill(&settings, gguf, &revision, &part.remote, &part.dest, needed, tracker)
            })
            .collect();
        let result = futures::future::try_join_all(fetches).await;
        if let Some(tracker) = tracker {
            self.emit(tracker, true);
        }
        result.map(|_| target.join(&gguf.path))
    }

    /// The part `path` of `gguf`, with its header.
    async fn gguf_part(
        &self,
        settings: &HubSettings,
        gguf: &GgufRef,
        listing: Option<&RepoListing>,
        revision: &str,
        path: String,
        target: &Path,
    ) -> Result<Part> {
        let remote = self.gguf_remote(settings, gguf, listing, &path, target).await?;
        let dest = target.join(&path);
        let header = self.gguf_header(settings, gguf, revision, &remote, &dest).await?;
        Ok(Part { remote, dest, header })
    }

    /// The listed part `path` with its size (from `HEAD` when the listing has none); without
    /// a listing (offline, or all in the Hugging Face cache), the local copy's or the cache's.
    async fn gguf_remote(
        &self,
        settings: &HubSettings,
        gguf: &GgufRef,
        listing: Option<&RepoListing>,
        path: &str,
        target: &Path,
    ) -> Result<RemoteFile> {
        let Some(listing) = listing else {
            let cached = hf_cache_snapshot(&gguf.repo_id, REVISION).map(|s| s.join(path));
            let local = [Some(target.join(path)), cached]
                .into_iter()
                .flatten()
                .find_map(|p| std::fs::metadata(p).ok());
            return match local {
                Some(meta) => {
                    Ok(RemoteFile { path: path.into(), size: Some(meta.len()), sha256: None, git_sha1: None })
                }
                None => Err(self.offline_error(&gguf.repo_id, path)),
            };
        };
        let mut remote = listing.file(path).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "{} has no file {path} (model {}/{})",
                gguf.repo_id, gguf.repo_id, gguf.path
            ))
        })?;
        if remote.size.is_none() {
            let head = self.hub.head(settings, &gguf.repo_id, listing.pinned_revision(), path).await?;
            remote.size = head.size;
            remote.sha256 = remote.sha256.or(head.sha256);
        }
        if remote.size.is_none() {
            return Err(Error::Download(format!(
                "the hub does not say how large {path} of {} is",
                gguf.repo_id
            )));
        }
        Ok(remote)
    }

    /// The header of one part: read from the whole file when it is here (linked from the
    /// Hugging Face cache if it is there), else fetched into the sparse file as needed.
    async fn gguf_header(
        &self,
        settings: &HubSettings,
        gguf: &GgufRef,
        revision: &str,
        remote: &RemoteFile,
        dest: &Path,
    ) -> Result<Content> {
        let _only_writer = self.file_locks.lock(&dest.to_path_buf()).await;
        let size = remote.size.unwrap_or_default();
        let what = format!("{} of {}", remote.path, gguf.repo_id);
        let cached = hf_cache_snapshot(&gguf.repo_id, revision).map(|s| s.join(&remote.path));
        let mut local = LocalFile::open(dest, size, remote.sha256.as_deref())?;
        if let (LocalFile::Partial(_), Some(cached)) =
            (&local, cached.filter(|c| cached_copy_matches(c, remote)))
        {
            link_or_copy(&cached, dest)?;
            let _ = std::fs::remove_file(record_path(dest));
            local = LocalFile::Complete;
        }
        let mut sparse = match local {
            LocalFile::Complete => return read_local_header(dest).await,
            LocalFile::Partial(sparse) => sparse,
        };
        let mut want = FIRST_HEADER_BYTES.max(sparse.present().prefix_end()).min(size);
        loop {
            let have = sparse.present().prefix_end();
            if have < want {
                if settings.offline {
                    return Err(self.offline_error(&gguf.repo_id, &remote.path));
                }
                self.hub
                    .fetch_range(settings, &gguf.repo_id, revision, remote, have..want, &mut sparse, &|_| {})
                    .await?;
            }
            let prefix = sparse.read(0..want).await?;
            let label = what.clone();
            let parsed = tokio::task::spawn_blocking(move || parse_header(&prefix, size, &label))
                .await
                .map_err(|e| Error::Download(format!("reading a GGUF header stopped: {e}")))??;
            match parsed {
                Some(content) => return Ok(content),
                None if want < size => want = want.saturating_mul(4).min(size),
                None => return Err(Error::InvalidModel(format!("{what}: its header runs past its end"))),
            }
        }
    }

    /// Fetches the bytes of `needed` that `dest` lacks; a part whose every byte is then present
    /// is checked against the hub's hash and kept as a whole file.
    #[allow(clippy::too_many_arguments)]
    async fn gguf_fill(
        &self,
        settings: &HubSettings,
        gguf: &GgufRef,
        revision: &str,
        remote: &RemoteFile,
        dest: &Path,
        needed: &ByteRanges,
        tracker: Option<&Mutex<ProgressTracker>>,
    ) -> Result<()> {
        let _only_writer = self.file_locks.lock(&dest.to_path_buf()).await;
        let report = |bytes: u64| {
            if let Some(tracker) = tracker {
                tracker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .update(&remote.path, bytes.min(needed.total()));
                self.emit(tracker, false);
            }
        };
        let size = remote.size.unwrap_or_default();
        let mut sparse = match LocalFile::open(dest, size, remote.sha256.as_deref())? {
            LocalFile::Complete => {
                report(needed.total());
                return Ok(());
            }
            LocalFile::Partial(sparse) => sparse,
        };
        let missing = sparse.present().missing(needed);
        if missing.total() > 0 && settings.offline {
            return Err(self.offline_error(&gguf.repo_id, &remote.path));
        }
        for run in missing.bridged(BRIDGED_GAP) {
            let _permit = self
                .parallel
                .acquire()
                .await
                .map_err(|_| Error::Download("the downloader is shutting down".into()))?;
            let before = sparse.present().overlap(needed);
            let on_bytes = |n: u64| report(before + n);
            self.hub
                .fetch_range(settings, &gguf.repo_id, revision, remote, run, &mut sparse, &on_bytes)
                .await?;
        }
        report(sparse.present().overlap(needed));
        if !sparse.is_complete() {
            return Ok(());
        }
        let what = format!("{} of {}", remote.path, gguf.repo_id);
        if let Err(error) = verify(remote, sparse.path(), sparse.path(), &what).await {
            sparse.discard();
            return Err(error);
        }
        sparse.finish()
    }

    /// What is present of a GGUF model's parts: `(path, bytes present, size)` each.
    pub(super) fn gguf_status(
        &self,
        gguf: &GgufRef,
        listing: Option<&RepoListing>,
    ) -> Result<Vec<(String, u64, u64)>> {
        let target = self.repo_dir(&gguf.repo_id);
        let parts = gguf.parts()?;
        Ok(parts
            .into_iter()
            .map(|path| {
                let dest = target.join(&path);
                let present = present_bytes(&dest);
                let size = listing.and_then(|l| l.file(&path)).and_then(|f| f.size).unwrap_or(present);
                (path, present.min(size), size)
            })
            .collect())
    }
}

/// For a repository of GGUF files named without one: how to name them, with the GGUF files
/// (split ones by their first part) it holds; empty for other repositories.
pub(super) fn gguf_hint(listing: &RepoListing) -> String {
    let files: Vec<&str> = listing
        .files
        .iter()
        .map(|f| f.path.as_str())
        .filter(|path| GgufRef::parse(&format!("{}/{path}", listing.repo_id)).is_some())
        .filter(|path| gguf_part_names(Path::new(path)).is_ok())
        .collect();
    if files.is_empty() {
        return String::new();
    }
    format!(
        "; it holds GGUF files, name one as the model id ({}/FILE.gguf): {}",
        listing.repo_id,
        files.join(", ")
    )
}

/// Deletes the downloaded parts of `gguf` (and their records) from `home`; false when none
/// were there. Other files of the repository (other quantizations) stay.
pub(super) fn delete_gguf(home: &Path, gguf: &GgufRef) -> Result<bool> {
    let target = home.join(super::layout::repo_dir_name(&gguf.repo_id));
    let mut deleted = false;
    for path in gguf.parts()? {
        let dest = target.join(path);
        for file in [record_path(&dest), dest] {
            match std::fs::remove_file(&file) {
                Ok(()) => deleted = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Download(format!("cannot delete {}: {e}", file.display()))),
            }
        }
    }
    Ok(deleted)
}

/// The header of a whole local GGUF file.
async fn read_local_header(path: &Path) -> Result<Content> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)
            .map_err(|e| Error::InvalidModel(format!("cannot open {}: {e}", path.display())))?;
        read_gguf_header(&mut file)
            .map_err(|e| Error::InvalidModel(format!("{} is not a readable GGUF file: {e}", path.display())))
    })
    .await
    .map_err(|e| Error::Download(format!("reading a GGUF header stopped: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A GGUF of `layers` layers of one 32x32 Q8_0 matrix each, with embeddings and a norm.
    fn write_gguf(layers: usize, head: bool) -> Vec<u8> {
        let matrix = |seed: f32| {
            let values: Vec<f32> = (0..32 * 32).map(|i| (i as f32 * 0.01 + seed).sin()).collect();
            QTensor::quantize(&Tensor::from_vec(values, (32, 32), &Device::Cpu).unwrap(), GgmlDType::Q8_0)
                .unwrap()
        };
        let mut tensors = vec![("token_embd.weight".to_string(), matrix(0.5))];
        for layer in 0..layers {
            tensors.push((format!("blk.{layer}.ffn_down.weight"), matrix(layer as f32)));
        }
        let norm = Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap();
        tensors.push(("output_norm.weight".into(), QTensor::quantize(&norm, GgmlDType::F32).unwrap()));
        if head {
            tensors.push(("output.weight".into(), matrix(9.0)));
        }
        let vocab = Value::Array((0..300).map(|i| Value::String(format!("token-{i}"))).collect());
        let metadata =
            [("general.architecture", Value::String("llama".into())), ("tokenizer.ggml.tokens", vocab)];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &metadata, &tensors).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn gguf_ids_name_a_file_of_a_repository() {
        let gguf = GgufRef::parse("org/m-GGUF/m-Q8_0-00001-of-00003.gguf").unwrap();
        assert_eq!(gguf.repo_id, "org/m-GGUF");
        assert_eq!(gguf.parts().unwrap()[2], "m-Q8_0-00003-of-00003.gguf");
        assert!(GgufRef::parse("org/m-GGUF/m-Q8_0-00002-of-00003.gguf").unwrap().parts().is_err());
        assert_eq!(GgufRef::parse("org/m/sub/m.gguf").unwrap().parts().unwrap(), ["sub/m.gguf"]);
        assert!(GgufRef::parse("org/m").is_none());
    }

    #[test]
    fn a_header_parses_once_enough_of_the_file_is_at_hand() {
        let bytes = write_gguf(4, true);
        let size = bytes.len() as u64;
        assert!(parse_header(&bytes[..100], size, "m").unwrap().is_none());
        let content = parse_header(&bytes, size, "m").unwrap().unwrap();
        let header = content.tensor_data_offset as usize;
        assert!(parse_header(&bytes[..header], size, "m").unwrap().is_some());
        assert_eq!(content.tensor_infos.len(), 7);
        let mut garbage = bytes.clone();
        garbage[..4].copy_from_slice(b"NOPE");
        assert!(matches!(parse_header(&garbage, size, "m"), Err(Error::InvalidModel(_))));
    }

    #[test]
    fn a_shard_needs_the_header_and_its_tensors() {
        let bytes = write_gguf(4, false);
        let size = bytes.len() as u64;
        let content = parse_header(&bytes, size, "m").unwrap().unwrap();
        let range = |name: &str| gguf_tensor_range(&content, name, &content.tensor_infos[name]).unwrap();
        let needed = |shard: Option<&Shard>| needed_ranges(&content, shard, true, size, "m").unwrap();
        let last = needed(Some(&Shard::new("m", 2, 3, 4)));
        for name in
            ["blk.2.ffn_down.weight", "blk.3.ffn_down.weight", "output_norm.weight", "token_embd.weight"]
        {
            assert!(last.covers(&range(name)), "{name}");
        }
        assert!(last.covers(&(0..content.tensor_data_offset)));
        assert!(!last.covers(&range("blk.1.ffn_down.weight")));
        let first = needed(Some(&Shard::new("m", 0, 1, 4)));
        assert!(first.covers(&range("token_embd.weight")) && !first.covers(&range("output_norm.weight")));
        assert!(!first.covers(&range("blk.2.ffn_down.weight")));
        let metadata = needed(None);
        assert_eq!(metadata, ByteRanges::from(vec![(0, content.tensor_data_offset)]));
        // Untied: the last shard leaves the embeddings alone.
        let untied = needed_ranges(&content, Some(&Shard::new("m", 2, 3, 4)), false, size, "m").unwrap();
        assert!(!untied.covers(&range("token_embd.weight")));
        // A header whose tensors lie past the file's end is refused.
        let error = needed_ranges(&content, None, true, size - 1, "m").unwrap_err().to_string();
        assert!(error.contains("past the end"), "{error}");
    }
}
