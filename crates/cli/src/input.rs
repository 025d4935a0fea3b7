//! Reading HL7 v2 input files the way every subcommand does: each file holds one message,
//! concatenated messages or a batch; each message is labelled `file` (or `file#n` when the
//! file holds several), and every problem is reported on stderr with its label.

use std::ops::ControlFlow;
use std::path::PathBuf;

use crate::output::errln;
use passerelle_hl7::{Message, ParseOptions, batch};

/// Calls `each(label, message)` for every message of every file that parses. `each`
/// says whether it handled the message (`Continue(false)` counts as a failure), or to
/// stop (`Break`: its output has gone). Returns the number of failures until then:
/// unreadable files, batch errors, messages that do not parse, and the messages `each`
/// refused.
pub(crate) fn for_each_message(
    files: &[PathBuf],
    mut each: impl FnMut(&str, &Message<'_>) -> ControlFlow<(), bool>,
) -> usize {
    let mut failures = 0;
    for file in files {
        let name = file.display().to_string();
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                errln!("{name}: cannot read: {e}");
                failures += 1;
                continue;
            }
        };
        let messages = match batch::parse_all(&bytes, &ParseOptions::default()) {
            Ok(m) => m,
            Err(e) => {
                errln!("{name}: {e}");
                failures += 1;
                continue;
            }
        };
        let several = messages.len() > 1;
        for (i, parsed) in messages.iter().enumerate() {
            let label = if several {
                format!("{name}#{}", i + 1)
            } else {
                name.clone()
            };
            match parsed {
                Ok(message) => match each(&label, message) {
                    ControlFlow::Continue(true) => {}
                    ControlFlow::Continue(false) => failures += 1,
                    ControlFlow::Break(()) => return failures,
                },
                Err(e) => {
                    errln!("{label}: {e}");
                    failures += 1;
                }
            }
        }
    }
    failures
}
