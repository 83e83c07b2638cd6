//! Shard downloads from the Hugging Face hub: each node fetches only the files its layers
//! need (of a GGUF, only their byte ranges), in parallel, resumably and verified, into exo's
//! downloads directory, reusing the Hugging Face cache, local model directories and seeded
//! copies without network.

pub mod gguf;
pub mod hub;
pub mod layout;
pub mod progress;
pub mod ranges;
pub mod selection;
pub mod sparse;

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::{OwnedMutexGuard, Semaphore};

use self::gguf::{delete_gguf, gguf_hint, GgufRef};
use self::hub::{partial_path, HubClient, RemoteFile, RepoListing};
use self::layout::{
    hf_cache_snapshot, hf_hub_cache, link_or_copy, repo_dir_name, top_level_files, HubSettings,
};
use self::progress::{ProgressTracker, RepoProgress, Throttle};
use self::selection::{
    config_layers, config_ties_embeddings, is_metadata_file, is_weights_file, WeightMap, CONFIG_FILE,
    INDEX_FILE, SINGLE_WEIGHTS_FILE,
};
use crate::engine::candle::{gguf_files, model_config};
use crate::engine::ModelLocator;
use crate::error::{Error, Result};
use crate::models::{self, engine_class, is_local_model, model_card, require_repo};
use crate::shard::Shard;

/// The revision every repository is fetched at.
pub const REVISION: &str = "main";
/// Progress events per model are at least this far apart (the last one always goes out).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Directory under the downloads directory holding cached repository listings.
const LISTINGS_DIR: &str = ".listings";

/// Receives progress events of shard downloads.
pub type ProgressListener = Arc<dyn Fn(RepoProgress) + Send + Sync>;

/// How a downloader is set up.
#[derive(Debug, Clone)]
pub struct DownloaderOptions {
    /// Files fetched at the same time, over all shards.
    pub max_parallel_downloads: usize,
    /// Downloads directory; `None` reads `EXO_HOME` at each call (its `downloads` directory).
    pub home: Option<PathBuf>,
}

impl Default for DownloaderOptions {
    fn default() -> Self {
        Self { max_parallel_downloads: 8, home: None }
    }
}

/// One async mutex per key, created on first use.
struct KeyedLocks<K>(Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>);

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    async fn lock(&self, key: &K) -> OwnedMutexGuard<()> {
        let mutex = self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        mutex.lock_owned().await
    }
}

/// Why a directory cannot serve a shard: the first file it lacks.
type Missing = String;

/// The files of `dir` that serve `shard` (config, tokenizer, metadata, the shard's weights),
/// or the first needed file it lacks.
fn local_shard_files(dir: &Path, shard: &Shard) -> std::result::Result<Vec<String>, Missing> {
    let present = |name: &str| dir.join(name).is_file();
    if !present(CONFIG_FILE) {
        if let Ok(Some(parts)) = gguf_files(dir) {
            // A GGUF file, or a directory holding one: its parts, by their full paths.
            return Ok(parts.iter().map(|p| p.display().to_string()).collect());
        }
    }
    if !present(CONFIG_FILE) {
        return Err(CONFIG_FILE.into());
    }
    if !present("tokenizer.json") && !present("tokenizer_config.json") {
        return Err("tokenizer.json".into());
    }
    let weights: Vec<String> = if present(INDEX_FILE) {
        let index = std::fs::read_to_string(dir.join(INDEX_FILE)).map_err(|_| INDEX_FILE.to_string())?;
        let map = WeightMap::parse(&index, INDEX_FILE).map_err(|_| INDEX_FILE.to_string())?;
        let tied =
            map.head_is_tied(read_json(&dir.join(CONFIG_FILE)).is_ok_and(|c| config_ties_embeddings(&c)));
        map.files_for(shard, tied).into_iter().collect()
    } else {
        vec![SINGLE_WEIGHTS_FILE.to_string()]
    };
    if let Some(missing) = weights.iter().find(|w| !present(w)) {
        return Err(missing.clone());
    }
    let mut files: Vec<String> = top_level_files(dir).into_iter().filter(|f| is_metadata_file(f)).collect();
    files.extend(weights);
    Ok(files)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidModel(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::InvalidModel(format!("{} is not valid JSON: {e}", path.display())))
}

