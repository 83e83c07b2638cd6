//! The Hugging Face hub over HTTP: a repository's file listing (with sizes and hashes), file
//! metadata from `HEAD`, and resumable, verified downloads of single files or of byte ranges
//! of them.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::layout::HubSettings;
use super::sparse::SparseFile;
use crate::error::{Error, Result};

/// Attempts per file before a transient failure (connection, 5xx, cut body) is final.
const ATTEMPTS: u32 = 4;
/// Bytes gathered before each write to a partial file.
const WRITE_BUFFER: usize = 1 << 20;
/// Downloads whose bytes do not match the announced hash are retried this many times.
const INTEGRITY_RETRIES: u32 = 1;

/// One file of a repository as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFile {
    /// Path inside the repository.
    pub path: String,
    /// Size in bytes, when listed.
    pub size: Option<u64>,
    /// SHA-256 of the content (LFS files).
    pub sha256: Option<String>,
    /// Git blob id, the SHA-1 of `blob {size}\0` + content (plain files).
    pub git_sha1: Option<String>,
}

/// A repository's files at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoListing {
    /// The repository (`org/name`).
    pub repo_id: String,
    /// The revision asked for (`main`).
    pub revision: String,
    /// The commit the revision pointed to, when the hub said.
    pub commit: Option<String>,
    /// Every file.
    pub files: Vec<RemoteFile>,
}

impl RepoListing {
    /// The listed file at `path`.
    pub fn file(&self, path: &str) -> Option<&RemoteFile> {
        self.files.iter().find(|f| f.path == path)
    }

    /// The revision to fetch files at: the listed commit, so that every file comes from one commit.
    pub fn pinned_revision(&self) -> &str {
        self.commit.as_deref().unwrap_or(&self.revision)
    }
}

#[derive(Deserialize)]
struct ApiLfs {
    sha256: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct ApiSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiModelInfo {
    sha: Option<String>,
    siblings: Option<Vec<ApiSibling>>,
}

/// A failure, and whether trying again may help.
enum Failure {
    Retry(Error),
    Fatal(Error),
}

/// HTTP access to one hub endpoint.
#[derive(Debug, Clone)]
pub struct HubClient {
    client: reqwest::Client,
    no_redirect: reqwest::Client,
}

fn build_client(redirects: reqwest::redirect::Policy) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("xotorch-core/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .redirect(redirects)
        .build()
        .map_err(|e| Error::Download(format!("cannot set up the HTTP client: {e}")))
}

/// Strips `W/` and quotes from an ETag.
fn clean_etag(etag: &str) -> String {
    etag.trim().trim_start_matches("W/").trim_matches('"').trim_matches('\'').to_string()
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.chars().all(|c| c.is_ascii_hexdigit())
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The chain of causes of an error, for messages ("… : connection refused").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn transport_failure(settings: &HubSettings, url: &str, error: reqwest::Error) -> Failure {
    let hint = "set HF_ENDPOINT to a reachable hub or mirror, or HF_HUB_OFFLINE=1 to use local files only";
    Failure::Retry(Error::Connection(format!(
        "cannot reach {} for {url}: {} ({hint})",
        settings.endpoint,
        causes(&error)
    )))
}

/// Turns an error status into a failure naming what was asked for.
fn status_failure(settings: &HubSettings, what: &str, url: &str, response: &Response) -> Failure {
    let status = response.status();
    let code = header(response.headers(), "x-error-code").unwrap_or_default();
    let detail = header(response.headers(), "x-error-message").map(|m| format!(": {m}")).unwrap_or_default();
    let token_hint = if settings.token.is_some() {
        "the token in HF_TOKEN has no access to it"
    } else {
        "it may be gated or private: set HF_TOKEN to a token with access"
    };
    match status {
        StatusCode::NOT_FOUND => Failure::Fatal(Error::NotFound(format!(
            "{what} does not exist on {} ({url}){detail}",
            settings.endpoint
        ))),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if code == "RepoNotFound" => {
            Failure::Fatal(Error::NotFound(format!(
                "{what} does not exist on {} or is private ({url}){detail}; {token_hint}",
                settings.endpoint
            )))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Failure::Fatal(Error::Unauthorized(format!(
            "{} refused access to {what} (HTTP {}, {url}){detail}; {token_hint}",
            settings.endpoint,
            status.as_u16()
        ))),
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            Failure::Retry(Error::Download(format!("{what}: {url} answered HTTP {}{detail}", s.as_u16())))
        }
        s => Failure::Fatal(Error::Download(format!("{what}: {url} answered HTTP {}{detail}", s.as_u16()))),
    }
}

/// Runs `attempt` until it succeeds, fails for good, or runs out of attempts, backing off.
async fn with_retries<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, Failure>>,
{
    let mut tries = 0;
    loop {
        match attempt(tries).await {
            Ok(value) => return Ok(value),
            Err(failure) => back_off(failure, tries).await?,
        }
        tries += 1;
    }
}

/// After the failure of attempt `tries`: the error when it is final or attempts ran out,
/// else a pause before the next attempt.
async fn back_off(failure: Failure, tries: u32) -> Result<()> {
    match failure {
        Failure::Fatal(error) => Err(error),
        Failure::Retry(error) if tries + 1 >= ATTEMPTS => Err(error),
        Failure::Retry(_) => {
            tokio::time::sleep(Duration::from_millis(200 << tries)).await;
            Ok(())
        }
    }
}

fn io_failure(what: &str, path: &Path, error: std::io::Error) -> Failure {
    Failure::Fatal(Error::Download(format!("cannot {what} {}: {error}", path.display())))
}

/// The `.partial` file a download is written to before it is verified and renamed.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    dest.with_file_name(name)
}

/// Hashes a file the way the hub names it: SHA-256, or Git's blob SHA-1.
fn file_digest(path: &Path, git_blob: bool) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if git_blob {
        let mut hasher = sha1::Sha1::new();
        hasher.update(format!("blob {}\0", file.metadata()?.len()).as_bytes());
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok(hex(&hasher.finalize()));
            }
            hasher.update(&buffer[..n]);
        }
    }
    let mut hasher = sha2::Sha256::new();
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

