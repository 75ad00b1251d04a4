//! What clients may hold at the door: connections, time to finish the
//! handshake (TLS and the HTTP/2 preface), streams and header bytes per
//! connection, and how long a peer that stops answering keeps its connection. Refusals are counted and logged at a bounded
//! rate, so a hostile client cannot flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ProxyError;

/// Limits on connections at the proxy; `Default` is sized for a production
/// federation (thousands of parties and users).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// Time from accepting TCP to a completed TLS handshake and the
    /// client's HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// Bytes of request headers (metadata) per call.
    pub max_header_list_size: u32,
    /// How often an HTTP/2 PING checks that the peer is still there ...
    pub keepalive_interval: Duration,
    /// ... and how long its answer may take before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
            max_header_list_size: 16 * 1024,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

impl ConnectionLimits {
    /// Checks every limit is within its sane range; errors name the flag.
    pub fn validate(&self) -> Result<(), ProxyError> {
        fn check(ok: bool, message: &str) -> Result<(), ProxyError> {
            if ok {
                Ok(())
            } else {
                Err(ProxyError::Config(message.to_string()))
            }
        }
        check(
            (1..=1_000_000).contains(&self.max_connections),
            "--max-connections: must be between 1 and 1000000",
        )?;
        check(
            (Duration::from_millis(10)..=Duration::from_secs(120))
                .contains(&self.handshake_timeout),
            "--handshake-timeout: must be between 10ms and 2m (a silent client holds a \
             connection that long)",
        )?;
        check(
            (1..=10_000).contains(&self.max_concurrent_streams),
            "--max-concurrent-streams: must be between 1 and 10000",
        )?;
        check(
            (4096..=1 << 20).contains(&self.max_header_list_size),
            "--max-header-list-size: must be between 4096 and 1048576 bytes",
        )?;
        check(
            (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.keepalive_interval),
            "--http2-keepalive-interval: must be between 1s and 1h",
        )?;
        check(
            (Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.keepalive_timeout),
            "--http2-keepalive-timeout: must be between 1s and 10m",
        )
    }
}

/// Lets one kind of log line through at most once per interval and counts
/// the ones held back.
pub(crate) struct LogThrottle {
    interval: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Default)]
struct ThrottleState {
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(ThrottleState::default()),
        }
    }

    /// `Some(n)`: log now, `n` lines were held back since the last one;
    /// `None`: stay quiet.
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                state.held_back += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.held_back))
            }
        }
    }
}

/// How often each kind of refusal may be logged.
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_bad_limit_names_its_flag() {
        ConnectionLimits::default()
            .validate()
            .expect("defaults must pass");
        type Spoil = fn(&mut ConnectionLimits);
        let cases: [(Spoil, &str); 6] = [
            (|l| l.max_connections = 0, "--max-connections"),
            (
                |l| l.handshake_timeout = Duration::ZERO,
                "--handshake-timeout",
            ),
            (|l| l.max_concurrent_streams = 0, "--max-concurrent-streams"),
            (|l| l.max_header_list_size = 100, "--max-header-list-size"),
            (
                |l| l.keepalive_interval = Duration::ZERO,
                "--http2-keepalive-interval",
            ),
            (
                |l| l.keepalive_timeout = Duration::from_secs(3600),
                "--http2-keepalive-timeout",
            ),
        ];
        for (spoil, flag) in cases {
            let mut limits = ConnectionLimits::default();
            spoil(&mut limits);
            let error = limits.validate().expect_err(flag).to_string();
            assert!(error.starts_with(flag), "{error}");
        }
    }

    #[test]
    fn throttle_lets_one_line_per_interval_through_and_counts_the_rest() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.admit_at(start), Some(0));
        for s in 1..=5 {
            assert_eq!(throttle.admit_at(start + Duration::from_secs(s)), None);
        }
        assert_eq!(throttle.admit_at(start + Duration::from_secs(10)), Some(5));
        assert_eq!(throttle.admit_at(start + Duration::from_secs(11)), None);
        assert_eq!(throttle.admit_at(start + Duration::from_secs(25)), Some(1));
    }
}
