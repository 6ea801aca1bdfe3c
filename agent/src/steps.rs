//! Durations of the steps of one operation (a create, a start, a network attach), logged as
//! one line at its end so a slow step shows under load without a profiler.

use std::fmt;
use std::time::Instant;

/// The steps measured so far: each [`Steps::mark`] closes the step that began at the previous
/// mark (or at [`Steps::start`]).
#[derive(Debug)]
pub(crate) struct Steps {
    start: Instant,
    last: Instant,
    done: Vec<(&'static str, u64)>,
}

impl Steps {
    /// Starts measuring now.
    pub(crate) fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            done: Vec::with_capacity(8),
        }
    }

    /// Closes the running step as `name`.
    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        let us = now.duration_since(self.last).as_micros() as u64;
        self.done.push((name, us));
        self.last = now;
    }

    /// Milliseconds since [`Steps::start`].
    pub(crate) fn total_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl fmt::Display for Steps {
    /// `name=12.3ms name=0.4ms …`, in the order the steps ran.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, us)) in self.done.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={}.{}ms", us / 1000, (us % 1000) / 100)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_steps_in_order() {
        let mut s = Steps::start();
        s.mark("a");
        s.mark("b");
        let text = s.to_string();
        assert!(text.starts_with("a=") && text.contains(" b="), "{text}");
        assert!(s.total_ms() < 1000);
    }
}