/// Bytes of a file present locally: the finished file, else its `.partial`.
fn present_bytes(dest: &Path) -> u64 {
    std::fs::metadata(dest).or_else(|_| std::fs::metadata(partial_path(dest))).map_or(0, |m| m.len())
}

/// Whether the file a hub-cache snapshot entry resolves to is the listed one: same size, and
/// where the cache names the blob by its SHA-256, the same hash.
fn cached_copy_matches(cached: &Path, file: &RemoteFile) -> bool {
    let Ok(meta) = std::fs::metadata(cached) else { return false };
    if !meta.is_file() || file.size.is_some_and(|s| s != meta.len()) {
        return false;
    }
    let blob =
        cached.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match (&file.sha256, blob) {
        (Some(sha), Some(blob)) if blob.len() == 64 => blob.eq_ignore_ascii_case(sha),
        _ => true,
    }
}

/// The metadata files and every weights file of a listing: what a whole model needs.
fn whole_model_files(listing: &RepoListing, engine: &str) -> Vec<RemoteFile> {
    // RKLLM's weights are on its server: the node fetches only the tokenizer and config.
    let weights = |path: &str| engine != models::RKLLM && is_weights_file(path);
    listing.files.iter().filter(|f| is_metadata_file(&f.path) || weights(&f.path)).cloned().collect()
}

/// Where the listing of `repo_id` is cached.
fn listing_path(home: &Path, repo_id: &str) -> PathBuf {
    home.join(LISTINGS_DIR).join(format!("{}--{REVISION}.json", repo_dir_name(repo_id)))
}

/// Downloads shards of Hugging Face repositories into exo's layout (`org--name` directories).
pub struct HfDownloader {
    hub: HubClient,
    options: DownloaderOptions,
    parallel: Arc<Semaphore>,
    shard_locks: KeyedLocks<(String, Shard)>,
    file_locks: KeyedLocks<PathBuf>,
    ready: Mutex<HashMap<(String, Shard), PathBuf>>,
    listener: Option<ProgressListener>,
    throttle: Mutex<Throttle>,
}

impl HfDownloader {
    /// A downloader; `listener` receives throttled progress events.
    pub fn new(options: DownloaderOptions, listener: Option<ProgressListener>) -> Result<Self> {
        if options.max_parallel_downloads == 0 {
            return Err(Error::InvalidArgument("max_parallel_downloads must be at least 1".into()));
        }
        Ok(Self {
            hub: HubClient::new()?,
            parallel: Arc::new(Semaphore::new(options.max_parallel_downloads)),
            options,
            shard_locks: KeyedLocks::new(),
            file_locks: KeyedLocks::new(),
            ready: Mutex::new(HashMap::new()),
            listener,
            throttle: Mutex::new(Throttle::new(PROGRESS_INTERVAL)),
        })
    }

    /// The downloads directory.
    pub fn home(&self) -> PathBuf {
        self.options.home.clone().unwrap_or_else(layout::downloads_dir)
    }

    /// The directory that holds (or will hold) `repo_id`'s files.
    pub fn repo_dir(&self, repo_id: &str) -> PathBuf {
        self.home().join(repo_dir_name(repo_id))
    }

