//! Who is calling: the one seam every credential goes through.
//!
//! PROTOCOL.md's order: `Authorization: Bearer <jwt>` header, then `?token=`, then the
//! guest `?user=` (only in guest mode). A guest never has admin rights.

use std::collections::HashSet;

use axum::http::{header, HeaderMap};
use hubbub_protocol::is_valid_user_name;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub guest: bool,
    pub admin: bool,
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
}

impl Authenticator {
    pub fn new(guest: bool, admins: impl IntoIterator<Item = String>) -> Self {
        Authenticator {
            guest,
            admins: admins.into_iter().collect(),
        }
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
            });
        }
        Err(AuthError::Missing)
    }

    fn verify_token(&self, _token: &str) -> Result<Identity, AuthError> {
        // Accounts and signed tokens are not enabled on this server yet, so no token
        // can be valid.
        Err(AuthError::BadToken(
            "this server does not issue tokens; use guest mode".into(),
        ))
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.admins.contains(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rules() {
        let a = Authenticator::new(true, ["alice".to_string()]);
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
        let off = Authenticator::new(false, []);
        assert_eq!(off.authenticate(&creds), Err(AuthError::GuestDisabled));
    }
}
