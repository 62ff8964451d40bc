//! Who is calling: the one seam every credential goes through, plus accounts (argon2id
//! password hashes) and signed tokens (JWT, HS256).
//!
//! PROTOCOL.md's order: `Authorization: Bearer <jwt>` header, then `?token=`, then the
//! guest `?user=` (only in guest mode). A guest never has admin rights.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm as HashAlgorithm, Argon2, Block, Params, Version};
use axum::http::{header, HeaderMap};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hubbub_protocol::is_valid_user_name;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::now_ms;

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted password, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Name of the token secret file in the data dir.
pub const SECRET_FILE: &str = "jwt.secret";
/// Longest token lifetime, in seconds (ten years of 365 days): longer ones overflow the
/// expiry's arithmetic and no deployment needs them.
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub guest: bool,
    pub admin: bool,
    /// When the token expires (Unix ms); `None` for guests.
    pub expires_at: Option<i64>,
}

/// Claims of a hubbub token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    sub: String,
    /// Expiry, Unix seconds.
    exp: u64,
    /// Issued at, Unix seconds.
    iat: u64,
}

/// Signs and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Default lifetime of a token.
    pub ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Tokens {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // Valid while now < exp (whole seconds), the same instant a live session whose
        // token expires is closed.
        validation.reject_tokens_expiring_in_less_than = 1;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for `user`, valid for `ttl` (default: the configured one). Returns the
    /// token and its expiry in Unix ms.
    /// A lifetime over [`MAX_TOKEN_TTL_SECS`] is refused.
    pub fn issue(&self, user: &str, ttl: Option<Duration>) -> Result<(String, i64), AuthError> {
        let ttl = ttl.unwrap_or(self.ttl).as_secs();
        if ttl > MAX_TOKEN_TTL_SECS {
            return Err(AuthError::LifetimeTooLong(ttl));
        }
        let now = (now_ms() / 1000) as u64;
        let exp = now + ttl;
        let claims = Claims {
            sub: user.to_string(),
            exp,
            iat: now,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::BadToken(format!("cannot sign: {e}")))?;
        Ok((token, exp as i64 * 1000))
    }

    /// Checks signature (HS256 only: `alg: none` and others are refused), expiry and the
    /// user name.
    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::BadToken(e.to_string()),
            })?;
        if !is_valid_user_name(&data.claims.sub) {
            return Err(AuthError::BadToken("invalid subject".into()));
        }
        Ok(data.claims)
    }
}

/// Reads the token secret from `dir/jwt.secret`, creating it (random, mode 0600) on first
/// use.
pub fn load_or_create_secret(dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = dir.join(SECRET_FILE);
    let read = |path: &Path| -> std::io::Result<Vec<u8>> {
        let s = std::fs::read_to_string(path)?;
        if s.trim().is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is empty: delete it to make a new secret",
                    path.display()
                ),
            ));
        }
        Ok(s.trim().as_bytes().to_vec())
    };
    match read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    std::fs::create_dir_all(dir)?;
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    // Written whole under a private name, then linked into place, which fails if the
    // file exists: a process starting at the same moment (`hubbub token` beside a
    // starting server) never reads a half-written secret, and one of the two wins.
    let tmp = dir.join(format!("{SECRET_FILE}.{:016x}.tmp", rand::random::<u64>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    {
        use std::io::Write;
        let mut f = opts.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(secret.into_bytes()),
        // Someone else created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        Err(e) => Err(e),
    }
}

/// Checks a new password against the length rules.
pub fn check_password_rules(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!("a password has at most {MAX_PASSWORD_BYTES} bytes"));
    }
    Ok(())
}

