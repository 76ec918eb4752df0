//! JSON Lines file sink (SPEC §5): one upsert per line, tags sorted by name,
//! e.g. `{"name":"uswm.visit.fm.1231.item_page.beta","tags":{"dc":"dc1","device":"desktop","login":"in"},"timestamp":1525356120000,"value":10000}`.
//! The final value of a point is its last line.

use std::fs::File;
use std::io::{BufWriter, Write};

use super::{Sink, SinkError};
use crate::aggregate::{Namer, Point};
use crate::health::HealthPoint;

pub struct FileSink {
    out: BufWriter<File>,
    path: String,
    line: String,
}

impl FileSink {
    pub fn create(path: &str) -> Result<FileSink, SinkError> {
        let io = |source| SinkError::Io { sink: format!("file:{path}"), source };
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
        }
        let f = File::create(path).map_err(io)?;
        Ok(FileSink { out: BufWriter::with_capacity(1 << 20, f), path: path.to_string(), line: String::new() })
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends one upsert line (with its newline) to `out`.
pub fn format_point(out: &mut String, p: &Point, namer: &Namer) {
    use std::fmt::Write;
    out.push_str("{\"name\":\"");
    let start = out.len();
    namer.write_name(p.key, out);
    // Metric names come from config and input names; escape if needed.
    if out[start..].bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        let name = out.split_off(start);
        out.pop();
        push_json_str(out, &name);
    } else {
        out.push('"');
    }
    out.push_str(",\"tags\":{\"dc\":");
    push_json_str(out, namer.dc());
    out.push_str(",\"device\":");
    push_json_str(out, namer.device(p.key));
    out.push_str(",\"login\":");
    push_json_str(out, namer.login(p.key));
    let _ = writeln!(out, "}},\"timestamp\":{},\"value\":{}}}", p.minute, p.value);
}

impl Sink for FileSink {
    fn write(&mut self, points: &[Point], namer: &Namer) -> Result<(), SinkError> {
        for p in points {
            self.line.clear();
            format_point(&mut self.line, p, namer);
            self.out
                .write_all(self.line.as_bytes())
                .map_err(|source| SinkError::Io { sink: format!("file:{}", self.path), source })?;
        }
        Ok(())
    }

    fn write_health(&mut self, ts_ms: i64, points: &[HealthPoint]) -> Result<(), SinkError> {
        use std::fmt::Write as _;
        for p in points {
            self.line.clear();
            self.line.push_str("{\"name\":");
            push_json_str(&mut self.line, &p.name);
            self.line.push_str(",\"tags\":{");
            for (i, (k, v)) in p.tags.iter().enumerate() {
                if i > 0 {
                    self.line.push(',');
                }
                push_json_str(&mut self.line, k);
                self.line.push(':');
                push_json_str(&mut self.line, v);
            }
            let _ = writeln!(self.line, "}},\"timestamp\":{ts_ms},\"value\":{}}}", p.value);
            self.out
                .write_all(self.line.as_bytes())
                .map_err(|source| SinkError::Io { sink: format!("file:{}", self.path), source })?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|source| SinkError::Io { sink: format!("file:{}", self.path), source })
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path)
    }
}
