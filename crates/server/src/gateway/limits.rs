//! Connection limits, checked before the upgrade: in total (`503 unavailable`) and per
//! client IP address (`429 rate_limited`). The gateway counts WebSockets per client
//! address ([`crate::client_addr`]); the HTTP accept loop counts connections per peer,
//! except those of trusted proxies, which count in the total only.

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
    /// The address it counts for (None: the total only).
    ip: Option<IpAddr>,
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
        self.take_total()?;
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
            ip: Some(ip),
        })
    }

    /// Admits a connection that counts in the total only (one from a trusted proxy,
    /// which carries many clients), or says why not.
    pub fn try_acquire_total(self: &Arc<Self>) -> Result<ConnPermit, ApiError> {
        self.take_total()?;
        Ok(ConnPermit {
            limiter: self.clone(),
            ip: None,
        })
    }

    /// Takes a place in the total.
    fn take_total(&self) -> Result<(), ApiError> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("the server is full ({} connections)", self.max_total),
            ));
        }
        Ok(())
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
        if let Some(ip) = &self.ip {
            l.per_ip.remove_if_mut(ip, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
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

    #[test]
    fn connections_counted_in_the_total_only_have_no_address_cap() {
        let l = ConnLimiter::new(3, 1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let _p1 = l.try_acquire(a).unwrap();
        assert_eq!(
            l.try_acquire(a).unwrap_err().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        let t1 = l.try_acquire_total().unwrap();
        let _t2 = l.try_acquire_total().unwrap();
        assert_eq!(
            l.try_acquire_total().unwrap_err().status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the total still holds"
        );
        assert_eq!(
            l.per_ip.get(&a).map(|n| *n),
            Some(1),
            "not counted for an address"
        );
        drop(t1);
        assert_eq!(l.open(), 2);
        assert_eq!(l.per_ip.get(&a).map(|n| *n), Some(1));
    }
}
