//! Download progress as exo classic reports it (`RepoFileProgressEvent`, `RepoProgressEvent`):
//! bytes, totals, speed, ETA and status per file and per shard, and a throttle that keeps
//! broadcasts to a few a second per model.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::shard::Shard;

/// Where a file or a whole shard stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadStatus {
    /// Nothing fetched yet.
    NotStarted,
    /// Some bytes fetched.
    InProgress,
    /// Every byte present and verified.
    Complete,
}

impl DownloadStatus {
    /// Classic's string for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "not_started",
            Self::InProgress => "in_progress",
            Self::Complete => "complete",
        }
    }
}

/// One file's progress (classic's `RepoFileProgressEvent`).
#[derive(Debug, Clone, PartialEq)]
pub struct FileProgress {
    /// Path of the file in the repository.
    pub file_path: String,
    /// Bytes present locally.
    pub downloaded: u64,
    /// Bytes fetched by this run.
    pub downloaded_this_session: u64,
    /// Size of the file.
    pub total: u64,
    /// Bytes per second over this run.
    pub speed: f64,
    /// Seconds left at that speed (0 when unknown).
    pub eta_secs: f64,
    /// Where the file stands.
    pub status: DownloadStatus,
    /// When this run started on the file, in seconds since the Unix epoch.
    pub start_time: f64,
}

/// A shard's progress over all its files (classic's `RepoProgressEvent`).
#[derive(Debug, Clone, PartialEq)]
pub struct RepoProgress {
    /// The shard being fetched.
    pub shard: Shard,
    /// The repository.
    pub repo_id: String,
    /// The revision (branch or commit) fetched.
    pub repo_revision: String,
    /// Files whose bytes are all present.
    pub completed_files: usize,
    /// Files the shard needs.
    pub total_files: usize,
    /// Bytes present.
    pub downloaded_bytes: u64,
    /// Bytes fetched by this run.
    pub downloaded_bytes_this_session: u64,
    /// Bytes the shard needs.
    pub total_bytes: u64,
    /// Bytes per second over this run.
    pub overall_speed: f64,
    /// Seconds left at that speed.
    pub overall_eta_secs: f64,
    /// Per file, by path.
    pub file_progress: BTreeMap<String, FileProgress>,
    /// Complete when every file is; in progress when any is; else not started.
    pub status: DownloadStatus,
}

impl RepoProgress {
    /// Classic's `to_dict()` of the event (ETAs in seconds, the shard as its dict).
    pub fn to_json(&self) -> Value {
        let files: serde_json::Map<String, Value> = self
            .file_progress
            .iter()
            .map(|(path, f)| {
                let value = json!({
                    "repo_id": self.repo_id, "repo_revision": self.repo_revision, "file_path": f.file_path,
                    "downloaded": f.downloaded, "downloaded_this_session": f.downloaded_this_session,
                    "total": f.total, "speed": f.speed as u64, "eta": f.eta_secs,
                    "status": f.status.as_str(), "start_time": f.start_time,
                });
                (path.clone(), value)
            })
            .collect();
        json!({
            "shard": {"model_id": self.shard.model_id, "start_layer": self.shard.start_layer,
                      "end_layer": self.shard.end_layer, "n_layers": self.shard.n_layers},
            "repo_id": self.repo_id, "repo_revision": self.repo_revision,
            "completed_files": self.completed_files, "total_files": self.total_files,
            "downloaded_bytes": self.downloaded_bytes,
            "downloaded_bytes_this_session": self.downloaded_bytes_this_session,
            "total_bytes": self.total_bytes, "overall_speed": self.overall_speed as u64,
            "overall_eta": self.overall_eta_secs, "file_progress": files, "status": self.status.as_str(),
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Debug, Clone)]
struct FileState {
    downloaded: u64,
    this_session: u64,
    total: u64,
    started: Instant,
    start_time: f64,
}

/// Accumulates the progress of one shard's files during a run.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    shard: Shard,
    repo_id: String,
    revision: String,
    started: Instant,
    files: BTreeMap<String, FileState>,
}

impl ProgressTracker {
    /// A run over `files` (path, bytes already present, size).
    pub fn new(shard: Shard, repo_id: &str, revision: &str, files: &[(String, u64, u64)]) -> Self {
        let (started, start_time) = (Instant::now(), unix_now());
        let files = files
            .iter()
            .map(|(path, present, total)| {
                let state =
                    FileState { downloaded: *present, this_session: 0, total: *total, started, start_time };
                (path.clone(), state)
            })
            .collect();
        Self { shard, repo_id: repo_id.into(), revision: revision.into(), started, files }
    }

    /// The shard being tracked.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Records that `path` now has `downloaded` bytes present (fewer when a bad partial
    /// file was discarded).
    pub fn update(&mut self, path: &str, downloaded: u64) {
        if let Some(file) = self.files.get_mut(path) {
            file.this_session += downloaded.saturating_sub(file.downloaded);
            file.downloaded = downloaded;
        }
    }

