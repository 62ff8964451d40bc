//! `POST /api/files` (multipart upload), `GET /files/{id}/{name}` (download) and
//! `POST`/`DELETE /api/files/pass` (the download cookie of browsers).
//!
//! Bytes live in `data_dir/files/<id>` where `id` is a server-made ULID, so no part of
//! a client-supplied name ever reaches the file system; the sanitized name only appears
//! in the URL and in `Content-Disposition`.
//!
//! Uploads are limited per user (a storage quota, and a rate) and per address (a rate).
//! Files no message shares are deleted once older than `upload_gc_age_secs` by
//! [`collect_unshared`], which [`crate::run`] runs periodically.
//!
//! Browsers cannot put a header on `<img src>`, and a credential in a URL leaks with
//! every copied link, so they get a *file pass* instead: a short-lived signed cookie
//! scoped to `/files/` (`HttpOnly`, `SameSite=Strict`) that only lets its holder read
//! the files their user may read. It is signed with a key of its own (derived from the
//! token secret), so it is never accepted as an account token.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Multipart, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hubbub_protocol::ErrorCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use tokio::io::AsyncWriteExt;

use super::{ApiError, Caller};
use crate::client_addr::ClientAddr;
use crate::gateway::WsParams;
use crate::store::{now_ms, FileMeta};
use crate::AppState;

/// Longest stored file name, in bytes.
const MAX_NAME: usize = hubbub_protocol::MAX_FILE_NAME;

/// Name of the file pass cookie.
pub const PASS_COOKIE: &str = "hubbub_files";
/// Records the collector deletes per store call.
const GC_BATCH: u32 = 500;

/// Signs and checks file passes.
#[derive(Clone)]
pub struct FilePasses {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for FilePasses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilePasses")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PassClaims {
    sub: String,
    /// Expiry, Unix seconds.
    exp: u64,
    /// Always `"files"`.
    scope: String,
    /// Issued to a guest (refused once guest mode is off).
    guest: bool,
}

impl FilePasses {
    /// Passes signed with a key derived from the token secret (never the secret itself),
    /// valid for `ttl`.
    pub fn new(secret: &[u8], ttl: Duration) -> FilePasses {
        let key = [secret, b"\0hubbub file pass v1"].concat();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        FilePasses {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            validation,
            ttl,
        }
    }

    /// The passes of a configuration (the same secret as its tokens).
    pub fn from_config(config: &crate::Config) -> std::io::Result<FilePasses> {
        let secret = match &config.jwt_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => crate::auth::load_or_create_secret(&config.data_dir)?,
        };
        Ok(FilePasses::new(
            &secret,
            Duration::from_secs(config.file_pass_ttl_secs),
        ))
    }

    /// A pass for `user`, expiring after the configured lifetime or at `not_after`
    /// (Unix ms), whichever comes first. Returns it and its expiry in Unix ms.
    pub fn issue(
        &self,
        user: &str,
        guest: bool,
        not_after: Option<i64>,
    ) -> Result<(String, i64), ApiError> {
        let now = (now_ms() / 1000) as u64;
        let mut exp = now + self.ttl.as_secs().max(1);
        if let Some(limit) = not_after {
            exp = exp.min((limit / 1000).max(0) as u64);
        }
        let claims = PassClaims {
            sub: user.to_string(),
            exp,
            scope: "files".into(),
            guest,
        };
        let pass = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(internal)?;
        Ok((pass, exp as i64 * 1000))
    }

    /// The user a valid pass was issued to, and whether as a guest.
    fn verify(&self, pass: &str) -> Option<(String, bool)> {
        let data =
            jsonwebtoken::decode::<PassClaims>(pass, &self.decoding, &self.validation).ok()?;
        let c = data.claims;
        (c.scope == "files" && hubbub_protocol::is_valid_user_name(&c.sub))
            .then_some((c.sub, c.guest))
    }
}

/// Upload rates per user and per address.
pub struct UploadLimits {
    per_user: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
}

impl std::fmt::Debug for UploadLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadLimits").finish_non_exhaustive()
    }
}

impl UploadLimits {
    /// At most `per_user` uploads a minute for each user and `per_ip` for each address
    /// (each also the burst).
    pub fn new(per_user: u32, per_ip: u32) -> UploadLimits {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        UploadLimits {
            per_user: RateLimiter::keyed(quota(per_user)),
            per_ip: RateLimiter::keyed(quota(per_ip)),
        }
    }

