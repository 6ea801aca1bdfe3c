//! Progress of the CLI's long jobs (image import and pull, migration, `cp`) on stderr.
//!
//! Holds [`Progress`] and the [`Unit`] its counts are in. On a terminal an `indicatif` bar
//! shows the phase, the count against the total, the rate and the time left; a spinner with
//! the count when the total is not known. When stderr is not a terminal nothing is drawn:
//! scripts and tests see only the commands' plain output, as before.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What a job's counts measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// Bytes: shown human-readable, with a rate and the time left.
    Bytes,
    /// Whole items (image layers), shown as `n/total`.
    Items,
}

/// The progress of one job: a bar on a terminal, nothing otherwise.
#[derive(Debug)]
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    /// The unit and known-ness of the total the bar is drawn for now.
    shape: Option<(Unit, bool)>,
    /// The phase shown now.
    phase: String,
}

/// How often a spinner turns while no count comes in.
const TICK: Duration = Duration::from_millis(120);

/// The bar's template for counts in `unit`, `known` when the total is.
fn template(unit: Unit, known: bool) -> &'static str {
    match (unit, known) {
        (Unit::Bytes, true) => {
            "{msg:<10} [{bar:25}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
        }
        (Unit::Bytes, false) => "{spinner} {msg:<10} {bytes} {binary_bytes_per_sec}",
        (Unit::Items, true) => "{msg:<10} [{bar:25}] {pos}/{len}",
        (Unit::Items, false) => "{spinner} {msg:<10} {pos}",
    }
}

fn style(unit: Unit, known: bool) -> ProgressStyle {
    match ProgressStyle::with_template(template(unit, known)) {
        Ok(s) => s.progress_chars("#>-"),
        Err(_) if known => ProgressStyle::default_bar(),
        Err(_) => ProgressStyle::default_spinner(),
    }
}

impl Progress {
    /// Progress drawn on stderr when it is a terminal.
    pub(super) fn stderr() -> Self {
        Self::new(std::io::stderr().is_terminal())
    }

    /// Progress drawn on stderr when `draw`, else none at all.
    fn new(draw: bool) -> Self {
        let bar = draw.then(|| ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()));
        Self {
            bar,
            shape: None,
            phase: String::new(),
        }
    }

    /// Whether anything is drawn.
    pub(super) fn is_drawn(&self) -> bool {
        self.bar.is_some()
    }

    /// The job is in `phase` with `current` of `total` (0: not known) done. Another unit,
    /// known-ness of the total or a count that went back restarts the bar (and its rate and
    /// time estimates); another phase alone only changes its name.
    pub(super) fn set(&mut self, phase: &str, unit: Unit, current: u64, total: u64) {
        let Some(bar) = &self.bar else { return };
        let known = total > 0;
        if self.shape != Some((unit, known)) || current < bar.position() {
            bar.reset();
            bar.set_style(style(unit, known));
            if known {
                bar.disable_steady_tick();
            } else {
                bar.unset_length();
                bar.enable_steady_tick(TICK);
            }
            self.shape = Some((unit, known));
        }
        if self.phase != phase {
            bar.set_message(Cow::Owned(phase.to_string()));
            self.phase = phase.to_string();
        }
        if known {
            bar.set_length(total);
        }
        bar.set_position(current);
    }

    /// `n` more done in the current phase.
    pub(super) fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// A counter of bytes done, for a stream that outlives this borrow.
    pub(super) fn counter(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |n| {
            if let Some(bar) = &bar {
                bar.inc(n);
            }
        }
    }

    /// Stops drawing and leaves the last state on its own line, so that what is printed
    /// next starts on a fresh line.
    pub(super) fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

impl Drop for Progress {
    /// A job that ends early (an error) leaves its bar as it was, on its own line, when it
    /// got anywhere; a bar that never counted anything is cleared.
    fn drop(&mut self) {
        let Some(bar) = self.bar.as_ref().filter(|b| !b.is_finished()) else {
            return;
        };
        if bar.position() == 0 {
            bar.finish_and_clear();
        } else {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_drawn_off_a_terminal() {
        let mut p = Progress::new(false);
        assert!(!p.is_drawn());
        p.set("fetching", Unit::Bytes, 10, 100);
        p.inc(5);
        p.counter()(5);
        p.done();
        assert!(p.shape.is_none());
    }

    #[test]
    fn templates_parse_and_say_what_they_show() {
        for unit in [Unit::Bytes, Unit::Items] {
            for known in [true, false] {
                let t = template(unit, known);
                assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
                assert!(t.contains("{msg:<10}"), "{t}");
                // A bar needs a total; without one a spinner turns.
                assert_eq!(t.contains("{bar"), known, "{t}");
                assert_eq!(t.contains("{spinner}"), !known, "{t}");
                let eta = unit == Unit::Bytes && known;
                assert_eq!(t.contains("{eta}"), eta, "{t}");
                assert_eq!(t.contains("bytes_per_sec"), unit == Unit::Bytes, "{t}");
            }
        }
    }

    #[test]
    fn a_new_unit_or_a_count_going_back_restarts_the_bar() {
        // Drawn to nowhere: the bar keeps its state without a terminal.
        let mut p = Progress {
            bar: Some(ProgressBar::hidden()),
            shape: None,
            phase: String::new(),
        };
        let bar = p.bar.clone().unwrap();
        p.set("snapshot", Unit::Bytes, 0, 0);
        assert_eq!(bar.length(), None);
        assert_eq!(bar.message(), "snapshot");
        p.set("copying", Unit::Bytes, 40, 100);
        assert_eq!((bar.position(), bar.length()), (40, Some(100)));
        assert_eq!(bar.message(), "copying");
        p.inc(10);
        assert_eq!(bar.position(), 50);
        p.counter()(5);
        assert_eq!(bar.position(), 55);
        // Same unit and total: the phase is renamed, the bar goes on.
        let started = bar.elapsed();
        p.set("verifying", Unit::Bytes, 100, 100);
        assert_eq!(bar.message(), "verifying");
        assert!(bar.elapsed() >= started);
        assert_eq!(p.shape, Some((Unit::Bytes, true)));
        p.set("unpacking", Unit::Items, 1, 3);
        assert_eq!((bar.position(), bar.length()), (1, Some(3)));
        assert_eq!(p.shape, Some((Unit::Items, true)));
        p.done();
        assert!(bar.is_finished());
    }

    #[test]
    fn an_early_end_clears_a_bar_that_counted_nothing() {
        let bar = ProgressBar::hidden();
        let mut p = Progress {
            bar: Some(bar.clone()),
            shape: None,
            phase: String::new(),
        };
        p.set("receiving", Unit::Bytes, 0, 0);
        drop(p);
        assert!(bar.is_finished());
    }
}