    /// The progress event as of `now`.
    pub fn snapshot(&self, now: Instant) -> RepoProgress {
        let rate = |bytes: u64, since: Instant| {
            let elapsed = now.saturating_duration_since(since).as_secs_f64();
            if elapsed > 0.0 {
                bytes as f64 / elapsed
            } else {
                0.0
            }
        };
        let eta = |left: u64, speed: f64| if speed > 0.0 { left as f64 / speed } else { 0.0 };
        let file_progress: BTreeMap<String, FileProgress> = self
            .files
            .iter()
            .map(|(path, f)| {
                let speed = rate(f.this_session, f.started);
                let status = match f.downloaded {
                    d if d >= f.total => DownloadStatus::Complete,
                    0 => DownloadStatus::NotStarted,
                    _ => DownloadStatus::InProgress,
                };
                let progress = FileProgress {
                    file_path: path.clone(),
                    downloaded: f.downloaded,
                    downloaded_this_session: f.this_session,
                    total: f.total,
                    speed,
                    eta_secs: eta(f.total.saturating_sub(f.downloaded), speed),
                    status,
                    start_time: f.start_time,
                };
                (path.clone(), progress)
            })
            .collect();
        let total_bytes: u64 = file_progress.values().map(|f| f.total).sum();
        let downloaded_bytes: u64 = file_progress.values().map(|f| f.downloaded).sum();
        let this_session: u64 = file_progress.values().map(|f| f.downloaded_this_session).sum();
        let overall_speed = rate(this_session, self.started);
        let statuses = || file_progress.values().map(|f| f.status);
        let status = if statuses().all(|s| s == DownloadStatus::Complete) {
            DownloadStatus::Complete
        } else if statuses().any(|s| s != DownloadStatus::NotStarted) {
            DownloadStatus::InProgress
        } else {
            DownloadStatus::NotStarted
        };
        RepoProgress {
            shard: self.shard.clone(),
            repo_id: self.repo_id.clone(),
            repo_revision: self.revision.clone(),
            completed_files: statuses().filter(|s| *s == DownloadStatus::Complete).count(),
            total_files: file_progress.len(),
            downloaded_bytes,
            downloaded_bytes_this_session: this_session,
            total_bytes,
            overall_speed,
            overall_eta_secs: eta(total_bytes.saturating_sub(downloaded_bytes), overall_speed),
            file_progress,
            status,
        }
    }
}

/// Lets through at most one event per `interval` per key; final events always pass.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: HashMap<String, Instant>,
}

impl Throttle {
    /// A throttle passing one event per `interval` per key.
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: HashMap::new() }
    }

    /// Whether the event for `key` at `now` goes out (and records it if so).
    pub fn allow(&mut self, key: &str, now: Instant, is_final: bool) -> bool {
        let due = self.last.get(key).is_none_or(|last| now.saturating_duration_since(*last) >= self.interval);
        if due || is_final {
            self.last.insert(key.to_string(), now);
        }
        due || is_final
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_passes_one_event_per_interval_per_model_and_every_final_one() {
        let mut throttle = Throttle::new(Duration::from_millis(200));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(throttle.allow("a", at(0), false));
        assert!(!throttle.allow("a", at(50), false));
        assert!(throttle.allow("b", at(50), false));
        assert!(!throttle.allow("a", at(199), false));
        assert!(throttle.allow("a", at(200), false));
        assert!(throttle.allow("a", at(210), true));
        assert!(!throttle.allow("a", at(300), false));
        let passed = (0..1000).filter(|ms| throttle.allow("c", at(1000 + ms), false)).count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn progress_sums_files_and_derives_status() {
        let files = [("a".to_string(), 10, 10), ("b".to_string(), 0, 30)];
        let mut tracker = ProgressTracker::new(Shard::new("m", 0, 1, 2), "org/m", "main", &files);
        let first = tracker.snapshot(Instant::now());
        assert_eq!(first.status, DownloadStatus::InProgress);
        assert_eq!((first.completed_files, first.total_files), (1, 2));
        assert_eq!(
            (first.downloaded_bytes, first.total_bytes, first.downloaded_bytes_this_session),
            (10, 40, 0)
        );
        tracker.update("b", 12);
        tracker.update("b", 30);
        let done = tracker.snapshot(Instant::now() + Duration::from_secs(1));
        assert_eq!(done.status, DownloadStatus::Complete);
        assert_eq!(done.downloaded_bytes_this_session, 30);
        assert_eq!(done.file_progress["b"].status, DownloadStatus::Complete);
        assert!(done.overall_speed > 0.0);
        let dict = done.to_json();
        assert_eq!(dict["status"], "complete");
        assert_eq!(dict["file_progress"]["b"]["downloaded"], 30);
        assert_eq!(dict["shard"]["n_layers"], 2);
    }

    #[test]
    fn nothing_present_is_not_started() {
        let files = [("a".to_string(), 0, 10)];
        let tracker = ProgressTracker::new(Shard::new("m", 0, 0, 1), "org/m", "main", &files);
        assert_eq!(tracker.snapshot(Instant::now()).status, DownloadStatus::NotStarted);
    }
}
