//! A file fetched in byte ranges: created at its full size with holes where nothing was
//! fetched yet, so that it is mapped like the whole file, beside a record `NAME.ranges` of
//! the bytes present and of the file they belong to (size, SHA-256). A resumed download, or
//! a later shard of another layer range, adds to it; a file that changed upstream starts over.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ranges::ByteRanges;
use crate::error::{Error, Result};

/// Suffix of the record beside a file fetched in ranges.
pub const RECORD_SUFFIX: &str = ".ranges";
/// Bytes written between two saves of the record (a crash loses at most these).
const SAVE_EVERY: u64 = 16 << 20;

/// The record of a file fetched in ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    size: u64,
    sha256: Option<String>,
    present: ByteRanges,
}

/// What is on disk for a file fetched in ranges.
pub enum LocalFile {
    /// The whole file, without a record: nothing left to fetch.
    Complete,
    /// A file of the full size with some of its bytes present.
    Partial(SparseFile),
}

/// A file of the full size being filled in by ranges.
pub struct SparseFile {
    path: PathBuf,
    file: Arc<File>,
    record: Record,
    unsaved: u64,
}

/// Where the record of `path` lives.
pub fn record_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(RECORD_SUFFIX);
    path.with_file_name(name)
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> Error {
    Error::Download(format!("cannot {what} {}: {error}", path.display()))
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_str(&std::fs::read_to_string(record_path(path)).ok()?).ok()
}

/// The bytes recorded present of the file at `path`; None when it has no record (it is whole,
/// or absent).
pub fn recorded_ranges(path: &Path) -> Option<ByteRanges> {
    read_record(path).map(|r| r.present)
}

/// The bytes present of the file at `path`: all of it without a record, else those recorded.
pub fn present_bytes(path: &Path) -> u64 {
    match read_record(path) {
        Some(record) => record.present.total(),
        None => std::fs::metadata(path).map_or(0, |m| m.len()),
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut handle = file.try_clone()?;
    handle.seek(SeekFrom::Start(offset))?;
    handle.write_all(bytes)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut handle = file.try_clone()?;
    handle.seek(SeekFrom::Start(offset))?;
    handle.read_exact(buffer)
}

impl LocalFile {
    /// What `path` holds of a file of `size` bytes with SHA-256 `sha256` (when known): the
    /// whole file, or the ranges its record lists. Anything else there (another size, a record
    /// of another file, no record beside a file of the wrong size) is replaced by an empty
    /// file of the full size.
    pub fn open(path: &Path, size: u64, sha256: Option<&str>) -> Result<Self> {
        let on_disk = std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len());
        let same_blob = |record: &Record| {
            record.size == size
                && match (&record.sha256, sha256) {
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    _ => true,
                }
        };
        match read_record(path) {
            Some(record) if on_disk == Some(size) && same_blob(&record) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| io_error("open", path, e))?;
                return Ok(Self::Partial(SparseFile::new(path, file, record)));
            }
            None if on_disk == Some(size) => return Ok(Self::Complete),
            _ => {}
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        }
        // A new inode: a reader mapping the old file keeps what it mapped.
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_error("create", path, e))?;
        file.set_len(size).map_err(|e| io_error("size", path, e))?;
        let record = Record { size, sha256: sha256.map(str::to_string), present: ByteRanges::default() };
        let sparse = SparseFile::new(path, file, record);
        sparse.save_record()?;
        Ok(Self::Partial(sparse))
    }
}

impl SparseFile {
    fn new(path: &Path, file: File, record: Record) -> Self {
        Self { path: path.to_path_buf(), file: Arc::new(file), record, unsaved: 0 }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.record.size
    }

    /// The bytes present.
    pub fn present(&self) -> &ByteRanges {
        &self.record.present
    }

    /// Whether every byte is present.
    pub fn is_complete(&self) -> bool {
        self.record.present.covers(&(0..self.record.size))
    }

