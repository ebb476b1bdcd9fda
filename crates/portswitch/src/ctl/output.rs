//! Everything `ctl` prints: text escaped for a terminal ([`text`], [`shown`]), one
//! JSON value per line ([`json_line`]), tables, stdout through [`Out`] (a reader
//! that has gone is [`StdoutClosed`], noticed early by [`stdout_gone`]) and notes on
//! standard error ([`note`]).

use std::fmt::Write as _;
use std::io::Write as _;

use super::BoxError;

pub(super) fn hex(n: u64) -> String {
    format!("{n:016x}")
}

/// Bytes (a name, a value, a node name, a server's message) as text that is safe to
/// show on a terminal: control characters — C0 (`\x1b` starts an escape sequence), DEL
/// and C1 — and the invisible bidirectional overrides are written as escapes, and
/// bytes that are not UTF-8 as `\xNN`. Everything else, other scripts included, shows
/// as it is.
pub(super) fn text(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                '\t' => s.push_str("\\t"),
                c if c.is_ascii_control() => {
                    let _ = write!(s, "\\x{:02x}", c as u32);
                }
                c if hidden(c) => {
                    let _ = write!(s, "\\u{{{:x}}}", c as u32);
                }
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s
}

/// A string from the command line or the server (an error message, say), escaped as
/// [`text`].
pub(crate) fn shown(s: &str) -> String {
    text(s.as_bytes())
}

/// Bytes as a JSON string value: UTF-8 as it is (invalid sequences replaced);
/// [`json_line`] escapes what a terminal would act on.
pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Characters beyond ASCII that a terminal acts on or that reorder the text around
/// them: C1 controls (U+009B is CSI on some terminals) and the bidirectional marks,
/// embeddings, overrides and isolates.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// One JSON value as a line. serde_json escapes C0 controls; DEL, C1 and the
/// bidirectional characters are escaped here as `\uXXXX` (all in the BMP). They can
/// only occur inside strings, so the line stays valid JSON with the same meaning.
pub(super) fn json_line(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if !s.chars().any(hidden) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if hidden(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// A table: a header row and rows, columns padded to their widest cell (cells are
/// already escaped, so one character is one column for the scripts names usually
/// use); the last column is not padded.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
            }
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    s.pop();
    s
}

/// Where the command's results go: stdout, as text or one JSON value per line.
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub(super) json: bool,
}

impl Out {
    /// Prints `human` or `j`, whichever the command was asked for.
    pub(super) fn line(&self, human: String, j: serde_json::Value) -> Result<(), BoxError> {
        if self.json {
            self.raw(&json_line(&j))
        } else {
            self.raw(&human)
        }
    }

    /// Prints one line as it is (already escaped). A reader that has gone away is
    /// [`StdoutClosed`]: the command ends, quietly.
    pub(super) fn raw(&self, line: &str) -> Result<(), BoxError> {
        let mut stdout = std::io::stdout().lock();
        match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
            Err(e) => Err(format!("cannot write to standard output: {e}").into()),
        }
    }
}

/// Resolves when standard output's reader has gone (the read end of its pipe closed),
/// so that a command that prints only now and then (`ctl watch x | head -1`) ends
/// with its reader rather than at its next write. Never resolves when stdout is a
/// terminal or a file, or when this cannot be told.
pub(super) async fn stdout_gone() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own, blocked in poll(2): no events are asked for, so only
    // POLLERR (a pipe without readers) or POLLHUP (a socket closed) wake it. It
    // ends with the process.
    let watcher = std::thread::Builder::new()
        .name("stdout-reader".into())
        .spawn(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let stdout = std::io::stdout();
            loop {
                let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::empty())];
                match poll(&mut fds, PollTimeout::NONE) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_)
                        if fds[0].revents().is_some_and(|r| {
                            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)
                        }) =>
                    {
                        let _ = tx.send(());
                        return;
                    }
                    // POLLNVAL (no stdout at all) or an error: nothing to watch.
                    _ => return,
                }
            }
        });
    if watcher.is_ok() && rx.await.is_ok() {
        return;
    }
    std::future::pending().await
}

/// A note for the user on standard error (progress, not results). One that cannot be
/// written is dropped: a closed stderr must not stop the command.
pub(crate) fn note(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// Standard output was closed by its reader (`ctl list | head -1`): the command
/// ends, its session with BYE, and the process exits with code 141 (the shell's code
/// for a process ended by SIGPIPE) and no message.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_bytes_are_escaped_and_the_rest_shown_as_is() {
        assert_eq!(text(b"svc/db"), "svc/db");
        assert_eq!(text("héllo/日本".as_bytes()), "héllo/日本");
        assert_eq!(text(b"a\x1b[31mred\x07"), "a\\x1b[31mred\\x07");
        assert_eq!(text(b"a\nb\tc\rd\x7f"), "a\\nb\\tc\\rd\\x7f");
        assert_eq!(text(b"bad\xff\xfe"), "bad\\xff\\xfe");
        assert_eq!(text("x\u{9b}31m".as_bytes()), "x\\u{9b}31m");
        assert_eq!(text("ab\u{202e}cd".as_bytes()), "ab\\u{202e}cd");
    }

    #[test]
    fn json_lines_escape_what_a_terminal_would_act_on_and_stay_json() {
        let v = json!({"port": "a\u{1b}b\u{7f}c\u{9b}d\u{2067}é"});
        let line = json_line(&v);
        assert!(
            line.chars().all(|c| !hidden(c) && !c.is_control()),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), v);
        assert_eq!(json_line(&json!({"a": 1})), r#"{"a":1}"#);
    }
}