impl HubClient {
    /// A client; endpoint, token and offline mode come with each call.
    pub fn new() -> Result<Self> {
        Ok(Self {
            client: build_client(reqwest::redirect::Policy::limited(10))?,
            no_redirect: build_client(reqwest::redirect::Policy::none())?,
        })
    }

    fn get(&self, settings: &HubSettings, url: &str) -> reqwest::RequestBuilder {
        let request = self.client.get(url);
        match &settings.token {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        }
    }

    /// The URL of a file at a revision (`{endpoint}/{repo}/resolve/{revision}/{path}`).
    pub fn file_url(settings: &HubSettings, repo_id: &str, revision: &str, path: &str) -> String {
        format!("{}/{repo_id}/resolve/{revision}/{path}", settings.endpoint)
    }

    /// Lists `repo_id` at `revision` with sizes and hashes
    /// (`GET /api/models/{repo}/revision/{revision}?blobs=true`).
    pub async fn list(&self, settings: &HubSettings, repo_id: &str, revision: &str) -> Result<RepoListing> {
        let url = format!("{}/api/models/{repo_id}/revision/{revision}?blobs=true", settings.endpoint);
        let what = format!("model repository {repo_id} (revision {revision})");
        let info: ApiModelInfo = with_retries(|_| async {
            let response =
                self.get(settings, &url).send().await.map_err(|e| transport_failure(settings, &url, e))?;
            if !response.status().is_success() {
                return Err(status_failure(settings, &what, &url, &response));
            }
            let body = response.bytes().await.map_err(|e| {
                Failure::Retry(Error::Connection(format!("the listing from {url} broke off: {}", causes(&e))))
            })?;
            serde_json::from_slice::<ApiModelInfo>(&body).map_err(|e| {
                Failure::Fatal(Error::Download(format!("{url} did not answer a model listing: {e}")))
            })
        })
        .await?;
        let siblings = info.siblings.ok_or_else(|| Error::Download(format!("{url} lists no files")))?;
        let files = siblings
            .into_iter()
            .map(|s| {
                let lfs = s.lfs.as_ref();
                RemoteFile {
                    size: lfs.and_then(|l| l.size).or(s.size),
                    sha256: lfs.and_then(|l| l.sha256.clone()).filter(|h| is_hex(h, 64)),
                    git_sha1: if lfs.is_none() { s.blob_id.filter(|h| is_hex(h, 40)) } else { None },
                    path: s.rfilename,
                }
            })
            .collect();
        Ok(RepoListing { repo_id: repo_id.into(), revision: revision.into(), commit: info.sha, files })
    }