    /// Forgets keys whose limits have fully recovered.
    pub fn forget_idle(&self) {
        self.per_user.retain_recent();
        self.per_ip.retain_recent();
        self.per_user.shrink_to_fit();
        self.per_ip.shrink_to_fit();
    }
}

/// The directory that holds uploaded files.
pub fn files_dir(state: &AppState) -> PathBuf {
    state.config.data_dir.join("files")
}

/// Reduces a client-supplied file name to a safe one: the last path component, only
/// `[A-Za-z0-9._-]` (others become `_`), no leading dots, at most 100 bytes, never empty.
pub fn sanitize_name(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = name.trim_start_matches('.').to_string();
    name = trimmed;
    if name.len() > MAX_NAME {
        // Keep the extension when cutting.
        let ext = name
            .rfind('.')
            .filter(|&i| name.len() - i <= 16)
            .map(|i| name[i..].to_string())
            .unwrap_or_default();
        name.truncate(MAX_NAME - ext.len());
        name.push_str(&ext);
    }
    if name.is_empty() || name.chars().all(|c| c == '_') {
        "file".to_string()
    } else {
        name
    }
}

/// The type a download is served with: media types browsers render safely inline keep
/// their type; anything else (HTML, SVG, scripts...) is served as an opaque download.
fn served_type(mime: &str) -> (&str, bool) {
    let inline = matches!(
        mime,
        "image/png" | "image/jpeg" | "image/gif" | "image/webp" | "image/avif" | "image/bmp"
    ) || mime.starts_with("audio/")
        || mime.starts_with("video/")
        || mime == "text/plain"
        || mime == "application/pdf";
    if inline {
        (mime, true)
    } else {
        ("application/octet-stream", false)
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "file storage failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "internal error",
    )
}

fn over_quota(quota: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::TooLarge,
        format!("your stored uploads would exceed your quota of {quota} bytes"),
    )
}

fn rate_limited(who: &str) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        format!("too many uploads from this {who}; wait a minute"),
    )
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::TooLarge,
        format!("the file is larger than {limit} bytes"),
    )
}

/// Upload an attachment (multipart field `file`); use the returned object as the
/// content of an `image`/`file`/`audio`/`video` message.
#[utoipa::path(post, path = "/api/files", request_body(content_type = "multipart/form-data", description = "field `file`"), responses(
    (status = 201, description = "stored: the content of an attachment message", body = Uploaded),
    (status = 400, description = "no `file` field or a malformed body", body = super::docs::ErrorBody),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
    (status = 413, description = "over the upload limit or the caller's storage quota", body = super::docs::ErrorBody),
    (status = 429, description = "too many uploads from this user or address", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    ClientAddr(client): ClientAddr,
    Caller(caller): Caller,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    if state.uploads.per_ip.check_key(&client).is_err() {
        return Err(rate_limited("address"));
    }
    if state.uploads.per_user.check_key(&caller.user).is_err() {
        return Err(rate_limited("user"));
    }
    let quota = state.config.upload_quota_bytes;
    let used = state.store.file_usage(&caller.user).await?;
    if used >= quota {
        return Err(over_quota(quota));
    }
    let mut multipart = multipart.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = state.config.max_upload_bytes;
    loop {
        let field = multipart.next_field().await.map_err(multipart_error)?;
        let Some(mut field) = field else {
            return Err(ApiError::bad_request("the form has no `file` field"));
        };
        if field.name() != Some("file") {
            continue;
        }
        let name = sanitize_name(field.file_name().unwrap_or("file"));
        let declared = field.content_type().map(str::to_ascii_lowercase);
        let mime = match declared {
            Some(m)
                if m.parse::<mime_guess::mime::Mime>().is_ok()
                    && m != "application/octet-stream" =>
            {
                m
            }
            _ => mime_guess::from_path(&name)
                .first_or_octet_stream()
                .essence_str()
                .to_string(),
        };
        let id = ulid::Ulid::new().to_string();
        let dir = files_dir(&state);
        tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
        let path = dir.join(&id);
        let tmp = dir.join(format!("{id}.part"));
        // Removes the partial file however this ends: an error, or the request dropped
        // mid-body (the client went away or its body timed out).
        let mut partial = PartialFile(Some(tmp.clone()));
        let mut out = tokio::fs::File::create(&tmp).await.map_err(internal)?;
        let mut size: usize = 0;
        let written: Result<(), ApiError> = async {
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                size += chunk.len();
                if size > limit {
                    return Err(too_large(limit));
                }
                if used.saturating_add(size as u64) > quota {
                    return Err(over_quota(quota));
                }
                out.write_all(&chunk).await.map_err(internal)?;
            }
            out.sync_all().await.map_err(internal)?;
            Ok(())
        }
        .await;
        drop(out);
        written?;
        tokio::fs::rename(&tmp, &path).await.map_err(internal)?;
        partial.0 = None;
        let meta = FileMeta {
            id: id.clone(),
            name: name.clone(),
            mime: mime.clone(),
            size: size as u64,
            uploader: caller.user.clone(),
            created_at: now_ms(),
        };
        match state.store.put_file(meta, quota).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(over_quota(quota));
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e.into());
            }
        }
        tracing::info!(user = %caller.user, file = %id, size, "file uploaded");
        let url = format!("/files/{id}/{name}");
        return Ok((
            StatusCode::CREATED,
            Json(Uploaded {
                url,
                name,
                size,
                mime,
            }),
        )
            .into_response());
    }
}

