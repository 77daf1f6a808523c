//! Line-oriented corpus readers. Files (optionally gzip-compressed) are read lazily, line by line; a malformed line is an
//! error naming the file and line, or (when the caller asks) skipped and counted.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Lines of a UTF-8 file, numbered from 1, without their line terminator (`\n` or `\r\n`).
pub struct Lines {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    line: usize,
    buf: Vec<u8>,
}

impl Lines {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Gzip-compressed corpora (`.gz`) are read transparently (the bundled data is stored so).
        let reader: Box<dyn BufRead + Send> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
        } else {
            Box::new(BufReader::new(file))
        };
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            line: 0,
            buf: Vec::new(),
        })
    }

    fn error(&self, msg: impl Into<String>) -> Error {
        Error::Data {
            path: self.path.clone(),
            line: self.line,
            msg: msg.into(),
        }
    }
}

impl Iterator for Lines {
    /// (line number, text)
    type Item = Result<(usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                    self.buf.pop();
                }
                Some(match std::str::from_utf8(&self.buf) {
                    Ok(s) => Ok((self.line, s.to_string())),
                    Err(e) => Err(self.error(format!(
                        "invalid UTF-8 at byte {} of the line",
                        e.valid_up_to()
                    ))),
                })
            }
            Err(source) => Some(Err(Error::Io {
                path: self.path.clone(),
                source,
            })),
        }
    }
}

/// What a reader kept and how many malformed lines it skipped.
#[derive(Debug, Default)]
pub struct Records<T> {
    pub records: Vec<T>,
    pub skipped: usize,
    /// The first skipped line's error, to show the user what was wrong.
    pub first_skipped: Option<String>,
}

/// Split `line` into exactly two non-empty tab-separated fields.
fn two_fields<'a>(
    line: &'a str,
    what: [&str; 2],
) -> std::result::Result<(&'a str, &'a str), String> {
    let fields: Vec<&str> = line.split('\t').collect();
    if fields.len() != 2 {
        return Err(format!(
            "expected `{}<TAB>{}`, found {} tab(s)",
            what[0],
            what[1],
            fields.len() - 1
        ));
    }
    for (field, name) in fields.iter().zip(what) {
        if field.trim().is_empty() {
            return Err(format!("empty {name}"));
        }
    }
    Ok((fields[0].trim(), fields[1].trim()))
}

fn read_pairs(
    path: &Path,
    what: [&str; 2],
    skip_malformed: bool,
) -> Result<Records<(String, String)>> {
    let mut out = Records::default();
    for item in Lines::open(path)? {
        let (line, text) = match item {
            Ok(x) => x,
            Err(e @ Error::Data { .. }) if skip_malformed => {
                out.skipped += 1;
                out.first_skipped.get_or_insert(e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        if text.trim().is_empty() {
            continue;
        }
        match two_fields(&text, what) {
            Ok((a, b)) => out.records.push((a.to_string(), b.to_string())),
            Err(msg) => {
                let err = Error::Data {
                    path: path.to_path_buf(),
                    line,
                    msg,
                };
                if !skip_malformed {
                    return Err(err);
                }
                out.skipped += 1;
                out.first_skipped.get_or_insert(err.to_string());
            }
        }
    }
    Ok(out)
}

/// Parallel text: `source<TAB>target` per line. Blank lines are ignored.
pub fn read_parallel(path: &Path, skip_malformed: bool) -> Result<Records<(String, String)>> {
    read_pairs(path, ["source", "target"], skip_malformed)
}

/// Labelled text: `label<TAB>text` per line → (label, text). Blank lines are ignored.
pub fn read_labelled(path: &Path, skip_malformed: bool) -> Result<Records<(String, String)>> {
    read_pairs(path, ["label", "text"], skip_malformed)
}

/// Plain text for language modelling: the whole file, lines joined with `\n`.
pub fn read_text(path: &Path) -> Result<String> {
    let mut text = String::new();
    for item in Lines::open(path)? {
        let (_, line) = item?;
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}