    /// Size and hash of a file from `HEAD` (`X-Linked-Size`/`X-Linked-Etag` of LFS files,
    /// else `Content-Length`/`ETag`), as `huggingface_hub` reads them.
    pub async fn head(
        &self,
        settings: &HubSettings,
        repo_id: &str,
        revision: &str,
        path: &str,
    ) -> Result<RemoteFile> {
        let url = Self::file_url(settings, repo_id, revision, path);
        let what = format!("{path} of {repo_id}");
        with_retries(|_| async {
            let mut request = self.no_redirect.head(&url);
            if let Some(token) = &settings.token {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            let response = request.send().await.map_err(|e| transport_failure(settings, &url, e))?;
            let headers = response.headers();
            let linked_size = header(headers, "x-linked-size").and_then(|s| s.parse().ok());
            let ok = response.status().is_success()
                || (response.status().is_redirection() && linked_size.is_some());
            if !ok {
                return Err(status_failure(settings, &what, &url, &response));
            }
            let size = linked_size.or_else(|| header(headers, "content-length").and_then(|s| s.parse().ok()));
            let etag =
                header(headers, "x-linked-etag").or_else(|| header(headers, "etag")).map(|e| clean_etag(&e));
            let etag = etag.map(|e| e.trim_end_matches("-gzip").to_string());
            Ok(RemoteFile {
                path: path.into(),
                size,
                sha256: etag.clone().filter(|e| is_hex(e, 64)),
                git_sha1: etag.filter(|e| is_hex(e, 40)),
            })
        })
        .await
    }

    /// Downloads `file` to `dest`: into `dest.partial` (resumed with a `Range` request when a
    /// partial file exists), checked against the announced size and hash, then renamed into
    /// place. `on_bytes` is told how many bytes are present as they arrive.
    pub async fn download(
        &self,
        settings: &HubSettings,
        repo_id: &str,
        revision: &str,
        file: &RemoteFile,
        dest: &Path,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<()> {
        let partial = partial_path(dest);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| Error::Download(format!("cannot create {}: {e}", parent.display())))?;
        }
        let url = Self::file_url(settings, repo_id, revision, &file.path);
        let what = format!("{} of {repo_id}", file.path);
        let mut integrity_failures = 0;
        loop {
            with_retries(|_| self.fetch_once(settings, &url, &what, file, &partial, on_bytes)).await?;
            match verify(file, &partial, dest, &what).await {
                Ok(()) => break,
                Err(error) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    on_bytes(0);
                    if integrity_failures >= INTEGRITY_RETRIES {
                        return Err(error);
                    }
                    integrity_failures += 1;
                }
            }
        }
        tokio::fs::rename(&partial, dest)
            .await
            .map_err(|e| Error::Download(format!("cannot move {} into place: {e}", partial.display())))
    }

    /// One GET of the rest of the file into `partial`.
    async fn fetch_once(
        &self,
        settings: &HubSettings,
        url: &str,
        what: &str,
        file: &RemoteFile,
        partial: &Path,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> std::result::Result<(), Failure> {
        let mut present = tokio::fs::metadata(partial).await.map(|m| m.len()).unwrap_or(0);
        if file.size.is_some_and(|size| present > size) {
            tokio::fs::remove_file(partial).await.map_err(|e| io_failure("remove", partial, e))?;
            present = 0;
        }
        if present > 0 && file.size == Some(present) {
            return Ok(());
        }
        let mut request = self.get(settings, url);
        if present > 0 {
            request = request.header(RANGE, format!("bytes={present}-"));
        }
        let response = request.send().await.map_err(|e| transport_failure(settings, url, e))?;
        let status = response.status();
        let resumed = match status {
            StatusCode::PARTIAL_CONTENT => {
                let range = header(response.headers(), CONTENT_RANGE.as_str()).unwrap_or_default();
                if !range.starts_with(&format!("bytes {present}-")) {
                    let _ = tokio::fs::remove_file(partial).await;
                    return Err(Failure::Retry(Error::Download(format!(
                        "{what}: asked for bytes from {present}, {url} answered range {range:?}"
                    ))));
                }
                true
            }
            StatusCode::OK => false,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let _ = tokio::fs::remove_file(partial).await;
                return Err(Failure::Retry(Error::Download(format!(
                    "{what}: {url} cannot resume at byte {present}"
                ))));
            }
            _ => return Err(status_failure(settings, what, url, &response)),
        };
        let mut written = if resumed { present } else { 0 };
        let file_handle = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(partial)
            .await
            .map_err(|e| io_failure("write", partial, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file_handle);
        on_bytes(written);
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    // Keep what arrived, so that the next attempt resumes after it.
                    out.flush().await.map_err(|e| io_failure("write", partial, e))?;
                    return Err(Failure::Retry(Error::Connection(format!(
                        "{what}: the transfer from {url} broke off after {written} bytes: {}",
                        causes(&e)
                    ))));
                }
            };
            out.write_all(&chunk).await.map_err(|e| io_failure("write", partial, e))?;
            written += chunk.len() as u64;
            on_bytes(written);
        }
        out.flush().await.map_err(|e| io_failure("write", partial, e))?;
        match file.size {
            Some(size) if written < size => Err(Failure::Retry(Error::Connection(format!(
                "{what}: the transfer from {url} ended after {written} of {size} bytes"
            )))),
            _ => Ok(()),
        }
    }

    /// Fetches the bytes `range` of `file` into `sparse` with `Range` requests; a transfer
    /// that breaks off resumes after the last byte written. `on_bytes` is told how many bytes
    /// of the range have arrived.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_range(
        &self,
        settings: &HubSettings,
        repo_id: &str,
        revision: &str,
        file: &RemoteFile,
        range: Range<u64>,
        sparse: &mut SparseFile,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<()> {
        let url = Self::file_url(settings, repo_id, revision, &file.path);
        let what = format!("bytes {}..{} of {} of {repo_id}", range.start, range.end, file.path);
        let mut next = range.start;
        let mut tries = 0;
        let result = loop {
            let fetched =
                self.fetch_range_once(settings, &url, &what, next..range.end, sparse, &mut next).await;
            on_bytes(next - range.start);
            match fetched {
                Ok(()) => break Ok(()),
                Err(failure) => {
                    if let Err(error) = back_off(failure, tries).await {
                        break Err(error);
                    }
                }
            }
            tries += 1;
        };
        sparse.save().await?;
        result
    }

    /// One GET of `range` into `sparse`; `next` follows the bytes written.
    async fn fetch_range_once(
        &self,
        settings: &HubSettings,
        url: &str,
        what: &str,
        range: Range<u64>,
        sparse: &mut SparseFile,
        next: &mut u64,
    ) -> std::result::Result<(), Failure> {
        let request =
            self.get(settings, url).header(RANGE, format!("bytes={}-{}", range.start, range.end - 1));
        let response = request.send().await.map_err(|e| transport_failure(settings, url, e))?;
        let size = sparse.size();
        // Where the body starts in the file: the range asked for, or 0 from a server that
        // ignores ranges (whose bytes before the range are skipped).
        let mut position = match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let answered = header(response.headers(), CONTENT_RANGE.as_str()).unwrap_or_default();
                let expected = format!("bytes {}-", range.start);
                let total_ok =
                    answered.rsplit_once('/').is_none_or(|(_, t)| t == "*" || t == size.to_string());
                if !answered.starts_with(&expected) || !total_ok {
                    return Err(Failure::Fatal(Error::Integrity(format!(
                        "{what}: asked for bytes {}..{} of a {size}-byte file, {url} answered range {answered:?}",
                        range.start, range.end
                    ))));
                }
                range.start
            }
            StatusCode::OK => 0,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Failure::Fatal(Error::Integrity(format!(
                    "{what}: {url} has no bytes {}..{}; the file is shorter than the {size} bytes announced",
                    range.start, range.end
                ))))
            }
            _ => return Err(status_failure(settings, what, url, &response)),
        };
        let mut buffer: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
        let mut body = response.bytes_stream();
        while position < range.end {
            let chunk = match body.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    // Keep what arrived, so that the next attempt resumes after it.
                    write_run(sparse, next, &mut buffer).await?;
                    return Err(Failure::Retry(Error::Connection(format!(
                        "{what}: the transfer from {url} broke off at byte {position}: {}",
                        causes(&e)
                    ))));
                }
                None => break,
            };
            let chunk_end = position + chunk.len() as u64;
            let wanted = position.max(range.start)..chunk_end.min(range.end);
            if wanted.start < wanted.end {
                buffer.extend_from_slice(
                    &chunk[(wanted.start - position) as usize..(wanted.end - position) as usize],
                );
            }
            position = chunk_end;
            if buffer.len() >= WRITE_BUFFER {
                write_run(sparse, next, &mut buffer).await?;
            }
        }
        write_run(sparse, next, &mut buffer).await?;
        if *next < range.end {
            return Err(Failure::Retry(Error::Connection(format!(
                "{what}: the transfer from {url} ended at byte {next} of {}..{}",
                range.start, range.end
            ))));
        }
        Ok(())
    }
}

