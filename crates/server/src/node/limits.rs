//! The node's shared limits on chat operations: room creation per source address and
//! for the whole server ([`RoomCreation`]), and the byte budget of `signal`s between two
//! users ([`SignalBudget`]).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use hubbub_protocol::ErrorCode;

/// Token buckets for creating rooms: one per source address and one for the server.
pub struct RoomCreation {
    per_ip: governor::DefaultKeyedRateLimiter<IpAddr>,
    global: governor::DefaultDirectRateLimiter,
}

impl std::fmt::Debug for RoomCreation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomCreation").finish_non_exhaustive()
    }
}

impl RoomCreation {
    /// Buckets that refill `per_ip` and `global` rooms a minute, holding that many.
    pub fn new(per_ip: u32, global: u32) -> RoomCreation {
        let quota =
            |n: u32| governor::Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        RoomCreation {
            per_ip: governor::RateLimiter::keyed(quota(per_ip)),
            global: governor::RateLimiter::direct(quota(global)),
        }
    }

    /// Takes a token for a room created from `ip`, or says why not.
    pub fn check(&self, ip: IpAddr) -> Result<(), hubbub_protocol::ProtoError> {
        // Forget full buckets now and then, so the map does not grow with every address.
        if self.per_ip.len() > 4096 {
            self.per_ip.retain_recent();
        }
        if self.per_ip.check_key(&ip).is_err() {
            return Err(hubbub_protocol::ProtoError::new(
                ErrorCode::RateLimited,
                "too many new rooms from this address; try again in a minute",
            ));
        }
        if self.global.check().is_err() {
            return Err(hubbub_protocol::ProtoError::new(
                ErrorCode::RateLimited,
                "too many new rooms on this server; try again in a minute",
            ));
        }
        Ok(())
    }
}

/// A token bucket in bytes for each (sender, recipient) pair of `signal`s, shared by all
/// sessions: however many connections a sender opens, one recipient gets at most the
/// burst at once and the rate after that.
pub struct SignalBudget {
    limiter: governor::DefaultKeyedRateLimiter<(String, String)>,
    /// Counts takes; every [`SWEEP_EVERY`]th one forgets idle pairs.
    takes: std::sync::atomic::AtomicU64,
}

/// How often [`SignalBudget`] forgets pairs whose bucket is full again.
const SWEEP_EVERY: u64 = 1024;

impl SignalBudget {
    pub fn new(bytes_per_sec: u32, burst_bytes: u32) -> SignalBudget {
        let rate = std::num::NonZeroU32::new(bytes_per_sec).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(burst_bytes).unwrap_or(std::num::NonZeroU32::MIN);
        SignalBudget {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            takes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes `bytes` from the budget of `from` signalling `to`: false (and nothing
    /// taken) when the budget does not have them.
    pub fn take(&self, from: &str, to: &str, bytes: usize) -> bool {
        if self.takes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        let n = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        let n = std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        let key = (from.to_string(), to.to_string());
        matches!(self.limiter.check_key_n(&key, n), Ok(Ok(())))
    }
}

impl std::fmt::Debug for SignalBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalBudget")
            .field("pairs", &self.limiter.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signal_budget_is_per_pair_and_refuses_what_it_does_not_have() {
        let b = SignalBudget::new(1, 100);
        assert!(b.take("a", "b", 60));
        assert!(!b.take("a", "b", 60), "over the burst");
        assert!(b.take("a", "b", 40), "what is left");
        assert!(
            b.take("a", "c", 100),
            "another recipient has its own budget"
        );
        assert!(b.take("c", "b", 100), "another sender has its own budget");
        assert!(
            !b.take("a", "b", 1000),
            "more than the burst is never allowed"
        );
    }
}