thread_local! {
    /// This thread's argon2 working memory (19 MiB with the default parameters), kept
    /// from one hash to the next: password work runs on a fixed set of threads, so the
    /// memory it holds is that many buffers, whatever the allocator does with freed ones.
    static HASH_MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// The argon2 output of `password` and `salt`, `len` bytes long, computed in this
/// thread's kept memory.
fn argon2_output(
    argon: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    len: usize,
) -> Result<Output, String> {
    HASH_MEMORY.with_borrow_mut(|blocks| {
        let n = argon.params().block_count();
        if blocks.len() < n {
            blocks.resize(n, Block::default());
        }
        Output::init_with(len, |out| {
            argon
                .hash_password_into_with_memory(password, salt, out, &mut blocks[..n])
                .map_err(|_| argon2::password_hash::Error::Crypto)
        })
        .map_err(|e| e.to_string())
    })
}

/// An argon2id hash (PHC string) of `password`. CPU-heavy: call on a blocking thread.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    let argon = Argon2::default();
    let output = argon2_output(
        &argon,
        password.as_bytes(),
        &salt_bytes,
        Params::DEFAULT_OUTPUT_LEN,
    )?;
    let phc = PasswordHash {
        algorithm: HashAlgorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon.params()).map_err(|e| e.to_string())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC `hash` (constant-time comparison). CPU-heavy: call
/// on a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    let Ok(phc) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return false;
    };
    let Ok(algorithm) = HashAlgorithm::try_from(phc.algorithm) else {
        return false;
    };
    let version = match phc.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&phc) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let argon = Argon2::new(algorithm, version, params);
    argon2_output(&argon, password.as_bytes(), salt_bytes, expected.len())
        .is_ok_and(|out| out == expected)
}

/// The skeleton of a user name: how it looks, for telling apart names that differ only
/// in case or in look-alike characters. Two names with the same skeleton are the same
/// name for uniqueness (accounts) and for keeping guests and accounts apart; each name is
/// still stored and shown as it was first written, and logging in takes that exact form.
///
/// Valid names are ASCII (`^[A-Za-z0-9_.-]{1,32}$`), on which Unicode NFKC changes
/// nothing, so the skeleton is: lower-case (full Unicode case folding for anything else),
/// then `1`, `i` and `|` become `l`, `0` becomes `o`, `rn` becomes `m` and `vv` becomes `w`
/// (the ASCII confusables of Unicode TR39).
pub fn name_skeleton(name: &str) -> String {
    let lower = name.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    let mut chars = lower.chars().peekable();
    while let Some(c) = chars.next() {
        let mapped = match c {
            '1' | 'i' | '|' => 'l',
            '0' => 'o',
            'r' if chars.peek() == Some(&'n') => {
                chars.next();
                'm'
            }
            'v' if chars.peek() == Some(&'v') => {
                chars.next();
                'w'
            }
            c => c,
        };
        out.push(mapped);
    }
    out
}

/// Bounds the memory and CPU that password hashing (argon2id, 19 MiB and two passes per
/// hash with the default parameters) may take: hashes run on `permits` threads of their
/// own (so the allocator keeps at most that many hash buffers around), at most `permits`
/// at once, at most `max_waiting` requests wait for one, and the rest are refused at once.
#[derive(Debug)]
pub struct PasswordWork {
    permits: Arc<Semaphore>,
    size: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    jobs: flume::Sender<Job>,
    active_gauge: IntGauge,
    waiting_gauge: IntGauge,
}

type Job = Box<dyn FnOnce() + Send>;

/// Memory one argon2id hash with the default parameters takes (m = 19456 KiB).
pub const HASH_MEMORY_BYTES: usize = 19 * 1024 * 1024;

/// A place to compute one password hash.
#[derive(Debug)]
pub struct HashPermit {
    permit: OwnedSemaphorePermit,
    jobs: flume::Sender<Job>,
    active: IntGauge,
}

/// Every place to hash is taken and the wait queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server is busy checking passwords; try again in a moment")]
pub struct HashBusy;

