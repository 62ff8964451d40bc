//! `POST /api/files` (multipart upload) and `GET /files/{id}/{name}` (download).
//!
//! Bytes live in `data_dir/files/<id>` where `id` is a server-made ULID, so no part of
//! a client-supplied name ever reaches the file system; the sanitized name only appears
//! in the URL and in `Content-Disposition`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hubbub_protocol::ErrorCode;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::{ApiError, Caller};
use crate::store::{now_ms, FileMeta};
use crate::AppState;

/// Longest stored file name, in bytes.
const MAX_NAME: usize = 100;

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
    ApiError::internal(e)
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
    (status = 201, description = "{\"url\",\"name\",\"size\",\"mime\"}"),
    (status = 400, description = "no `file` field or a malformed body", body = super::docs::ErrorBody),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
    (status = 413, description = "over the upload limit", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
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
        let mut out = tokio::fs::File::create(&tmp).await.map_err(internal)?;
        let mut size: usize = 0;
        let written: Result<(), ApiError> = async {
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                size += chunk.len();
                if size > limit {
                    return Err(too_large(limit));
                }
                out.write_all(&chunk).await.map_err(internal)?;
            }
            out.sync_all().await.map_err(internal)?;
            Ok(())
        }
        .await;
        drop(out);
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, &path).await.map_err(internal)?;
        let meta = FileMeta {
            id: id.clone(),
            name: name.clone(),
            mime: mime.clone(),
            size: size as u64,
            uploader: caller.user.clone(),
            created_at: now_ms(),
        };
        if let Err(e) = state.store.put_file(meta).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e.into());
        }
        tracing::info!(user = %caller.user, file = %id, size, "file uploaded");
        let url = format!("/files/{id}/{name}");
        return Ok((
            StatusCode::CREATED,
            Json(json!({"url": url, "name": name, "size": size, "mime": mime})),
        )
            .into_response());
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

/// Download an attachment: its uploader, or a member of a conversation it was sent to.
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
    Caller(caller): Caller,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such file");
    if ulid::Ulid::from_string(&id).is_err() {
        return Err(not_found());
    }
    let meta = state.store.file(&id).await?.ok_or_else(not_found)?;
    // Others' files are invisible (404, not 403: their existence is not revealed).
    if meta.name != name || !state.store.may_read_file(&id, &caller.user).await? {
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
