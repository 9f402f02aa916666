//! Rate limits for log lines a guest or a client can trigger: the first few occurrences are
//! logged, then at most one line per interval, carrying how many were left out meanwhile.
//! A guest that fails its disk in a loop, or a client that sends bad requests, cannot fill
//! the host's logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Occurrences logged one by one before the limit applies.
pub const LOG_FIRST: u32 = 5;
/// After those, at most one line per this long.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Decides which occurrences of one kind of event are logged.
#[derive(Debug)]
pub struct LogLimiter {
    first: u32,
    interval: Duration,
    logged: u32,
    suppressed: u64,
    last: Option<Instant>,
}

impl LogLimiter {
    /// [`LOG_FIRST`] lines, then one per [`LOG_INTERVAL`].
    pub const fn new() -> Self {
        Self::with(LOG_FIRST, LOG_INTERVAL)
    }

    /// `first` lines, then one per `interval`.
    pub const fn with(first: u32, interval: Duration) -> Self {
        Self {
            first,
            interval,
            logged: 0,
            suppressed: 0,
            last: None,
        }
    }

    /// One occurrence at `now`: `Some(n)` when it is to be logged, `n` being how many were
    /// left out since the last line logged; `None` when it is left out.
    pub fn check_at(&mut self, now: Instant) -> Option<u64> {
        let due = self.logged < self.first
            || self
                .last
                .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.logged = self.logged.saturating_add(1);
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// [`LogLimiter::check_at`] now.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// A [`LogLimiter`] shared by threads (a `static` for one log site).
#[derive(Debug)]
pub struct SharedLogLimiter(Mutex<LogLimiter>);

impl SharedLogLimiter {
    /// [`LogLimiter::new`]'s limits.
    pub const fn new() -> Self {
        Self(Mutex::new(LogLimiter::new()))
    }

    /// See [`LogLimiter::check`].
    pub fn check(&self) -> Option<u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).check()
    }
}

impl Default for SharedLogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// ` (N similar messages left out)` when `n` is not zero, for the end of a limited line.
pub fn left_out(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages left out)")
    }
}

/// Logs at `level` through `limiter`: the message is only formatted when it is logged.
#[macro_export]
macro_rules! limited_log_with {
    ($limiter:expr, $level:expr, $($arg:tt)+) => {
        if let Some(n) = $limiter.check() {
            log::log!($level, "{}{}", format_args!($($arg)+), $crate::log_limit::left_out(n));
        }
    };
}

/// Logs at `level`, limited by a [`SharedLogLimiter`] of this call site's own.
#[macro_export]
macro_rules! limited_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::SharedLogLimiter =
            $crate::log_limit::SharedLogLimiter::new();
        $crate::limited_log_with!(LIMIT, $level, $($arg)+)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_lines_pass_then_one_per_interval_with_the_count_left_out() {
        let mut limiter = LogLimiter::with(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.check_at(t0), Some(0));
        assert_eq!(limiter.check_at(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(limiter.check_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(limiter.check_at(t0 + Duration::from_secs(20)), Some(1));
    }

    #[test]
    fn left_out_counts_are_said_only_when_there_are_some() {
        assert_eq!(left_out(0), "");
        assert_eq!(left_out(3), " (3 similar messages left out)");
    }
}