/// A file that is removed when this is dropped, unless taken out of it.
struct PartialFile(Option<PathBuf>);

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Synchronous: the drop may happen outside any runtime task; one unlink.
            let _ = std::fs::remove_file(path);
        }
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            e.body_text(),
        )
    } else {
        ApiError::bad_request(e.body_text())
    }
}

/// Who reads a file: the credential of the request ([`Caller`]: header, `?token=`, guest
/// `?user=`) when there is one, else the file pass cookie.
#[derive(Debug, Clone)]
pub struct Reader(pub String);

impl FromRequestParts<Arc<AppState>> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let params = Query::<WsParams>::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default();
        let explicit = parts.headers.contains_key(header::AUTHORIZATION)
            || params.token.is_some()
            || params.user.is_some();
        if !explicit {
            if let Some(pass) = cookie(&parts.headers, PASS_COOKIE) {
                return match state.file_passes.verify(pass) {
                    Some((user, guest)) if !guest || state.auth.guest_enabled() => Ok(Reader(user)),
                    _ => {
                        state.metrics.auth_failures.inc();
                        Err(ApiError::unauthorized(
                            "the file pass is invalid or has expired: get a new one with POST /api/files/pass",
                        ))
                    }
                };
            }
        }
        let Caller(caller) = Caller::from_request_parts(parts, state).await?;
        Ok(Reader(caller.user))
    }
}

/// The value of the cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Whether the request reached the server over HTTPS (as a proxy in front reports it).
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The answer to an upload: the content of an attachment message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Uploaded {
    /// `/files/<id>/<name>`.
    pub url: String,
    pub name: String,
    /// Bytes.
    pub size: usize,
    pub mime: String,
}

/// The answer to `POST /api/files/pass`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PassIssued {
    /// When the pass expires (Unix ms).
    pub expires_at: i64,
}

/// Get a file pass: a cookie (`Path=/files/`, `HttpOnly`, `SameSite=Strict`) that lets
/// this browser download the files the caller may read, for `file_pass_ttl_secs` (never
/// past the caller's token). Browsers use it instead of putting a credential in file URLs.
#[utoipa::path(post, path = "/api/files/pass", responses(
    (status = 200, description = "the pass is in `Set-Cookie`", body = PassIssued),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn pass(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (pass, expires_at) =
        state
            .file_passes
            .issue(&caller.user, caller.guest, caller.expires_at)?;
    let max_age = ((expires_at - now_ms()) / 1000).max(0);
    let secure = if over_https(&headers) { "; Secure" } else { "" };
    let cookie = format!(
        "{PASS_COOKIE}={pass}; Path=/files/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    );
    let mut resp = Json(PassIssued { expires_at }).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(internal)?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Drop this browser's file pass (on sign-out). Needs no credential.
#[utoipa::path(delete, path = "/api/files/pass", responses(
    (status = 204, description = "the cookie is cleared"),
))]
pub async fn drop_pass() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{PASS_COOKIE}=; Path=/files/; Max-Age=0; HttpOnly; SameSite=Strict"),
        )],
    )
        .into_response()
}