impl PasswordWork {
    /// `permits` of 0 means half the cores, at least 1 (so hashing never takes every core
    /// from the chat). Starts the hashing threads; they stop when this is dropped.
    pub fn new(permits: usize, max_waiting: usize, metrics: &crate::metrics::Metrics) -> Self {
        let size = if permits == 0 {
            (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1)
        } else {
            permits
        };
        let (jobs, rx) = flume::unbounded::<Job>();
        for i in 0..size {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("hubbub-hash-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        PasswordWork {
            permits: Arc::new(Semaphore::new(size)),
            size,
            waiting: AtomicUsize::new(0),
            max_waiting,
            jobs,
            active_gauge: metrics.password_hashes_active.clone(),
            waiting_gauge: metrics.password_hashes_waiting.clone(),
        }
    }

    /// How many hashes may run at once.
    pub fn permits(&self) -> usize {
        self.size
    }

    /// Waits for a place to hash, or refuses at once when too many already wait.
    pub async fn acquire(&self) -> Result<HashPermit, HashBusy> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(HashBusy);
                }
                self.waiting_gauge.inc();
                // Counts the wait out even when the request goes away while waiting.
                let _waiting = scopeguard(|| {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.waiting_gauge.dec();
                });
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| HashBusy)?
            }
        };
        Ok(HashPermit {
            permit,
            jobs: self.jobs.clone(),
            active: self.active_gauge.clone(),
        })
    }
}

impl HashPermit {
    /// Runs `f` (a hash or a check) on a hashing thread, holding the place until it is
    /// done, even if the caller stops waiting.
    pub async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let HashPermit {
            permit,
            jobs,
            active,
        } = self;
        let job: Job = Box::new(move || {
            active.inc();
            let out = f();
            active.dec();
            drop(permit);
            let _ = tx.send(out);
        });
        jobs.send(job)
            .map_err(|_| "the hashing threads stopped".to_string())?;
        rx.await.map_err(|_| "a hashing thread failed".to_string())
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Requests per key (a source address, a user): a token bucket per key.
#[derive(Debug)]
pub struct KeyedRate<K: std::hash::Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    calls: AtomicUsize,
}

/// Register and login requests per source address, checked before any password work.
pub type AddressRate = KeyedRate<IpAddr>;

impl<K: std::hash::Hash + Eq + Clone> KeyedRate<K> {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        KeyedRate {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            calls: AtomicUsize::new(0),
        }
    }

    /// `Err(wait)` when `key` has used up its requests for now.
    pub fn check(&self, key: K) -> Result<(), Duration> {
        // Now and then, forget addresses whose bucket is full again.
        if self.calls.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Slows down repeated failed logins per account and per source address with growing
/// delays. Each attempt is counted before its password is checked, one check per account
/// runs at a time, and an account's delay stays short (the owner, from another address,
/// is never kept out for long) while an address's delay grows far longer.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    keys: Mutex<HashMap<String, Backoff>>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    /// Attempts that did not succeed, the current one included.
    failures: u32,
    /// No attempt before this.
    not_before: Instant,
    /// A check of this account is running.
    busy: bool,
}

/// One login attempt let through: say how it ended with [`LoginAttempt::succeeded`],
/// [`LoginAttempt::failed`] or [`LoginAttempt::not_checked`]. Dropped without a verdict,
/// it stays counted as a failure.
#[derive(Debug)]
pub struct LoginAttempt<'a> {
    throttle: &'a LoginThrottle,
    account: String,
    address: String,
}

impl LoginThrottle {
    /// Attempts in a row with no wait between them; after that many failures the next
    /// attempt waits [`Self::FIRST_DELAY`], doubling with each further failure.
    pub const FREE_ATTEMPTS: u32 = 5;
    pub const FIRST_DELAY: Duration = Duration::from_secs(1);
    /// Longest delay for one account (whatever the address).
    pub const MAX_ACCOUNT_DELAY: Duration = Duration::from_secs(30);
    /// Longest delay for one address.
    pub const MAX_ADDRESS_DELAY: Duration = Duration::from_secs(15 * 60);
    /// A key quiet this long after its delay ended starts again from zero.
    pub const FORGET_AFTER: Duration = Duration::from_secs(3600);
    const MAX_KEYS: usize = 100_000;