/// Writes the bytes gathered in `buffer` to `sparse` at `*next`, and moves `next` past them.
async fn write_run(
    sparse: &mut SparseFile,
    next: &mut u64,
    buffer: &mut Vec<u8>,
) -> std::result::Result<(), Failure> {
    if buffer.is_empty() {
        return Ok(());
    }
    let bytes = std::mem::replace(buffer, Vec::with_capacity(WRITE_BUFFER));
    let length = bytes.len() as u64;
    sparse.write(*next, bytes).await.map_err(Failure::Fatal)?;
    *next += length;
    Ok(())
}

/// Checks a finished partial file against the listed size and hash.
pub(super) async fn verify(file: &RemoteFile, partial: &Path, dest: &Path, what: &str) -> Result<()> {
    let length = tokio::fs::metadata(partial)
        .await
        .map_err(|e| Error::Download(format!("cannot read {}: {e}", partial.display())))?
        .len();
    if let Some(size) = file.size.filter(|s| *s != length) {
        return Err(Error::Integrity(format!(
            "{what}: downloaded {length} bytes, the hub announced {size} ({})",
            dest.display()
        )));
    }
    let expected = match (&file.sha256, &file.git_sha1) {
        (Some(sha256), _) => Some((sha256.to_ascii_lowercase(), false)),
        (None, Some(sha1)) => Some((sha1.to_ascii_lowercase(), true)),
        (None, None) => None,
    };
    let Some((expected, git_blob)) = expected else { return Ok(()) };
    let path = partial.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || file_digest(&path, git_blob))
        .await
        .map_err(|e| Error::Download(format!("hashing {} stopped: {e}", partial.display())))?
        .map_err(|e| Error::Download(format!("cannot hash {}: {e}", partial.display())))?;
    if actual != expected {
        let kind = if git_blob { "git SHA-1" } else { "SHA-256" };
        return Err(Error::Integrity(format!(
            "{what}: the downloaded bytes have {kind} {actual}, the hub announced {expected}; {} was not kept",
            dest.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_quotes_and_weak_markers() {
        assert_eq!(clean_etag("\"abc\""), "abc");
        assert_eq!(clean_etag("W/\"abc\""), "abc");
    }

    #[test]
    fn digests_match_sha256_and_git_blob_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello\n").unwrap();
        // `printf 'hello\n' | sha256sum` and `git hash-object`.
        assert_eq!(
            file_digest(&path, false).unwrap(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        assert_eq!(file_digest(&path, true).unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn partial_files_sit_beside_their_target() {
        assert_eq!(
            partial_path(Path::new("/m/model.safetensors")),
            Path::new("/m/model.safetensors.partial")
        );
    }
}
