//! Progress bars for long scans: drawn on stderr only when it is a terminal,
//! so piped and redirected output (and tests) stay clean.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that may be hidden; cheap to update.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar over `total` records labelled `what`, visible only on a terminal.
    pub fn new(total: u64, what: &str) -> Self {
        if !std::io::stderr().is_terminal() || total < 10_000 {
            return Self(None);
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        // A whole number of records a second (`{per_sec}` printed "1,007,036.0472/s").
        let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} records ({rate}, {eta})")
            .map(|s| {
                s.progress_chars("=> ").with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0} records/s", state.per_sec());
                    },
                )
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(what.to_owned());
        Self(Some(bar))
    }

    pub fn set(&self, position: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(position);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