    fn delay(failures: u32, max: Duration) -> Duration {
        if failures < Self::FREE_ATTEMPTS {
            return Duration::ZERO;
        }
        let doublings = (failures - Self::FREE_ATTEMPTS).min(20);
        Self::FIRST_DELAY.saturating_mul(1 << doublings).min(max)
    }

    /// Lets an attempt for `account` from `address` through, counting it as a failure
    /// until it says otherwise, or says how long to wait.
    pub fn begin(&self, account: &str, address: IpAddr) -> Result<LoginAttempt<'_>, Duration> {
        let account_key = format!("user:{account}");
        let address_key = format!("ip:{address}");
        let now = Instant::now();
        let mut map = self.keys.lock();
        if map.len() >= Self::MAX_KEYS {
            map.retain(|_, b| b.busy || now < b.not_before + Self::FORGET_AFTER);
        }
        let mut wait = Duration::ZERO;
        for key in [&account_key, &address_key] {
            if let Some(b) = map.get(key) {
                wait = wait.max(b.not_before.saturating_duration_since(now));
                if b.busy {
                    wait = wait.max(Self::FIRST_DELAY);
                }
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (key, max) in [
            (&account_key, Self::MAX_ACCOUNT_DELAY),
            (&address_key, Self::MAX_ADDRESS_DELAY),
        ] {
            let b = map.entry(key.clone()).or_insert(Backoff {
                failures: 0,
                not_before: now,
                busy: false,
            });
            if now >= b.not_before + Self::FORGET_AFTER {
                b.failures = 0;
            }
            b.failures = b.failures.saturating_add(1);
            b.not_before = now + Self::delay(b.failures, max);
        }
        if let Some(b) = map.get_mut(&account_key) {
            b.busy = true;
        }
        Ok(LoginAttempt {
            throttle: self,
            account: account_key,
            address: address_key,
        })
    }

    /// Whether a check of `account` is running or it must wait (for tests and metrics).
    pub fn retry_after(&self, account: &str) -> Option<Duration> {
        let map = self.keys.lock();
        let b = map.get(&format!("user:{account}"))?;
        let wait = b.not_before.saturating_duration_since(Instant::now());
        (!wait.is_zero() || b.busy).then_some(wait)
    }
}

impl LoginAttempt<'_> {
    /// The password was wrong: the delays (counted already) run from now.
    pub fn failed(self) {
        let now = Instant::now();
        let mut map = self.throttle.keys.lock();
        for (key, max) in [
            (&self.account, LoginThrottle::MAX_ACCOUNT_DELAY),
            (&self.address, LoginThrottle::MAX_ADDRESS_DELAY),
        ] {
            if let Some(b) = map.get_mut(key) {
                b.not_before = now + LoginThrottle::delay(b.failures, max);
            }
        }
    }

    /// The password was right: the account starts afresh; the address's count drops this
    /// attempt (and keeps its earlier failures).
    pub fn succeeded(self) {
        let mut map = self.throttle.keys.lock();
        map.remove(&self.account);
        Self::uncount(&mut map, &self.address, LoginThrottle::MAX_ADDRESS_DELAY);
    }

    /// The password was not checked (the server was busy): the attempt does not count.
    pub fn not_checked(self) {
        let mut map = self.throttle.keys.lock();
        Self::uncount(&mut map, &self.account, LoginThrottle::MAX_ACCOUNT_DELAY);
        Self::uncount(&mut map, &self.address, LoginThrottle::MAX_ADDRESS_DELAY);
    }

    fn uncount(map: &mut HashMap<String, Backoff>, key: &str, max: Duration) {
        if let Some(b) = map.get_mut(key) {
            b.failures = b.failures.saturating_sub(1);
            b.not_before = Instant::now() + LoginThrottle::delay(b.failures, max);
        }
    }
}

impl Drop for LoginAttempt<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.throttle.keys.lock().get_mut(&self.account) {
            b.busy = false;
        }
    }
}

