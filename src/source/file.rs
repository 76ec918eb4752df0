//! JSON Lines from a file or stdin. File order is arrival order. Blank lines
//! are skipped; a trailing `\r` is removed; a line over [`MAX_LINE_BYTES`] is
//! skipped whole and counted, never buffered.
//!
//! Each fill reads straight into the batch's buffer and cuts it into line
//! ranges there: the bytes of a line are copied once, by the read itself, and
//! the buffer (kept at its length between fills) is not zeroed again once
//! grown. Only the partial line a fill ends with is copied, to the front of
//! the next fill's buffer.
//!
//! A regular file is identified by its canonical path, its size and a hash of
//! its first [`HEAD_BYTES`]; it continues a checkpoint's input if it is that
//! file, possibly grown since (an appended log). Stdin has no position: it
//! continues only a checkpoint taken reading stdin.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use super::{Discontinuity, FileMark, Fill, LineBatch, Source, SourceId, SourceKind, HEAD_BYTES, MAX_LINE_BYTES};

/// Bytes asked of each `read`.
const READ_CHUNK: usize = 256 * 1024;

pub struct FileSource {
    input: Box<dyn Read + Send>,
    name: String,
    /// The partial line the last fill ended with (read, not yet cut).
    carry: Vec<u8>,
    /// Inside an over-long line: drop bytes up to the next newline.
    skipping: bool,
    done: bool,
    /// Bytes read from the start of the file (a regular file; `None` for stdin).
    read_total: Option<u64>,
    /// The file's length when opened (a regular file).
    length: Option<u64>,
    /// Where reading started (a checkpoint's position, or 0).
    start: u64,
    /// The first [`HEAD_BYTES`] of a regular file.
    head: Vec<u8>,
    identity: SourceId,
}

impl FileSource {
    /// Opens a file at byte `offset` (a position from a checkpoint, or 0).
    /// `-` reads stdin.
    pub fn open_at(path: &str, offset: u64) -> io::Result<FileSource> {
        if path == "-" {
            if offset > 0 {
                return Err(io::Error::other("stdin cannot resume from a checkpoint position"));
            }
            return Ok(FileSource::from_reader(Box::new(PipeReader::spawn(io::stdin())), "file:-".into()));
        }
        let mut f =
            File::open(Path::new(path)).map_err(|e| io::Error::new(e.kind(), format!("cannot open {path}: {e}")))?;
        let length = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        // Only a regular file is read twice; a FIFO's first bytes are input.
        let mut head = Vec::new();
        if length.is_some() {
            (&mut f).take(HEAD_BYTES as u64).read_to_end(&mut head)?;
        }
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset))?;
        let canonical = std::fs::canonicalize(path).map_or_else(|_| path.to_string(), |p| p.display().to_string());
        let mut me = FileSource::from_reader(Box::new(f), format!("file:{path}"));
        me.read_total = Some(offset);
        me.length = length;
        me.start = offset;
        me.identity = SourceId {
            kind: SourceKind::File,
            name: canonical,
            group: String::new(),
            file: length.map(|len| FileMark { len, head_len: head.len() as u32, head_hash: xxh3(&head) }),
        };
        me.head = head;
        Ok(me)
    }

    pub fn from_reader(input: Box<dyn Read + Send>, name: String) -> FileSource {
        FileSource {
            input,
            carry: Vec::new(),
            skipping: false,
            done: false,
            read_total: None,
            length: None,
            start: 0,
            head: Vec::new(),
            identity: SourceId {
                kind: SourceKind::Stdin,
                name: if name == "file:-" { "-".into() } else { name.clone() },
                group: String::new(),
                file: None,
            },
            name,
        }
    }

    /// Cuts `batch.buf[from..len]` into lines (`from` is a line start, and
    /// no newline lies before `scanned`); returns where the partial last line
    /// starts (`len` if none). `at_end`: that last line is whole too.
    fn cut_lines(&mut self, batch: &mut LineBatch, from: usize, scanned: usize, len: usize, at_end: bool) -> usize {
        let mut start = from;
        let mut at = scanned;
        while let Some(nl) = memchr::memchr(b'\n', &batch.buf[at..len]) {
            let end = at + nl;
            if self.skipping {
                self.skipping = false;
            } else {
                push_trimmed(batch, start, end);
            }
            start = end + 1;
            at = start;
        }
        let rest = len - start;
        if at_end && rest > 0 && !self.skipping {
            push_trimmed(batch, start, len);
            start = len;
        } else if rest > MAX_LINE_BYTES || (self.skipping && rest > 0) {
            if !self.skipping {
                batch.overlong += 1;
            }
            self.skipping = true;
            start = len;
        }
        start
    }
}