    /// The bytes of `range`, which must be present.
    pub async fn read(&self, range: Range<u64>) -> Result<Vec<u8>> {
        if !self.record.present.covers(&range) {
            return Err(Error::Download(format!(
                "bytes {}..{} of {} are not downloaded yet",
                range.start,
                range.end,
                self.path.display()
            )));
        }
        let (file, path) = (self.file.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; (range.end - range.start) as usize];
            read_exact_at(&file, &mut buffer, range.start)
                .map(|_| buffer)
                .map_err(|e| io_error("read", &path, e))
        })
        .await
        .map_err(|e| Error::Download(format!("reading {} stopped: {e}", self.path.display())))?
    }

    /// Writes `bytes` at `offset` and records them as present (the record is saved every
    /// few MiB and by [`SparseFile::save`]).
    pub async fn write(&mut self, offset: u64, bytes: Vec<u8>) -> Result<()> {
        let end = offset + bytes.len() as u64;
        if end > self.record.size {
            return Err(Error::Integrity(format!(
                "{}: bytes {offset}..{end} lie past its {} bytes",
                self.path.display(),
                self.record.size
            )));
        }
        let (file, path) = (self.file.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            write_all_at(&file, &bytes, offset).map_err(|e| io_error("write", &path, e))
        })
        .await
        .map_err(|e| Error::Download(format!("writing {} stopped: {e}", self.path.display())))??;
        self.record.present.insert(offset..end);
        self.unsaved += end - offset;
        if self.unsaved >= SAVE_EVERY {
            self.save().await?;
        }
        Ok(())
    }

    /// Flushes the written bytes to disk, then saves the record naming them.
    pub async fn save(&mut self) -> Result<()> {
        let (file, path) = (self.file.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || file.sync_data().map_err(|e| io_error("flush", &path, e)))
            .await
            .map_err(|e| Error::Download(format!("flushing {} stopped: {e}", self.path.display())))??;
        self.save_record()?;
        self.unsaved = 0;
        Ok(())
    }

    fn save_record(&self) -> Result<()> {
        let path = record_path(&self.path);
        let aside = path.with_extension("ranges.partial");
        let text = serde_json::to_string(&self.record).map_err(|e| Error::Download(e.to_string()))?;
        std::fs::write(&aside, text)
            .and_then(|_| std::fs::rename(&aside, &path))
            .map_err(|e| io_error("write", &path, e))
    }

    /// Marks a complete, verified file as whole: its record goes.
    pub fn finish(self) -> Result<()> {
        let path = record_path(&self.path);
        std::fs::remove_file(&path).map_err(|e| io_error("remove", &path, e))
    }

    /// Drops the file and its record (after a failed verification).
    pub fn discard(self) {
        let _ = std::fs::remove_file(record_path(&self.path));
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ranges_written_are_kept_across_opens_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let LocalFile::Partial(mut sparse) = LocalFile::open(&path, 100, Some("ab")).unwrap() else {
            panic!("a new file is partial")
        };
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
        sparse.write(10, vec![7; 20]).await.unwrap();
        assert!(sparse.write(90, vec![0; 20]).await.is_err());
        sparse.save().await.unwrap();
        assert_eq!(present_bytes(&path), 20);
        drop(sparse);

        let LocalFile::Partial(mut sparse) = LocalFile::open(&path, 100, Some("AB")).unwrap() else {
            panic!("the record is kept")
        };
        assert_eq!(sparse.read(10..30).await.unwrap(), vec![7; 20]);
        assert!(sparse.read(0..11).await.is_err());
        sparse.write(0, vec![1; 10]).await.unwrap();
        sparse.write(30, vec![2; 70]).await.unwrap();
        assert!(sparse.is_complete());
        sparse.finish().unwrap();
        assert!(matches!(LocalFile::open(&path, 100, Some("ab")).unwrap(), LocalFile::Complete));
        assert_eq!(present_bytes(&path), 100);

        // Another size (the file changed upstream): an empty file of the new size.
        let LocalFile::Partial(mut sparse) = LocalFile::open(&path, 50, Some("ef")).unwrap() else {
            panic!("a changed file starts over")
        };
        assert_eq!(sparse.present().total(), 0);
        sparse.write(0, vec![3; 5]).await.unwrap();
        sparse.save().await.unwrap();
        drop(sparse);
        // A record of another blob of the same size starts over too.
        let LocalFile::Partial(sparse) = LocalFile::open(&path, 50, Some("cd")).unwrap() else { panic!() };
        assert_eq!(sparse.present().total(), 0);
        sparse.discard();
        assert!(!path.exists() && !record_path(&path).exists());
    }
}
