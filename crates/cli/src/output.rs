//! Where commands print their results, safe when the reader goes away.
//!
//! A reader that stops early (`passerelle check | head -1`) closes the pipe. Rust ignores
//! SIGPIPE, and resetting it would take `unsafe` code, which the workspace forbids; so
//! every later write fails with `BrokenPipe`, and `println!` would panic with a
//! backtrace. Every command therefore prints through an [`Output`], which turns a failed
//! write into a state instead of a panic (the approach `parse` took first, by returning
//! its write errors):
//!
//! - a closed reader is no error: output stops, silently, and the work that was asked for
//!   still finishes (messages sent, replays done, the store flushed); the exit status is
//!   the one that work decides, exactly as if the reader had read everything;
//! - commands whose only work is to print stop early, when [`Output::is_open`] turns false;
//! - any other write error (a full disk) is said on stderr at the end and fails the command.

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

/// Writes one line (`format!` arguments) to an [`Output`].
macro_rules! outln {
    ($out:expr) => {
        $out.line(format_args!(""))
    };
    ($out:expr, $($arg:tt)*) => {
        $out.line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes one line (`format!` arguments) to standard error, ignoring a failure: a problem
/// that cannot be shown (stderr closed, `2>&1 | head`) must not become a panic, and the
/// exit status still says it.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use errln;

/// A stream that records its first write error and then writes nothing more.
#[derive(Debug)]
pub(crate) struct Output<W: Write> {
    writer: W,
    error: Option<io::Error>,
}

impl Output<io::Stdout> {
    /// Standard output: results.
    pub(crate) fn stdout() -> Self {
        Output {
            writer: io::stdout(),
            error: None,
        }
    }
}

impl Output<io::Stderr> {
    /// Standard error: problems, where printing them must not end the command (a replay
    /// reports its failures before the store is flushed).
    pub(crate) fn stderr() -> Self {
        Output {
            writer: io::stderr(),
            error: None,
        }
    }
}

impl<W: Write> Output<W> {
    /// Writes `args` and a newline, unless an earlier write failed.
    pub(crate) fn line(&mut self, args: fmt::Arguments<'_>) {
        if self.error.is_some() {
            return;
        }
        let written = self
            .writer
            .write_fmt(args)
            .and_then(|()| self.writer.write_all(b"\n"));
        if let Err(e) = written {
            self.error = Some(e);
        }
    }

    /// Writes everything buffered out (a line announcing a server's address is read at once).
    pub(crate) fn flush(&mut self) {
        if self.error.is_none()
            && let Err(e) = self.writer.flush()
        {
            self.error = Some(e);
        }
    }

    /// Whether everything written so far went out: false once the reader has gone (or a
    /// write failed), when a command that only prints should stop.
    pub(crate) fn is_open(&self) -> bool {
        self.error.is_none()
    }

    /// Ends the output: `status` (what the command's work decided), unless a write failed
    /// for another reason than a reader that went away, which is said on stderr and fails
    /// the command.
    pub(crate) fn finish(mut self, command: &str, status: ExitCode) -> ExitCode {
        self.flush();
        match self.error {
            Some(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                let _ = writeln!(
                    io::stderr(),
                    "passerelle {command}: cannot write output: {e}"
                );
                ExitCode::FAILURE
            }
            _ => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails every write with one kind of error.
    #[derive(Debug)]
    struct Failing(io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn output(writer: Failing) -> Output<Failing> {
        Output {
            writer,
            error: None,
        }
    }

    #[test]
    fn a_closed_reader_keeps_the_status_and_other_errors_fail() {
        let mut closed = output(Failing(io::ErrorKind::BrokenPipe));
        assert!(closed.is_open());
        outln!(closed, "{}", 1);
        assert!(!closed.is_open());
        outln!(closed, "more, after the reader went");
        assert_eq!(
            closed.finish("test", ExitCode::SUCCESS),
            ExitCode::SUCCESS,
            "a reader that went away is no failure"
        );
        let full = output(Failing(io::ErrorKind::StorageFull));
        let mut full = full;
        outln!(full, "x");
        assert_eq!(full.finish("test", ExitCode::SUCCESS), ExitCode::FAILURE);
    }

    #[test]
    fn lines_are_written_with_newlines() {
        let mut out = Output {
            writer: Vec::new(),
            error: None,
        };
        outln!(out, "a {}", 1);
        outln!(out);
        assert_eq!(out.writer, b"a 1\n\n");
    }
}