fn xxh3(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// Adds `batch.buf[start..end]` as a line, less a trailing `\r`; skips it if
/// blank, counts it if over [`MAX_LINE_BYTES`].
fn push_trimmed(batch: &mut LineBatch, start: usize, end: usize) {
    let line = &batch.buf[start..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    if line.len() > MAX_LINE_BYTES {
        batch.overlong += 1;
        return;
    }
    batch.lines.push(start as u32..(start + line.len()) as u32);
}

impl Source for FileSource {
    fn fill(&mut self, batch: &mut LineBatch) -> io::Result<Fill> {
        batch.clear_keeping_buffer();
        if self.done {
            return Ok(Fill::End);
        }
        // The buffer keeps its length (stale bytes past the lines) from fill
        // to fill, so it is zeroed only when it grows.
        let carried = self.carry.len();
        if batch.buf.len() < carried + READ_CHUNK {
            batch.buf.resize(carried + READ_CHUNK, 0);
        }
        batch.buf[..carried].copy_from_slice(&self.carry);
        self.carry.clear();
        // `start`: the first byte not cut into a line; `len`: bytes of input
        // in the buffer; no newline lies in `start..scanned`.
        let (mut start, mut len) = (0, carried);
        loop {
            if batch.buf.len() < len + READ_CHUNK {
                batch.buf.resize(len + READ_CHUNK, 0);
            }
            let scanned = len;
            let n = loop {
                match self.input.read(&mut batch.buf[len..len + READ_CHUNK]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // A pipe with nothing new: hand back what is complete.
                        self.carry.extend_from_slice(&batch.buf[start..len]);
                        return Ok(Fill::Lines);
                    }
                    Err(e) => {
                        self.carry.extend_from_slice(&batch.buf[start..len]);
                        return Err(e);
                    }
                }
            };
            len += n;
            if let Some(t) = &mut self.read_total {
                *t += n as u64;
            }
            if n == 0 {
                self.cut_lines(batch, start, scanned, len, true);
                self.done = true;
                return Ok(Fill::End);
            }
            start = self.cut_lines(batch, start, scanned, len, false);
            if start == len && batch.lines.is_empty() {
                // Everything read so far was dropped (inside an over-long
                // line): reuse the buffer from its front.
                (start, len) = (0, 0);
            }
            if !batch.is_empty() || batch.overlong > 0 {
                self.carry.extend_from_slice(&batch.buf[start..len]);
                return Ok(Fill::Lines);
            }
        }
    }

    fn is_live(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn identity(&self) -> SourceId {
        self.identity.clone()
    }

    /// The same file (path), at least as long as when the checkpoint's run
    /// opened it and as its position, and with the same first bytes.
    fn continues(&self, saved: &SourceId) -> Result<(), Discontinuity> {
        let me = &self.identity;
        if (me.kind, &me.name) != (saved.kind, &saved.name) {
            return Err(Discontinuity::AnotherInput);
        }
        let (Some(mine), Some(then)) = (me.file, saved.file) else {
            return if me.file.is_none() && saved.file.is_none() { Ok(()) } else { Err(Discontinuity::AnotherInput) };
        };
        if mine.len < then.len.max(self.start) {
            return Err(Discontinuity::Shorter);
        }
        let head = &self.head[..(then.head_len as usize).min(self.head.len())];
        if head.len() != then.head_len as usize || xxh3(head) != then.head_hash {
            return Err(Discontinuity::FirstBytes);
        }
        Ok(())
    }

    fn progress(&self) -> Option<(u64, u64)> {
        Some((self.read_total?, self.length.filter(|&l| l > 0)?))
    }

    /// The byte offset just past the last line returned (partition 0).
    fn position(&self) -> Option<super::Offsets> {
        self.read_total.map(|t| vec![(0, (t - self.carry.len() as u64) as i64)])
    }
}

/// Reads a pipe (stdin) on its own thread, so that a quiet pipe never blocks
/// the router: a read with nothing new for 100 ms answers `WouldBlock`, and
/// the router goes on flushing and watching for a stop.
///
/// The thread sends an empty chunk at the end of the input: a channel that
/// closes without it means the thread died (a panic), and reading fails
/// loudly instead of passing for the end of the input.
struct PipeReader {
    chunks: crossbeam_channel::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    ended: bool,
}

impl PipeReader {
    fn spawn(mut input: impl Read + Send + 'static) -> PipeReader {
        let (tx, rx) = crossbeam_channel::bounded(16);
        std::thread::Builder::new()
            .name("expmon-stdin".into())
            .spawn(move || loop {
                let mut buf = vec![0; READ_CHUNK];
                match input.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Ok(Vec::new()));
                        return;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(buf)).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            })
            .expect("spawn stdin reader");
        PipeReader { chunks: rx, current: Vec::new(), at: 0, ended: false }
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            match self.chunks.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.at = 0;
                    if self.current.is_empty() {
                        self.ended = true;
                        return Ok(0);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("the thread reading it (expmon-stdin) died"))
                }
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What broke: a stdin reader thread that died looked like the end of the
    /// input, so a run stopped with exit 0 on part of it.
    #[test]
    fn a_dead_stdin_reader_is_an_error_not_the_end_of_the_input() {
        struct Dies;
        impl Read for Dies {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("the reader dies")
            }
        }
        let mut pipe = PipeReader::spawn(Dies);
        let mut buf = [0u8; 16];
        let err = loop {
            match pipe.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        };
        assert!(err.is_err_and(|e| e.to_string().contains("expmon-stdin")));
        let mut ok = PipeReader::spawn(io::Cursor::new(b"a\n".to_vec()));
        let mut got = Vec::new();
        loop {
            match ok.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"a\n");
    }

    fn all_lines(data: Vec<u8>) -> (Vec<Vec<u8>>, u64) {
        let mut s = FileSource::from_reader(Box::new(io::Cursor::new(data)), "t".into());
        let mut b = LineBatch::default();
        let mut out = Vec::new();
        let mut overlong = 0;
        loop {
            let f = s.fill(&mut b).unwrap();
            overlong += b.overlong;
            for i in 0..b.len() {
                out.push(b.line(i).to_vec());
            }
            if f == Fill::End {
                return (out, overlong);
            }
        }
    }

    #[test]
    fn lines_blank_crlf_and_no_final_newline() {
        let (lines, _) = all_lines(b"a\r\n\n  \nb\nc".to_vec());
        assert_eq!(lines, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn quiet_pipe_yields_empty_fills_then_its_lines() {
        let (r, mut w) = std::io::pipe().unwrap();
        let mut s = FileSource::from_reader(Box::new(PipeReader::spawn(r)), "pipe".into());
        let mut b = LineBatch::default();
        assert_eq!(s.fill(&mut b).unwrap(), Fill::Lines);
        assert!(b.is_empty(), "nothing yet, but no blocking");
        use std::io::Write;
        w.write_all(b"a\nb").unwrap();
        drop(w);
        let mut lines = Vec::new();
        loop {
            let f = s.fill(&mut b).unwrap();
            lines.extend((0..b.len()).map(|i| b.line(i).to_vec()));
            if f == Fill::End {
                break;
            }
        }
        assert_eq!(lines, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    fn mark(path: &std::path::Path) -> SourceId {
        FileSource::open_at(path.to_str().unwrap(), 0).unwrap().identity()
    }

    #[test]
    fn a_file_continues_its_checkpoint_only_if_it_is_that_file_possibly_grown() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        std::fs::write(&a, b"{\"x\":1}\n").unwrap();
        std::fs::write(&b, b"{\"x\":1}\n").unwrap();
        let saved = mark(&a);
        assert_eq!((saved.kind, saved.file.unwrap().len, saved.file.unwrap().head_len), (SourceKind::File, 8, 8));
        let path = a.to_str().unwrap();
        assert_eq!(FileSource::open_at(path, 8).unwrap().continues(&saved), Ok(()));
        // Grown past HEAD_BYTES since (an appended log): still the same file.
        let mut grown = b"{\"x\":1}\n".to_vec();
        grown.extend(std::iter::repeat_n(b'y', 2 * HEAD_BYTES));
        std::fs::write(&a, &grown).unwrap();
        assert_eq!(FileSource::open_at(path, 8).unwrap().continues(&saved), Ok(()));
        // Same content, other path: another input.
        assert!(FileSource::open_at(b.to_str().unwrap(), 0)
            .unwrap()
            .continues(&saved)
            .unwrap_err()
            .to_string()
            .contains("another"));
        // Rewritten: shorter, or the same length with other first bytes.
        std::fs::write(&a, b"{}\n").unwrap();
        assert!(FileSource::open_at(path, 0).unwrap().continues(&saved).unwrap_err().to_string().contains("shorter"));
        std::fs::write(&a, b"{\"x\":2}\n").unwrap();
        assert!(FileSource::open_at(path, 0)
            .unwrap()
            .continues(&saved)
            .unwrap_err()
            .to_string()
            .contains("first bytes"));
        // Stdin continues only stdin.
        let stdin = FileSource::from_reader(Box::new(io::empty()), "file:-".into());
        assert!(stdin.continues(&saved).is_err());
        assert_eq!(stdin.continues(&stdin.identity()), Ok(()));
        assert_eq!(stdin.identity().to_string(), "stdin");
    }

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.step).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// Lines cut in place across reads of any size: every line whole, in
    /// order, and the position after each fill just past its last line.
    #[test]
    fn lines_split_across_reads_are_whole_and_the_position_follows_them() {
        let mut data = Vec::new();
        let mut want = Vec::new();
        for i in 0..3000 {
            let line = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 97));
            data.extend_from_slice(line.as_bytes());
            data.extend_from_slice(if i % 5 == 0 { b"\r\n" } else { b"\n" });
            want.push(line.into_bytes());
        }
        for step in [1, 7, 100, 4096, READ_CHUNK, usize::MAX] {
            let mut s = FileSource::from_reader(Box::new(Trickle { data: data.clone(), at: 0, step }), "t".into());
            s.read_total = Some(0);
            let mut b = LineBatch::default();
            let mut got = Vec::new();
            loop {
                let f = s.fill(&mut b).unwrap();
                got.extend((0..b.len()).map(|i| b.line(i).to_vec()));
                let pos = s.position().unwrap()[0].1 as usize;
                let just_past = data[..pos].iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
                assert_eq!(pos, just_past, "step {step}: the position ends a line");
                assert_eq!(data[..pos].iter().filter(|&&c| c == b'\n').count(), got.len(), "step {step}");
                if f == Fill::End {
                    break;
                }
            }
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn overlong_line_is_skipped_whole() {
        let mut data = b"first\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES * 2 + 7));
        data.extend_from_slice(b"\nlast\n");
        let (lines, overlong) = all_lines(data);
        assert_eq!(lines, vec![b"first".to_vec(), b"last".to_vec()]);
        assert_eq!(overlong, 1);
    }
}
