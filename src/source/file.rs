//! JSON Lines from a file or stdin. File order is arrival order. Blank lines
//! are skipped; a trailing `\r` is removed; a line over [`MAX_LINE_BYTES`] is
//! skipped whole and counted, never buffered.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use super::{Fill, LineBatch, Source, MAX_LINE_BYTES};

const READ_CHUNK: usize = 256 * 1024;

pub struct FileSource {
    input: Box<dyn Read + Send>,
    name: String,
    /// Bytes read but not yet cut into lines (the start of a partial line).
    pending: Vec<u8>,
    /// Inside an over-long line: drop bytes up to the next newline.
    skipping: bool,
    done: bool,
    /// Bytes read from the start of the file (a regular file; `None` for stdin).
    read_total: Option<u64>,
    /// The file's length when opened (a regular file).
    length: Option<u64>,
}

impl FileSource {
    /// `-` reads stdin.
    pub fn open(path: &str) -> io::Result<FileSource> {
        FileSource::open_at(path, 0)
    }

    /// Opens a file at byte `offset` (a position from a checkpoint).
    pub fn open_at(path: &str, offset: u64) -> io::Result<FileSource> {
        if path == "-" {
            if offset > 0 {
                return Err(io::Error::other("stdin cannot resume from a checkpoint position"));
            }
            return Ok(FileSource::from_reader(Box::new(PipeReader::spawn(io::stdin())), "file:-".into()));
        }
        let mut f =
            File::open(Path::new(path)).map_err(|e| io::Error::new(e.kind(), format!("cannot open {path}: {e}")))?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset))?;
        let length = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        let mut me = FileSource::from_reader(Box::new(f), format!("file:{path}"));
        me.read_total = Some(offset);
        me.length = length;
        Ok(me)
    }

    pub fn from_reader(input: Box<dyn Read + Send>, name: String) -> FileSource {
        FileSource {
            input,
            name,
            pending: Vec::with_capacity(READ_CHUNK),
            skipping: false,
            done: false,
            read_total: None,
            length: None,
        }
    }

    fn cut_lines(&mut self, batch: &mut LineBatch, at_end: bool) {
        let mut start = 0;
        let data = &self.pending;
        while start < data.len() {
            let Some(nl) = memchr::memchr(b'\n', &data[start..]) else {
                break;
            };
            let line = &data[start..start + nl];
            if self.skipping {
                self.skipping = false;
            } else {
                push_trimmed(batch, line);
            }
            start += nl + 1;
        }
        let rest = self.pending.len() - start;
        if at_end && rest > 0 && !self.skipping {
            let line = self.pending[start..].to_vec();
            push_trimmed(batch, &line);
            start = self.pending.len();
        } else if rest > MAX_LINE_BYTES || (self.skipping && rest > 0) {
            if !self.skipping {
                batch.overlong += 1;
            }
            self.skipping = true;
            start = self.pending.len();
        }
        self.pending.drain(..start);
    }
}

fn push_trimmed(batch: &mut LineBatch, line: &[u8]) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    if line.len() > MAX_LINE_BYTES {
        batch.overlong += 1;
        return;
    }
    batch.push_line(line);
}

impl Source for FileSource {
    fn fill(&mut self, batch: &mut LineBatch) -> io::Result<Fill> {
        batch.clear();
        if self.done {
            return Ok(Fill::End);
        }
        loop {
            let old = self.pending.len();
            self.pending.resize(old + READ_CHUNK, 0);
            let n = loop {
                match self.input.read(&mut self.pending[old..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // A pipe with nothing new: hand back what is complete.
                        self.pending.truncate(old);
                        self.cut_lines(batch, false);
                        return Ok(Fill::Lines);
                    }
                    Err(e) => {
                        self.pending.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.pending.truncate(old + n);
            if let Some(t) = &mut self.read_total {
                *t += n as u64;
            }
            if n == 0 {
                self.cut_lines(batch, true);
                self.done = true;
                return Ok(Fill::End);
            }
            self.cut_lines(batch, false);
            if !batch.is_empty() || batch.overlong > 0 {
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

    fn progress(&self) -> Option<(u64, u64)> {
        Some((self.read_total?, self.length.filter(|&l| l > 0)?))
    }

    /// The byte offset just past the last line returned (partition 0).
    fn position(&self) -> Option<super::Offsets> {
        self.read_total.map(|t| vec![(0, (t - self.pending.len() as u64) as i64)])
    }
}

/// Reads a pipe (stdin) on its own thread, so that a quiet pipe never blocks
/// the router: a read with nothing new for 100 ms answers `WouldBlock`, and
/// the router goes on flushing and watching for a stop.
struct PipeReader {
    chunks: crossbeam_channel::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
}

impl PipeReader {
    fn spawn(mut input: impl Read + Send + 'static) -> PipeReader {
        let (tx, rx) = crossbeam_channel::bounded(16);
        std::thread::Builder::new()
            .name("expmon-stdin".into())
            .spawn(move || loop {
                let mut buf = vec![0; READ_CHUNK];
                match input.read(&mut buf) {
                    Ok(0) => return,
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
        PipeReader { chunks: rx, current: Vec::new(), at: 0 }
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.current.len() {
            match self.chunks.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.at = 0;
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(0),
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
