//! Connection limits, checked before the upgrade: in total (`503 unavailable`) and per
//! source IP address (`429 rate_limited`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use dashmap::DashMap;
use hubbub_protocol::ErrorCode;

use crate::api::ApiError;

/// Counts open WebSocket connections.
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        })
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, ApiError> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("the server is full ({} connections)", self.max_total),
            ));
        }
        let mut n = self.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(n);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!("at most {} connections per address", self.max_per_ip),
            ));
        }
        *n += 1;
        Ok(ConnPermit {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let l = &self.limiter;
        l.total.fetch_sub(1, Ordering::AcqRel);
        // Remove the entry at zero so the map does not grow with every address seen.
        l.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_address_and_frees_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(
            l.try_acquire(a).unwrap_err().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(
            l.try_acquire(b).unwrap_err().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.try_acquire(b).unwrap();
        assert_eq!(l.per_ip.get(&a).map(|n| *n), Some(1));
        drop(_p4);
        drop(_p3);
        assert!(l.per_ip.get(&b).is_none(), "empty entries are removed");
    }
}