    /// Makes the files `shard` needs for `engine` (a class or short name) present locally and
    /// returns their directory. A local model directory is used as is; concurrent calls for
    /// one shard download once.
    pub async fn ensure_shard(&self, shard: &Shard, engine: &str) -> Result<PathBuf> {
        shard.validate()?;
        let engine = engine_class(engine);
        if engine == models::DUMMY {
            return Ok(self.home().join("dummy"));
        }
        let repo = require_repo(&shard.model_id, engine)?;
        if is_local_model(&repo) {
            return Ok(PathBuf::from(repo));
        }
        if engine == models::RKLLM {
            // The weights are on the RKLLAMA server; the node needs only the tokenizer.
            return self.ensure_repo_metadata(&repo).await;
        }
        let key = (engine.to_string(), shard.clone());
        let _one_at_a_time = self.shard_locks.lock(&key).await;
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        if let Some(dir) = ready.filter(|d| d.join(CONFIG_FILE).is_file() || d.is_file()) {
            return Ok(dir);
        }
        let dir = match GgufRef::parse(&repo) {
            Some(gguf) => self.ensure_gguf(&gguf, Some(shard)).await?,
            None => self.fetch_shard(&repo, shard).await?,
        };
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).insert(key, dir.clone());
        Ok(dir)
    }

    fn listing_path(&self, repo_id: &str) -> PathBuf {
        listing_path(&self.home(), repo_id)
    }

    fn cached_listing(&self, repo_id: &str) -> Option<RepoListing> {
        let text = std::fs::read_to_string(self.listing_path(repo_id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The repository's listing: cached, else from the hub (and cached); None offline.
    async fn listing(&self, settings: &HubSettings, repo_id: &str) -> Result<Option<RepoListing>> {
        if let Some(listing) = self.cached_listing(repo_id) {
            return Ok(Some(listing));
        }
        if settings.offline {
            return Ok(None);
        }
        let listing = self.hub.list(settings, repo_id, REVISION).await?;
        let path = self.listing_path(repo_id);
        let text = serde_json::to_string(&listing).map_err(|e| Error::Download(e.to_string()))?;
        let aside = path.with_extension("json.partial");
        let written = std::fs::create_dir_all(path.parent().unwrap_or(&path))
            .and_then(|_| std::fs::write(&aside, text))
            .and_then(|_| std::fs::rename(&aside, &path));
        written.map_err(|e| Error::Download(format!("cannot write {}: {e}", path.display())))?;
        Ok(Some(listing))
    }

    fn offline_error(&self, repo_id: &str, file: &str) -> Error {
        Error::Offline(format!(
            "HF_HUB_OFFLINE is set and {file} of {repo_id} is neither in {} nor in the Hugging Face cache ({}); \
             download it while online or unset HF_HUB_OFFLINE",
            self.repo_dir(repo_id).display(),
            hf_hub_cache().display()
        ))
    }

    /// Links the files a complete hub-cache snapshot has for `shard` into `target`.
    fn take_from_hf_cache(&self, repo_id: &str, shard: &Shard, target: &Path) -> Result<bool> {
        let Some(snapshot) = hf_cache_snapshot(repo_id, REVISION) else { return Ok(false) };
        let Ok(files) = local_shard_files(&snapshot, shard) else { return Ok(false) };
        for file in files {
            if !target.join(&file).is_file() {
                link_or_copy(&snapshot.join(&file), &target.join(&file))?;
            }
        }
        Ok(true)
    }

    async fn fetch_shard(&self, repo_id: &str, shard: &Shard) -> Result<PathBuf> {
        let settings = HubSettings::from_env();
        let target = self.repo_dir(repo_id);
        let listing = match self.cached_listing(repo_id) {
            Some(listing) => listing,
            None => {
                if local_shard_files(&target, shard).is_ok()
                    || self.take_from_hf_cache(repo_id, shard, &target)?
                {
                    return Ok(target);
                }
                let Some(listing) = self.listing(&settings, repo_id).await? else {
                    let missing = local_shard_files(&target, shard).err().unwrap_or_default();
                    return Err(self.offline_error(repo_id, &missing));
                };
                listing
            }
        };
        let files = self.plan(&settings, &listing, shard, &target).await?;
        self.fetch_files(&settings, &listing, shard, &target, files).await?;
        Ok(target)
    }

    /// The listed files `shard` needs: metadata, and the weights files holding its tensors
    /// (read from the index, which is fetched first).
    async fn plan(
        &self,
        settings: &HubSettings,
        listing: &RepoListing,
        shard: &Shard,
        target: &Path,
    ) -> Result<Vec<RemoteFile>> {
        let repo = &listing.repo_id;
        let config = listing.file(CONFIG_FILE).ok_or_else(|| {
            Error::InvalidModel(format!("{repo} has no {CONFIG_FILE}{}", gguf_hint(listing)))
        })?;
        let whole = shard.start_layer == 0 && shard.is_last_layer();
        let weights: Vec<String> = match listing.file(INDEX_FILE) {
            Some(index) if !whole => {
                self.ensure_file(settings, listing, index, target, None).await?;
                self.ensure_file(settings, listing, config, target, None).await?;
                let text = std::fs::read_to_string(target.join(INDEX_FILE))
                    .map_err(|e| Error::Download(format!("cannot read {INDEX_FILE} of {repo}: {e}")))?;
                let map = WeightMap::parse(&text, &format!("{INDEX_FILE} of {repo}"))?;
                let tied = map.head_is_tied(config_ties_embeddings(&read_json(&target.join(CONFIG_FILE))?));
                map.files_for(shard, tied).into_iter().collect()
            }
            _ => listing.files.iter().filter(|f| is_weights_file(&f.path)).map(|f| f.path.clone()).collect(),
        };
        if weights.is_empty() {
            return Err(Error::InvalidModel(format!(
                "{repo} has no safetensors weights for layers {}..={} (only safetensors checkpoints are supported)",
                shard.start_layer, shard.end_layer
            )));
        }
        let mut files: Vec<RemoteFile> =
            listing.files.iter().filter(|f| is_metadata_file(&f.path)).cloned().collect();
        for weight in weights {
            let file = listing.file(&weight).ok_or_else(|| {
                Error::InvalidModel(format!(
                    "{INDEX_FILE} of {repo} names {weight}, which the repository does not have"
                ))
            })?;
            files.push(file.clone());
        }
        for file in files.iter_mut().filter(|f| f.size.is_none()) {
            if settings.offline {
                continue;
            }
            let head = self.hub.head(settings, repo, listing.pinned_revision(), &file.path).await?;
            file.size = head.size;
            file.sha256 = file.sha256.take().or(head.sha256);
            file.git_sha1 = file.git_sha1.take().or(head.git_sha1);
        }
        Ok(files)
    }

    /// Fetches `files` in parallel (at most `max_parallel_downloads` at once over the
    /// downloader), reporting progress of the shard.
    async fn fetch_files(
        &self,
        settings: &HubSettings,
        listing: &RepoListing,
        shard: &Shard,
        target: &Path,
        files: Vec<RemoteFile>,
    ) -> Result<()> {
        let initial: Vec<(String, u64, u64)> = files
            .iter()
            .map(|f| {
                let present = present_bytes(&target.join(&f.path));
                (f.path.clone(), present, f.size.unwrap_or(present))
            })
            .collect();
        let tracker = Mutex::new(ProgressTracker::new(
            shard.clone(),
            &listing.repo_id,
            listing.pinned_revision(),
            &initial,
        ));
        self.emit(&tracker, false);
        let downloads: Vec<_> = files
            .iter()
            .map(|file| self.ensure_file(settings, listing, file, target, Some(&tracker)))
            .collect();
        let result = futures::future::try_join_all(downloads).await;
        self.emit(&tracker, true);
        result.map(|_| ())
    }

    /// Sends the tracker's progress to the listener, throttled per model.
    fn emit(&self, tracker: &Mutex<ProgressTracker>, is_final: bool) {
        let Some(listener) = &self.listener else { return };
        let now = Instant::now();
        let event = {
            let tracker = tracker.lock().unwrap_or_else(|e| e.into_inner());
            let mut throttle = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
            if !throttle.allow(&tracker.shard().model_id, now, is_final) {
                return;
            }
            tracker.snapshot(now)
        };
        listener(event);
    }

    /// Makes one listed file present in `target`: already there with the listed size, linked
    /// from the hub cache, or downloaded.
    async fn ensure_file(
        &self,
        settings: &HubSettings,
        listing: &RepoListing,
        file: &RemoteFile,
        target: &Path,
        tracker: Option<&Mutex<ProgressTracker>>,
    ) -> Result<()> {
        let dest = target.join(&file.path);
        let _only_writer = self.file_locks.lock(&dest).await;
        let report = |bytes: u64| {
            if let Some(tracker) = tracker {
                tracker.lock().unwrap_or_else(|e| e.into_inner()).update(&file.path, bytes);
                self.emit(tracker, false);
            }
        };
        if let Ok(meta) = std::fs::metadata(&dest) {
            if file.size.is_none_or(|size| size == meta.len()) {
                report(meta.len());
                return Ok(());
            }
            std::fs::remove_file(&dest)
                .map_err(|e| Error::Download(format!("cannot replace {}: {e}", dest.display())))?;
        }
        let cached =
            hf_cache_snapshot(&listing.repo_id, listing.pinned_revision()).map(|s| s.join(&file.path));
        if let Some(cached) = cached.filter(|c| cached_copy_matches(c, file)) {
            link_or_copy(&cached, &dest)?;
            report(present_bytes(&dest));
            return Ok(());
        }
        if settings.offline {
            return Err(self.offline_error(&listing.repo_id, &file.path));
        }
        let _permit = self
            .parallel
            .acquire()
            .await
            .map_err(|_| Error::Download("the downloader is shutting down".into()))?;
        self.hub.download(settings, &listing.repo_id, listing.pinned_revision(), file, &dest, &report).await
    }

    /// Makes a model's configuration and tokenizer files present (no weights) and returns
    /// their directory (for a GGUF on the hub, the file, holding only its headers); `model_id`
    /// is a registry id, a Hugging Face repo id, a GGUF in one, or a local model.
    pub async fn ensure_metadata(&self, model_id: &str) -> Result<PathBuf> {
        let repo = require_repo(model_id, models::CANDLE)?;
        if is_local_model(&repo) {
            return Ok(PathBuf::from(repo));
        }
        if let Some(gguf) = GgufRef::parse(&repo) {
            return self.ensure_gguf(&gguf, None).await;
        }
        self.ensure_repo_metadata(&repo).await
    }

    /// Makes the configuration and tokenizer files of the hub repository `repo` present.
    async fn ensure_repo_metadata(&self, repo: &str) -> Result<PathBuf> {
        let target = self.repo_dir(repo);
        let has_metadata =
            |dir: &Path| dir.join(CONFIG_FILE).is_file() && dir.join("tokenizer.json").is_file();
        if has_metadata(&target) {
            return Ok(target);
        }
        if let Some(snapshot) = hf_cache_snapshot(repo, REVISION).filter(|s| has_metadata(s)) {
            for file in top_level_files(&snapshot).into_iter().filter(|f| is_metadata_file(f)) {
                if !target.join(&file).is_file() {
                    link_or_copy(&snapshot.join(&file), &target.join(&file))?;
                }
            }
            return Ok(target);
        }
        let settings = HubSettings::from_env();
        let Some(listing) = self.listing(&settings, repo).await? else {
            let missing = if target.join(CONFIG_FILE).is_file() { "tokenizer.json" } else { CONFIG_FILE };
            return Err(self.offline_error(repo, missing));
        };
        for file in listing.files.iter().filter(|f| is_metadata_file(&f.path)) {
            self.ensure_file(&settings, &listing, file, &target, None).await?;
        }
        Ok(target)
    }

    /// The number of layers of a model: the registry's, or read from its `config.json`
    /// (a local directory's, or fetched for a Hugging Face repo id).
    pub async fn model_layers(&self, model_id: &str, engine: &str) -> Result<i32> {
        let engine = engine_class(engine);
        if let Some(card) = model_card(model_id) {
            return require_repo(model_id, engine).map(|_| card.layers);
        }
        let dir = self.ensure_metadata(model_id).await?;
        if dir.is_file() {
            let config = tokio::task::spawn_blocking(move || model_config(&dir)).await.map_err(|e| {
                Error::InvalidModel(format!("reading the config of {model_id} stopped: {e}"))
            })??;
            return Ok(config.num_hidden_layers as i32);
        }
        let config = dir.join(CONFIG_FILE);
        config_layers(&read_json(&config)?, &config.display().to_string())
    }

    /// Where a shard of `model_id` stands locally, without downloading: its directory and
    /// progress (fetching the repository listing once if it is not cached and not offline).
    pub async fn shard_status(&self, shard: &Shard, engine: &str) -> Result<(PathBuf, RepoProgress)> {
        let engine = engine_class(engine);
        let repo = require_repo(&shard.model_id, engine)?;
        if engine == models::DUMMY {
            return Err(Error::InvalidModel("the dummy model has no files".into()));
        }
        let local = is_local_model(&repo);
        let gguf = if local { None } else { GgufRef::parse(&repo) };
        let repo_id = gguf.as_ref().map_or(repo.as_str(), |g| g.repo_id.as_str());
        let target = if local { PathBuf::from(&repo) } else { self.repo_dir(repo_id) };
        let settings = HubSettings::from_env();
        let listing = if local { None } else { self.listing(&settings, repo_id).await? };
        let files: Vec<(String, u64, u64)> = match (&gguf, &listing) {
            (Some(gguf), _) => self.gguf_status(gguf, listing.as_ref())?,
            (None, Some(listing)) => whole_model_files(listing, engine)
                .into_iter()
                .map(|f| {
                    let present = present_bytes(&target.join(&f.path));
                    let total = f.size.unwrap_or(present);
                    (f.path, present.min(total), total)
                })
                .collect(),
            (None, None) => local_shard_files(&target, shard)
                .map_err(|missing| self.offline_error(&repo, &missing))?
                .into_iter()
                .map(|f| {
                    let size = present_bytes(&target.join(&f));
                    (f, size, size)
                })
                .collect(),
        };
        let revision = listing.as_ref().map_or(REVISION, |l| l.pinned_revision());
        let tracker = ProgressTracker::new(shard.clone(), repo_id, revision, &files);
        Ok((target, tracker.snapshot(Instant::now())))
    }

    /// The status of every registry model `engine` supports, as each becomes known (models
    /// whose status cannot be determined, or with no bytes to fetch, are left out).
    pub fn download_statuses(
        self: Arc<Self>,
        engine: &str,
    ) -> impl Stream<Item = (PathBuf, RepoProgress)> + Send {
        let engine = engine_class(engine).to_string();
        let shards: Vec<Shard> = models::get_supported_models(&[vec![engine.clone()]])
            .into_iter()
            .filter_map(model_card)
            .map(|card| Shard::new(card.id, 0, card.layers - 1, card.layers))
            .collect();
        stream::iter(shards)
            .map(move |shard| {
                let (downloader, engine) = (self.clone(), engine.clone());
                async move { downloader.shard_status(&shard, &engine).await.ok() }
            })
            .buffer_unordered(8)
            .filter_map(|status| async move { status.filter(|(_, p)| p.total_bytes > 0) })
    }

    /// Deletes the downloaded files of `model_id` for `engine`; false when there were none.
    pub fn delete_model(&self, model_id: &str, engine: &str) -> Result<bool> {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, shard), _| shard.model_id != model_id);
        delete_model(&self.home(), model_id, engine)
    }
}

