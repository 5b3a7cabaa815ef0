//! Coalescing and rate limiting for the daemon's work (cycles, reloads, repairs): however often
//! something asks, at most one run is pending; it starts no sooner than a debounce after the
//! first ask (so that a burst becomes one run), never while one is running, and at most `max`
//! runs start within any `per` window. Pure bookkeeping over instants the caller passes in, so
//! that it is tested without a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One kind of work's pending ask, run and recent starts.
#[derive(Debug, Clone)]
pub struct Gate {
    max: usize,
    per: Duration,
    debounce: Duration,
    /// The first ask since the last start.
    asked: Option<Instant>,
    running: bool,
    /// The last `max` starts, oldest first.
    starts: VecDeque<Instant>,
}

impl Gate {
    /// At most `max` (at least 1) starts per `per`, each `debounce` after its first ask.
    pub fn new(max: usize, per: Duration, debounce: Duration) -> Gate {
        Gate { max: max.max(1), per, debounce, asked: None, running: false, starts: VecDeque::new() }
    }

    /// Asks for a run. True when nothing was pending before (a new ask, worth a log line);
    /// false when it joins the one already pending.
    pub fn ask(&mut self, now: Instant) -> bool {
        let new = self.asked.is_none();
        self.asked.get_or_insert(now);
        new
    }

    /// A run is asked for and has not started.
    pub fn pending(&self) -> bool {
        self.asked.is_some()
    }

    /// When the pending run may start: `None` when nothing is pending or a run is under way.
    pub fn due(&self) -> Option<Instant> {
        let asked = self.asked?;
        if self.running {
            return None;
        }
        let debounced = asked + self.debounce;
        Some(match self.starts.front() {
            Some(&oldest) if self.starts.len() >= self.max => debounced.max(oldest + self.per),
            _ => debounced,
        })
    }

    /// Whether the pending run waits for the rate limit rather than its debounce.
    pub fn throttled(&self) -> bool {
        match (self.asked, self.due()) {
            (Some(asked), Some(due)) => due > asked + self.debounce,
            _ => false,
        }
    }

    /// The pending run starts now.
    pub fn start(&mut self, now: Instant) {
        self.asked = None;
        self.running = true;
        self.starts.push_back(now);
        while self.starts.len() > self.max {
            self.starts.pop_front();
        }
    }

    /// The run under way ended.
    pub fn finish(&mut self) {
        self.running = false;
    }

    /// Drops a pending ask (the work it asked for was done otherwise).
    pub fn cancel(&mut self) {
        self.asked = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn asks_during_a_run_become_one_more_run_no_sooner_than_the_rate_allows() {
        let t0 = Instant::now();
        let mut g = Gate::new(1, ms(1000), Duration::ZERO);
        assert_eq!(g.due(), None);
        assert!(g.ask(t0));
        assert_eq!(g.due(), Some(t0));
        g.start(t0);
        // A storm while it runs: one pending ask, no start before the run ends.
        assert!(g.ask(t0 + ms(10)));
        for i in 0..500 {
            assert!(!g.ask(t0 + ms(11 + i)));
        }
        assert_eq!(g.due(), None, "not while running");
        g.finish();
        assert_eq!(g.due(), Some(t0 + ms(1000)), "one per second");
        assert!(g.throttled());
        g.start(t0 + ms(1000));
        g.finish();
        assert!(!g.pending(), "the storm was one run");
        assert_eq!(g.due(), None);
    }

    #[test]
    fn a_burst_is_debounced_and_at_most_max_start_per_window() {
        let t0 = Instant::now();
        let mut g = Gate::new(5, ms(1000), ms(10));
        for i in 0..5 {
            let at = t0 + ms(100 * i);
            g.ask(at);
            g.ask(at + ms(3));
            assert_eq!(g.due(), Some(at + ms(10)), "debounced from the first ask");
            assert!(!g.throttled());
            g.start(at + ms(10));
            g.finish();
        }
        // The sixth within the second waits for the first to leave the window.
        g.ask(t0 + ms(500));
        assert_eq!(g.due(), Some(t0 + ms(1010)));
        assert!(g.throttled());
        g.cancel();
        assert_eq!(g.due(), None);
    }
}
