//! `orderbridge prove SUITE`: evidence anyone can run. Each suite drives the
//! daemon as deployed (the real binary as a child process, `--config FILE
//! run`) against the in-process simulators, breaks something on purpose, and
//! checks from the outside (the simulators' records and the database) that
//! nothing was lost or done twice. It prints one `key: value` per line and
//! fails (exit 1) naming every broken promise. The short versions run in
//! `.ci/run`; the full ones by hand (`scripts/prove.sh SUITE --full`).

pub mod crash;
pub mod faults;
pub mod load;
pub mod security;
pub mod world;

use std::io::Write;

/// Why a suite failed: its harness broke, or the daemon broke a promise.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error(transparent)]
    Harness(#[from] crate::bench::BenchError),
    #[error("the daemon broke its promises: {0}")]
    Broken(String),
}

/// Prints the figures, then fails when any promise was broken.
pub(crate) fn report(
    out: &mut impl Write,
    figures: &[(&str, String)],
    broken: &[String],
) -> Result<(), ProveError> {
    for (key, value) in figures {
        writeln!(out, "{key}: {value}").map_err(crate::bench::BenchError::from)?;
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(ProveError::Broken(broken.join("; ")))
    }
}