/// Deletes the files no message shares that are older than `upload_gc_age_secs`: their
/// records, then their bytes. Returns how many went.
pub async fn collect_unshared(state: &AppState) -> Result<usize, crate::store::StoreError> {
    let before = created_before(now_ms(), state.config.upload_gc_age_secs);
    let dir = files_dir(state);
    let mut total = 0;
    // Bounded: each round deletes up to GC_BATCH; the rest waits for the next pass.
    for _ in 0..100 {
        let gone = state.store.delete_unshared_files(before, GC_BATCH).await?;
        for f in &gone {
            match tokio::fs::remove_file(dir.join(&f.id)).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.id, error = %e, "cannot delete an unshared file")
                }
            }
        }
        total += gone.len();
        if gone.len() < GC_BATCH as usize {
            break;
        }
    }
    if total > 0 {
        tracing::info!(files = total, "deleted unshared uploads");
    }
    Ok(total)
}

/// The creation time (Unix ms) before which an unshared upload is `age_secs` old at
/// `now`: in the past however large the age (a large one keeps everything).
fn created_before(now: i64, age_secs: u64) -> i64 {
    let age_ms = i64::try_from(age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    now.saturating_sub(age_ms)
}

/// Runs [`collect_unshared`] every `file_gc_interval_ms` until shutdown begins (off when
/// `upload_gc_age_secs` is 0); also forgets idle upload rate keys.
pub async fn run_collector(state: Arc<AppState>) {
    let every = Duration::from_millis(state.config.file_gc_interval_ms.max(10));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        state.uploads.forget_idle();
        if state.config.upload_gc_age_secs == 0 {
            continue;
        }
        // A pass runs to its end (records and bytes go together); shutdown waits for it.
        if let Err(e) = collect_unshared(&state).await {
            tracing::warn!(error = %e, "collecting unshared uploads failed");
        }
    }
}

/// Download an attachment: its uploader, or a member of a conversation a message shared
/// it to. Credentials: as every route, or the file pass cookie.
#[utoipa::path(get, path = "/files/{id}/{name}", params(
    ("id" = String, Path, description = "file id from the upload"),
    ("name" = String, Path, description = "file name from the upload"),
), responses(
    (status = 200, description = "the bytes"),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
    (status = 404, description = "no such file, or not sent to any conversation of the caller", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn download(
    State(state): State<Arc<AppState>>,
    Reader(reader): Reader,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such file");
    if !hubbub_protocol::is_file_id(&id) {
        return Err(not_found());
    }
    let meta = state.store.file(&id).await?.ok_or_else(not_found)?;
    // Others' files are invisible (404, not 403: their existence is not revealed).
    if meta.name != name || !state.store.may_read_file(&id, &reader).await? {
        return Err(not_found());
    }
    let file = tokio::fs::File::open(files_dir(&state).join(&meta.id))
        .await
        .map_err(|_| not_found())?;
    let (mime, inline) = served_type(&meta.mime);
    let disposition = format!(
        "{}; filename=\"{}\"",
        if inline { "inline" } else { "attachment" },
        meta.name
    );
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(mime).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_too_large_for_the_clock_keeps_every_upload() {
        let now = 1_700_000_000_000;
        assert_eq!(created_before(now, 1), now - 1000);
        for age in [u64::MAX / 1000, u64::MAX / 1000 + 1, u64::MAX] {
            assert!(created_before(now, age) < 0, "{age}");
        }
    }

    #[test]
    fn names_are_reduced_to_a_safe_last_component() {
        assert_eq!(sanitize_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(sanitize_name(".."), "file");
        assert_eq!(sanitize_name(".hidden"), "hidden");
        assert_eq!(sanitize_name("my photo (1).png"), "my_photo__1_.png");
        assert_eq!(sanitize_name("ünïcode.txt"), "_n_code.txt");
        assert_eq!(sanitize_name(""), "file");
        let long = format!("{}.jpeg", "a".repeat(300));
        let s = sanitize_name(&long);
        assert_eq!(s.len(), MAX_NAME);
        assert!(s.ends_with(".jpeg"));
    }

    #[test]
    fn active_content_is_served_as_a_download() {
        assert_eq!(
            served_type("text/html"),
            ("application/octet-stream", false)
        );
        assert_eq!(
            served_type("image/svg+xml"),
            ("application/octet-stream", false)
        );
        assert_eq!(served_type("image/png"), ("image/png", true));
    }
}