/// Why a request has no valid credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send Authorization: Bearer <token>, ?token=, or ?user= in guest mode")]
    Missing,
    #[error("guest mode is off on this server: log in for a token")]
    GuestDisabled,
    #[error("invalid guest name: it must match ^[A-Za-z0-9_.-]{{1,32}}$")]
    BadGuestName,
    #[error("invalid token: {0}")]
    BadToken(String),
    #[error("the token has expired; log in again")]
    Expired,
    #[error("a token lifetime must be at most {MAX_TOKEN_TTL_SECS} seconds (ten years), got {0}")]
    LifetimeTooLong(u64),
}

/// Credentials found in a request.
#[derive(Debug, Default, Clone)]
pub struct Credentials<'a> {
    pub bearer: Option<&'a str>,
    pub token: Option<&'a str>,
    pub user: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    /// Collects credentials from headers and the `token`/`user` query parameters.
    pub fn from_parts(
        headers: &'a HeaderMap,
        token: Option<&'a str>,
        user: Option<&'a str>,
    ) -> Self {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        Credentials {
            bearer,
            token,
            user,
        }
    }
}

/// Checks credentials.
#[derive(Debug, Clone)]
pub struct Authenticator {
    guest: bool,
    admins: HashSet<String>,
    tokens: Tokens,
}

impl Authenticator {
    pub fn new(guest: bool, admins: impl IntoIterator<Item = String>, tokens: Tokens) -> Self {
        Authenticator {
            guest,
            admins: admins.into_iter().collect(),
            tokens,
        }
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn guest_enabled(&self) -> bool {
        self.guest
    }

    /// The first credential that is present decides.
    pub fn authenticate(&self, creds: &Credentials<'_>) -> Result<Identity, AuthError> {
        if let Some(token) = creds.bearer.or(creds.token) {
            return self.verify_token(token);
        }
        if let Some(user) = creds.user {
            if !self.guest {
                return Err(AuthError::GuestDisabled);
            }
            if !is_valid_user_name(user) {
                return Err(AuthError::BadGuestName);
            }
            return Ok(Identity {
                user: user.to_string(),
                guest: true,
                admin: false,
                expires_at: None,
            });
        }
        Err(AuthError::Missing)
    }

    fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.tokens.verify(token)?;
        Ok(Identity {
            admin: self.admins.contains(&claims.sub),
            user: claims.sub,
            guest: false,
            expires_at: Some(
                i64::try_from(claims.exp).map_or(i64::MAX, |s| s.saturating_mul(1000)),
            ),
        })
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.admins.contains(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(b"test secret", Duration::from_secs(60))
    }

    #[test]
    fn tokens_roundtrip_and_forgeries_fail() {
        let a = Authenticator::new(false, ["root".to_string()], tokens());
        let (t, exp) = a.tokens().issue("root", None).unwrap();
        assert!(exp > now_ms());
        let creds = Credentials {
            bearer: Some(&t),
            ..Default::default()
        };
        let id = a.authenticate(&creds).unwrap();
        assert_eq!(id.user, "root");
        assert!(id.admin && !id.guest);
        let other = Tokens::new(b"another secret", Duration::from_secs(60));
        let (forged, _) = other.issue("root", None).unwrap();
        assert!(matches!(
            a.authenticate(&Credentials {
                token: Some(&forged),
                ..Default::default()
            }),
            Err(AuthError::BadToken(_))
        ));
        let (expired, _) = a.tokens().issue("root", Some(Duration::ZERO)).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            a.authenticate(&Credentials {
                token: Some(&expired),
                ..Default::default()
            }),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn a_token_lifetime_beyond_ten_years_is_refused_not_wrapped() {
        let a = Authenticator::new(false, ["root".to_string()], tokens());
        for ttl in [MAX_TOKEN_TTL_SECS + 1, u64::MAX / 1000, u64::MAX] {
            let err = a
                .tokens()
                .issue("root", Some(Duration::from_secs(ttl)))
                .unwrap_err();
            assert!(err.to_string().contains("at most"), "{ttl}: {err}");
        }
        let (t, exp) = a
            .tokens()
            .issue("root", Some(Duration::from_secs(MAX_TOKEN_TTL_SECS)))
            .unwrap();
        let ten_years_ms = MAX_TOKEN_TTL_SECS as i64 * 1000;
        assert!((exp - now_ms() - ten_years_ms).abs() < 2_000, "{exp}");
        let id = a
            .authenticate(&Credentials {
                token: Some(&t),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(id.expires_at, Some(exp));
    }

    /// Processes starting at once (a server and `hubbub token`) agree on one secret and
    /// never read a half-written one.
    #[test]
    fn concurrent_creators_of_the_secret_agree() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let secrets: Vec<Vec<u8>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| load_or_create_secret(dir.path()).unwrap()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(secrets[0].len(), 64);
            assert!(secrets.iter().all(|s| s == &secrets[0]), "{secrets:?}");
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        // The same PHC hash the argon2 crate computes, both ways.
        let phc = PasswordHash::new(&h).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &phc)
            .is_ok());
        let salt = SaltString::encode_b64(b"sixteen bytes!!!").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("correct horse", &theirs));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse!", &h));
        assert!(check_password_rules("short").is_err());
        assert!(check_password_rules("long enough").is_ok());
    }

