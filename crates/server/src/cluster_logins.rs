//! The login throttle of a cluster, kept in Redis so that every node counts the same
//! attempts: guesses spread over N nodes get no more checks than on one.
//!
//! It has the rules of [`LoginThrottle`] (the node's own throttle, which keeps running
//! beside it): every attempt is counted before its check, one check per account runs at
//! a time in the whole cluster (a lease that expires, so a node that dies mid-check
//! frees it), and delays grow per account (to 30 s) and per address (to 15 min). Each
//! step is one Lua script, so concurrent nodes never lose a count. While Redis cannot
//! be reached, logins are throttled by each node alone (and a warning is logged).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::auth::LoginThrottle;

/// How long a check of one account may hold the account's lease.
const LEASE: Duration = Duration::from_secs(10);
/// Longest wait for Redis before throttling on this node alone.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The steps, one script: `KEYS` are the account's counter, the address's counter and
/// the account's lease; `ARGV[1]` the step, `ARGV[2]` now (ms), `ARGV[3]` the lease's
/// token, then the limits. `begin` answers the wait in ms (0: go ahead).
const SCRIPT: &str = r#"
local step, now, token = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local free, first = tonumber(ARGV[4]), tonumber(ARGV[5])
local maxes = {tonumber(ARGV[6]), tonumber(ARGV[7])}
local forget, lease = tonumber(ARGV[8]), tonumber(ARGV[9])
local function delay(f, max)
  if f < free then return 0 end
  return math.floor(math.min(first * math.pow(2, math.min(f - free, 20)), max))
end
local function get(i)
  local v = redis.call('HMGET', KEYS[i], 'f', 'nb')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0')
end
local function put(i, f, nb)
  redis.call('HSET', KEYS[i], 'f', f, 'nb', nb)
  redis.call('PEXPIRE', KEYS[i], forget + maxes[i])
end
local function uncount(i)
  local f = get(i)
  if f > 0 then put(i, f - 1, now + delay(f - 1, maxes[i])) end
end
local function release()
  if redis.call('GET', KEYS[3]) == token then redis.call('DEL', KEYS[3]) end
end
if step == 'begin' then
  local wait = 0
  for i = 1, 2 do
    local _, nb = get(i)
    wait = math.max(wait, nb - now)
  end
  if redis.call('EXISTS', KEYS[3]) == 1 then wait = math.max(wait, first) end
  if wait > 0 then return math.floor(wait) end
  for i = 1, 2 do
    local f, nb = get(i)
    if now >= nb + forget then f = 0 end
    put(i, f + 1, now + delay(f + 1, maxes[i]))
  end
  redis.call('SET', KEYS[3], token, 'PX', lease)
  return 0
elseif step == 'failed' then
  for i = 1, 2 do
    local f = get(i)
    put(i, f, now + delay(f, maxes[i]))
  end
elseif step == 'succeeded' then
  redis.call('DEL', KEYS[1])
  uncount(2)
elseif step == 'not_checked' then
  uncount(1)
  uncount(2)
end
release()
return 0
"#;

/// The cluster-wide login throttle (see the module docs).
pub struct ClusterLogins {
    client: redis::Client,
    script: redis::Script,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

/// How a login attempt let through by [`ClusterLogins::begin`] ended.
#[derive(Debug, Clone, Copy)]
pub enum Verdict {
    Failed,
    Succeeded,
    NotChecked,
}

/// One attempt counted in Redis; [`SharedAttempt::finish`] reports its end. Dropped
/// unfinished, it stays counted as a failure and its lease is released.
pub struct SharedAttempt {
    logins: Arc<ClusterLogins>,
    keys: [String; 3],
    token: String,
    finished: bool,
}

impl ClusterLogins {
    pub fn new(url: &str) -> anyhow::Result<Arc<ClusterLogins>> {
        Ok(Arc::new(ClusterLogins {
            client: crate::cluster::redis_client(url)?,
            script: redis::Script::new(SCRIPT),
            conn: tokio::sync::Mutex::new(None),
        }))
    }

    async fn run(&self, step: &str, keys: &[String; 3], token: &str) -> anyhow::Result<u64> {
        let mut guard = self.conn.lock().await;
        let mut conn = match guard.as_ref() {
            Some(c) => c.clone(),
            None => {
                let c =
                    tokio::time::timeout(TIMEOUT, self.client.get_multiplexed_async_connection())
                        .await??;
                *guard = Some(c.clone());
                c
            }
        };
        drop(guard);
        let now = crate::store::now_ms();
        let mut invocation = self.script.prepare_invoke();
        invocation.key(&keys[0]).key(&keys[1]).key(&keys[2]);
        invocation
            .arg(step)
            .arg(now)
            .arg(token)
            .arg(LoginThrottle::FREE_ATTEMPTS)
            .arg(LoginThrottle::FIRST_DELAY.as_millis() as u64)
            .arg(LoginThrottle::MAX_ACCOUNT_DELAY.as_millis() as u64)
            .arg(LoginThrottle::MAX_ADDRESS_DELAY.as_millis() as u64)
            .arg(LoginThrottle::FORGET_AFTER.as_millis() as u64)
            .arg(LEASE.as_millis() as u64);
        let answer = tokio::time::timeout(TIMEOUT, invocation.invoke_async::<u64>(&mut conn)).await;
        match answer {
            Ok(Ok(wait)) => Ok(wait),
            Ok(Err(e)) => {
                *self.conn.lock().await = None;
                Err(e.into())
            }
            Err(e) => {
                *self.conn.lock().await = None;
                Err(e.into())
            }
        }
    }

    /// Counts an attempt for `account` from `address` in the cluster and takes the
    /// account's lease, or says how long to wait. `Ok(None)`: Redis cannot be reached,
    /// so only this node's throttle applies.
    pub async fn begin(
        self: &Arc<Self>,
        account: &str,
        address: IpAddr,
    ) -> Result<Option<SharedAttempt>, Duration> {
        let keys = [
            format!("hubbub:login:user:{account}"),
            format!("hubbub:login:ip:{address}"),
            format!("hubbub:login:busy:{account}"),
        ];
        let token = ulid::Ulid::new().to_string();
        match self.run("begin", &keys, &token).await {
            Ok(0) => Ok(Some(SharedAttempt {
                logins: self.clone(),
                keys,
                token,
                finished: false,
            })),
            Ok(wait) => Err(Duration::from_millis(wait)),
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's login throttle is unreachable; this node's applies alone");
                Ok(None)
            }
        }
    }
}

impl SharedAttempt {
    /// Reports how the attempt ended and releases the account's lease.
    pub async fn finish(mut self, verdict: Verdict) {
        self.finished = true;
        let step = match verdict {
            Verdict::Failed => "failed",
            Verdict::Succeeded => "succeeded",
            Verdict::NotChecked => "not_checked",
        };
        if let Err(e) = self.logins.run(step, &self.keys, &self.token).await {
            tracing::warn!(error = %e, "cannot report a login attempt to the cluster's throttle");
        }
    }
}

impl Drop for SharedAttempt {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Abandoned (the request went away): counted as a failure, lease released.
        let (logins, keys, token) = (
            self.logins.clone(),
            std::mem::take(&mut self.keys),
            std::mem::take(&mut self.token),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = logins.run("failed", &keys, &token).await;
            });
        }
    }
}
