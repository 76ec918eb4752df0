//! JSON Lines file sink (SPEC §5): one upsert per line, tags sorted by name,
//! e.g. `{"name":"uswm.visit.fm.1231.item_page.beta","tags":{"dc":"dc1","device":"desktop","login":"in"},"timestamp":1525356120000,"value":10000}`.
//! The final value of a point is its last line; the line is written by
//! [`super::json`].
//!
//! A fresh run starts a fresh file ([`FileSink::create`]); a run restored from
//! a checkpoint appends ([`FileSink::append`]), so that the last line of every
//! point is its value across restarts. A crash mid-write can leave a torn last
//! line; appending first cuts the file back to its last whole line, as a log
//! recovers to its last whole record (the point it held is rewritten by the
//! replay from the checkpoint, which precedes it).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};

use super::json::{format_health, format_point};
use super::{Sink, SinkError};
use crate::aggregate::{Namer, Point};
use crate::metrics::HealthPoint;

pub struct FileSink {
    out: BufWriter<File>,
    path: String,
    line: String,
}

impl FileSink {
    /// Starts a fresh file (an existing one is truncated).
    pub fn create(path: &str) -> Result<FileSink, SinkError> {
        let io = |source| SinkError::Io { sink: format!("file:{path}"), source };
        make_parent(path).map_err(io)?;
        let f = File::create(path).map_err(io)?;
        Ok(FileSink::on(f, path))
    }

    /// Appends to the file (creating it if missing), after cutting a torn
    /// last line back to the last `\n` (with a warning saying how much).
    pub fn append(path: &str) -> Result<FileSink, SinkError> {
        let io = |source| SinkError::Io { sink: format!("file:{path}"), source };
        make_parent(path).map_err(io)?;
        let mut f = std::fs::OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io)?;
        let cut = cut_torn_tail(&mut f).map_err(io)?;
        if cut > 0 {
            tracing::warn!("sink file:{path}: its last line was torn (a crash mid-write): cut {cut} bytes back to the last whole line");
        }
        Ok(FileSink::on(f, path))
    }

    fn on(f: File, path: &str) -> FileSink {
        FileSink { out: BufWriter::with_capacity(1 << 20, f), path: path.to_string(), line: String::new() }
    }
}

fn make_parent(path: &str) -> std::io::Result<()> {
    match std::path::Path::new(path).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

/// Truncates `f` to just after its last `\n` (to empty if it has none) unless
/// it ends in one; returns the bytes cut.
fn cut_torn_tail(f: &mut File) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(nl) = memchr::memrchr(b'\n', chunk) {
            end = start + nl as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        f.set_len(end)?;
    }
    Ok(len - end)
}

impl FileSink {
    /// Writes each of `points` as the line `format` appends for it.
    fn write_lines<P>(&mut self, points: &[P], format: impl Fn(&mut String, &P)) -> Result<(), SinkError> {
        for p in points {
            self.line.clear();
            format(&mut self.line, p);
            self.out
                .write_all(self.line.as_bytes())
                .map_err(|source| SinkError::Io { sink: format!("file:{}", self.path), source })?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, points: &[Point], namer: &Namer) -> Result<(), SinkError> {
        self.write_lines(points, |line, p| format_point(line, p, namer))
    }

    fn write_health(&mut self, ts_ms: i64, points: &[HealthPoint]) -> Result<(), SinkError> {
        self.write_lines(points, |line, p| format_health(line, p, ts_ms))
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|source| SinkError::Io { sink: format!("file:{}", self.path), source })
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(content: &[u8]) -> (u64, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, content).unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).append(true).open(&path).unwrap();
        let n = cut_torn_tail(&mut f).unwrap();
        (n, std::fs::read(&path).unwrap())
    }

    #[test]
    fn a_torn_tail_is_cut_back_to_the_last_whole_line() {
        assert_eq!(cut(b""), (0, b"".to_vec()));
        assert_eq!(cut(b"{\"a\":1}\n{\"a\":2}\n"), (0, b"{\"a\":1}\n{\"a\":2}\n".to_vec()));
        assert_eq!(cut(b"{\"a\":1}\n{\"a\""), (4, b"{\"a\":1}\n".to_vec()));
        assert_eq!(cut(b"{\"a\""), (4, b"".to_vec()));
        // A torn line longer than one read chunk.
        let mut long = b"{\"a\":1}\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', 200_000));
        assert_eq!(cut(&long), (200_000, b"{\"a\":1}\n".to_vec()));
    }

    #[test]
    fn append_keeps_whole_lines_and_writes_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"a\"").unwrap();
        let p = path.to_str().unwrap();
        let mut sink = FileSink::append(p).unwrap();
        sink.write_health(5, &[]).unwrap();
        sink.out.write_all(b"{\"b\":2}\n").unwrap();
        sink.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        drop(sink);
        // A fresh run starts a fresh file.
        FileSink::create(p).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}
