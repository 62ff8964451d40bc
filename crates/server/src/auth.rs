//! Who is calling: the one seam every credential goes through, plus accounts (argon2id
//! password hashes) and signed tokens (JWT, HS256).
//!
//! PROTOCOL.md's order: `Authorization: Bearer <jwt>` header, then `?token=`, then the
//! guest `?user=` (only in guest mode). A guest never has admin rights.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::{header, HeaderMap};
use hubbub_protocol::is_valid_user_name;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::now_ms;

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted password, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Name of the token secret file in the data dir.
pub const SECRET_FILE: &str = "jwt.secret";

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
    pub fn issue(&self, user: &str, ttl: Option<Duration>) -> Result<(String, i64), AuthError> {
        let now = (now_ms() / 1000) as u64;
        let exp = now + ttl.unwrap_or(self.ttl).as_secs();
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
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(&path) {
        Ok(mut f) => {
            use std::io::Write;
            f.write_all(secret.as_bytes())?;
            f.sync_all()?;
            Ok(secret.into_bytes())
        }
        // Someone else created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(&path)?.trim().as_bytes().to_vec())
        }
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

/// An argon2id hash (PHC string) of `password`. CPU-heavy: call on a blocking thread.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC `hash`. CPU-heavy: call on a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Slows down repeated failed logins per account and per source address.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginThrottle {
    /// Failed attempts allowed per key within [`Self::WINDOW`].
    pub const MAX_FAILURES: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(300);
    const MAX_KEYS: usize = 100_000;

    /// Seconds to wait if `key` is locked out now.
    pub fn retry_after(&self, key: &str) -> Option<u64> {
        let map = self.failures.lock();
        let (n, since) = map.get(key)?;
        let left = Self::WINDOW.checked_sub(since.elapsed())?;
        (*n >= Self::MAX_FAILURES).then(|| left.as_secs().max(1))
    }

    pub fn failed(&self, key: &str) {
        let mut map = self.failures.lock();
        if map.len() >= Self::MAX_KEYS {
            map.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
        }
        let entry = map.entry(key.to_string()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, key: &str) {
        self.failures.lock().remove(key);
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
            expires_at: Some(claims.exp as i64 * 1000),
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
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse!", &h));
        assert!(check_password_rules("short").is_err());
        assert!(check_password_rules("long enough").is_ok());
    }

    #[test]
    fn throttle_locks_after_repeated_failures() {
        let t = LoginThrottle::default();
        for _ in 0..LoginThrottle::MAX_FAILURES {
            assert!(t.retry_after("alice").is_none());
            t.failed("alice");
        }
        assert!(t.retry_after("alice").is_some());
        assert!(t.retry_after("bob").is_none());
        t.succeeded("alice");
        assert!(t.retry_after("alice").is_none());
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
