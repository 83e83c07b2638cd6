//! Where model files live: exo's downloads directory (`$EXO_HOME/downloads`, one `org--name`
//! directory per repository, as exo classic lays it out), the Hugging Face hub cache that is reused, and
//! the settings read from the environment (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The public hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

fn home_dir() -> PathBuf {
    let var = if cfg!(windows) { "USERPROFILE" } else { "HOME" };
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// exo's home, as in classic: `$EXO_HOME`, default `~/.cache/exo`.
pub fn exo_home() -> PathBuf {
    env_path("EXO_HOME").unwrap_or_else(|| home_dir().join(".cache").join("exo"))
}

/// exo's downloads directory, as in classic: `downloads` in exo's home.
pub fn downloads_dir() -> PathBuf {
    exo_home().join("downloads")
}

/// The directory name of a repository in exo's layout (`org/name` → `org--name`).
pub fn repo_dir_name(repo_id: &str) -> String {
    repo_id.replace('/', "--")
}

/// Hugging Face's home: `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    env_path("HF_HOME").unwrap_or_else(|| {
        env_path("XDG_CACHE_HOME").unwrap_or_else(|| home_dir().join(".cache")).join("huggingface")
    })
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`.
pub fn hf_hub_cache() -> PathBuf {
    env_path("HF_HUB_CACHE").unwrap_or_else(|| hf_home().join("hub"))
}

/// How to reach the hub, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Base URL without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Bearer token (`HF_TOKEN`, else the file `HF_TOKEN_PATH` or `$HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` is set: use local files only.
    pub offline: bool,
}

impl HubSettings {
    /// The settings the environment gives now.
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = std::env::var("HF_TOKEN").ok().or_else(|| {
            let path = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home().join("token"));
            std::fs::read_to_string(path).ok()
        });
        let token = token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
            .unwrap_or(false);
        Self { endpoint, token, offline }
    }
}

/// The snapshot directory of `repo_id` in the hub cache: the one `revision` names (a commit,
/// or a ref such as `main` resolved through `refs/`), else the most recently written one.
pub fn hf_cache_snapshot(repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = hf_hub_cache().join(format!("models--{}", repo_dir_name(repo_id)));
    let snapshots = repo_dir.join("snapshots");
    let by_name = |name: &str| Some(snapshots.join(name)).filter(|p| p.is_dir());
    if let Some(dir) = by_name(revision) {
        return Some(dir);
    }
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok();
    if let Some(dir) = commit.and_then(|c| by_name(c.trim())) {
        return Some(dir);
    }
    newest_subdir(&snapshots)
}

fn newest_subdir(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> Error {
    Error::Download(format!("cannot {what} {}: {error}", path.display()))
}

/// Puts the file `source` (symlinks followed) at `dest` without copying where possible: a
/// hard link, else a symbolic link, else a copy; written aside and renamed into place.
pub fn link_or_copy(source: &Path, dest: &Path) -> Result<()> {
    let source = source.canonicalize().map_err(|e| io_error("resolve", source, e))?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
    }
    let aside = dest.with_file_name(format!(
        ".{}.linking",
        dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&aside);
    let linked = std::fs::hard_link(&source, &aside).is_ok() || symlink(&source, &aside).is_ok();
    if !linked {
        std::fs::copy(&source, &aside).map_err(|e| io_error("copy", &source, e))?;
    }
    std::fs::rename(&aside, dest).map_err(|e| io_error("rename into", dest, e))
}

#[cfg(unix)]
fn symlink(source: &Path, dest: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(source, dest)
}

#[cfg(not(unix))]
fn symlink(source: &Path, dest: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(source, dest)
}

/// Top-level regular files of `dir` (symlinks followed), sorted by name.
pub fn top_level_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && !n.ends_with(".partial"))
        .collect();
    names.sort();
    names
}

/// Makes models in `seed_dir` available in `home` without network: each subdirectory in
/// exo's layout (`org--name`) or the hub cache's (`models--org--name/snapshots/…`) has its
/// files linked (or copied) into `home/org--name`; files already there are kept. Returns the
/// repository directories seeded.
pub fn seed_models(seed_dir: &Path, home: &Path) -> Result<Vec<String>> {
    let entries =
        std::fs::read_dir(seed_dir).map_err(|e| io_error("read the seed directory", seed_dir, e))?;
    let mut seeded = Vec::new();
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        let (repo_dir, files_dir) = match name.strip_prefix("models--") {
            Some(rest) => {
                let refs = std::fs::read_to_string(dir.join("refs").join("main")).ok();
                let by_ref = refs.map(|c| dir.join("snapshots").join(c.trim())).filter(|p| p.is_dir());
                match by_ref.or_else(|| newest_subdir(&dir.join("snapshots"))) {
                    Some(snapshot) => (rest.to_string(), snapshot),
                    None => continue,
                }
            }
            None if name.contains("--") => (name.clone(), dir.clone()),
            None => continue,
        };
        let files = top_level_files(&files_dir);
        if files.is_empty() {
            continue;
        }
        let dest = home.join(&repo_dir);
        for file in files {
            if !dest.join(&file).exists() {
                link_or_copy(&files_dir.join(&file), &dest.join(&file))?;
            }
        }
        seeded.push(repo_dir);
    }
    Ok(seeded)
}

/// Deletes the downloaded files of `repo_id` from `home`; false when there were none.
pub fn delete_repo(home: &Path, repo_id: &str) -> Result<bool> {
    let dir = home.join(repo_dir_name(repo_id));
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&dir).map_err(|e| io_error("delete", &dir, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_map_to_classic_directory_names() {
        assert_eq!(repo_dir_name("unsloth/Llama-3.2-1B-Instruct"), "unsloth--Llama-3.2-1B-Instruct");
        assert_eq!(repo_dir_name("dummy"), "dummy");
    }

    #[test]
    fn seeding_links_both_layouts_and_keeps_existing_files() {
        let seed = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let plain = seed.path().join("org--plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("config.json"), "{\"a\": 1}").unwrap();
        let cached = seed.path().join("models--org--cached");
        let snapshot = cached.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(cached.join("refs")).unwrap();
        std::fs::write(cached.join("refs").join("main"), "abc123\n").unwrap();
        std::fs::write(snapshot.join("tokenizer.json"), "{}").unwrap();
        std::fs::create_dir_all(seed.path().join("not-a-model")).unwrap();
        std::fs::create_dir_all(home.path().join("org--plain")).unwrap();
        std::fs::write(home.path().join("org--plain").join("config.json"), "kept").unwrap();

        let seeded = seed_models(seed.path(), home.path()).unwrap();
        assert_eq!(seeded, ["org--cached", "org--plain"]);
        let read = |p: &str| std::fs::read_to_string(home.path().join(p)).unwrap();
        assert_eq!(read("org--cached/tokenizer.json"), "{}");
        assert_eq!(read("org--plain/config.json"), "kept");
        assert!(!home.path().join("not-a-model").exists());
    }

    #[test]
    fn deleting_a_repository_removes_its_directory_once() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("org--m")).unwrap();
        std::fs::write(home.path().join("org--m").join("config.json"), "{}").unwrap();
        assert!(delete_repo(home.path(), "org/m").unwrap());
        assert!(!delete_repo(home.path(), "org/m").unwrap());
    }
}