/// Deletes the files of `model_id` for `engine` downloaded to `home` (and its cached
/// listing); false when there were none. Local model directories are never deleted.
pub fn delete_model(home: &Path, model_id: &str, engine: &str) -> Result<bool> {
    let engine = engine_class(engine);
    let repo = require_repo(model_id, engine)?;
    if is_local_model(&repo) {
        return Err(Error::InvalidArgument(format!("{repo} is a local model directory, not a download")));
    }
    if let Some(gguf) = GgufRef::parse(&repo) {
        let _ = std::fs::remove_file(listing_path(home, &gguf.repo_id));
        return delete_gguf(home, &gguf);
    }
    let _ = std::fs::remove_file(listing_path(home, &repo));
    layout::delete_repo(home, &repo)
}

/// Finds a shard's files for an engine through an [`HfDownloader`].
pub struct DownloaderLocator {
    /// The downloader.
    pub downloader: Arc<HfDownloader>,
    /// The engine class name repositories are chosen for.
    pub engine: String,
}

#[async_trait]
impl ModelLocator for DownloaderLocator {
    async fn locate(&self, shard: &Shard) -> Result<PathBuf> {
        self.downloader.ensure_shard(shard, &self.engine).await
    }

    async fn locate_config(&self, model_id: &str) -> Option<PathBuf> {
        match self.downloader.ensure_metadata(model_id).await {
            Ok(dir) => Some(dir),
            Err(e) => {
                log::debug!("no config for {model_id} without its weights: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn a_local_directory_serves_a_shard_when_its_files_are_there() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shard = |s, e| Shard::new("m", s, e, 4);
        assert_eq!(local_shard_files(d, &shard(0, 1)).unwrap_err(), CONFIG_FILE);
        write(d, CONFIG_FILE, r#"{"num_hidden_layers": 4, "tie_word_embeddings": true}"#);
        assert_eq!(local_shard_files(d, &shard(0, 1)).unwrap_err(), "tokenizer.json");
        write(d, "tokenizer.json", "{}");
        let index = r#"{"weight_map": {"model.embed_tokens.weight": "a.safetensors",
            "model.layers.0.x": "a.safetensors", "model.layers.1.x": "a.safetensors",
            "model.layers.2.x": "b.safetensors", "model.layers.3.x": "b.safetensors",
            "model.norm.weight": "b.safetensors"}}"#;
        write(d, INDEX_FILE, index);
        write(d, "a.safetensors", "");
        let first = local_shard_files(d, &shard(0, 1)).unwrap();
        assert!(first.contains(&"a.safetensors".to_string()) && first.contains(&INDEX_FILE.to_string()));
        assert_eq!(local_shard_files(d, &shard(2, 3)).unwrap_err(), "b.safetensors");
        write(d, "b.safetensors", "");
        let last = local_shard_files(d, &shard(2, 3)).unwrap();
        assert!(
            last.contains(&"a.safetensors".to_string()),
            "tied head: the last shard needs the embeddings"
        );
    }

    #[test]
    fn a_single_file_checkpoint_serves_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), CONFIG_FILE, "{}");
        write(dir.path(), "tokenizer_config.json", "{}");
        assert_eq!(
            local_shard_files(dir.path(), &Shard::new("m", 0, 0, 2)).unwrap_err(),
            SINGLE_WEIGHTS_FILE
        );
        write(dir.path(), SINGLE_WEIGHTS_FILE, "");
        assert!(local_shard_files(dir.path(), &Shard::new("m", 1, 1, 2)).is_ok());
    }

    #[tokio::test]
    async fn registry_dummy_and_bad_models_resolve_without_network() {
        let home = tempfile::tempdir().unwrap();
        let options = DownloaderOptions { max_parallel_downloads: 2, home: Some(home.path().into()) };
        let downloader = HfDownloader::new(options, None).unwrap();
        assert_eq!(downloader.model_layers("llama-3.2-1b", "candle").await.unwrap(), 16);
        assert!(downloader.model_layers("deepseek-v3", "candle").await.is_err());
        let dummy =
            downloader.ensure_shard(&Shard::new("dummy", 0, 7, 8), "DummyInferenceEngine").await.unwrap();
        assert_eq!(dummy, home.path().join("dummy"));
        let unknown = downloader.ensure_shard(&Shard::new("no-such-model", 0, 0, 1), "candle").await;
        assert!(matches!(unknown, Err(Error::InvalidModel(_))));
        let bad_range = downloader.ensure_shard(&Shard::new("llama-3.2-1b", 3, 1, 16), "candle").await;
        assert!(matches!(bad_range, Err(Error::InvalidShard(_))));
        assert!(HfDownloader::new(DownloaderOptions { max_parallel_downloads: 0, home: None }, None).is_err());
    }
}