    #[test]
    fn throttle_delays_grow_per_key_and_stay_short_for_an_account() {
        let t = LoginThrottle::default();
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let owner: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 1..LoginThrottle::FREE_ATTEMPTS {
            t.begin("alice", attacker).unwrap().failed();
        }
        let a = t.begin("alice", attacker).unwrap();
        // One check per account at a time.
        assert!(t.begin("alice", owner).is_err());
        a.failed();
        let wait = t.begin("alice", owner).unwrap_err();
        assert!(wait <= LoginThrottle::FIRST_DELAY, "{wait:?}");
        assert!(t.begin("bob", owner).is_ok());
        assert_eq!(
            LoginThrottle::delay(40, LoginThrottle::MAX_ACCOUNT_DELAY),
            LoginThrottle::MAX_ACCOUNT_DELAY
        );
        assert_eq!(
            LoginThrottle::delay(40, LoginThrottle::MAX_ADDRESS_DELAY),
            LoginThrottle::MAX_ADDRESS_DELAY
        );
        assert_eq!(
            LoginThrottle::delay(LoginThrottle::FREE_ATTEMPTS + 1, Duration::MAX),
            2 * LoginThrottle::FIRST_DELAY
        );
    }

    #[test]
    fn skeletons_fold_case_and_look_alikes() {
        let sk = name_skeleton;
        assert_eq!(sk("alice"), sk("ALICE"));
        assert_eq!(sk("alice"), sk("aIice"));
        assert_eq!(sk("alice"), sk("a1ice"));
        assert_eq!(sk("bob"), sk("B0B"));
        assert_eq!(sk("modern"), sk("rnodern"));
        assert_eq!(sk("wes"), sk("vves"));
        assert_ne!(sk("alice"), sk("alicia"));
        assert_ne!(sk("a_b"), sk("a-b"));
    }

    #[test]
    fn guest_rules() {
        let a = Authenticator::new(true, ["alice".to_string()], tokens());
        let creds = Credentials {
            user: Some("alice"),
            ..Default::default()
        };
        let id = a.authenticate(&creds).unwrap();
        assert!(id.guest && !id.admin, "a guest never has admin rights");
        let bad = Credentials {
            user: Some("no spaces"),
            ..Default::default()
        };
        assert_eq!(a.authenticate(&bad), Err(AuthError::BadGuestName));
        assert_eq!(
            a.authenticate(&Credentials::default()),
            Err(AuthError::Missing)
        );
        let off = Authenticator::new(false, [], tokens());
        assert_eq!(off.authenticate(&creds), Err(AuthError::GuestDisabled));
    }
}
