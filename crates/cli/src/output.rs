//! What the CLI prints for people: stdout carries results (a token, a
//! table), stderr carries logs and progress.

use std::io::Write;

/// Writes a line to stdout, ignoring a closed pipe (`strata … | head`).
pub(crate) fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}
