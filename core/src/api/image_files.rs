//! Uploaded images: `PUT /v1/images/{id}/file` streams an image's bytes into its backup
//! storage's directory on the management node (a `file://` backup storage; shared between the
//! nodes of a cluster), with their SHA-256, and points the image's URL at
//! `GET /agent/images/{id}` on this node. Agents fetch it from there with their host's token,
//! check the checksum and keep it in their cache.
//!
//! Bodies stream through (no body limit, nothing held in memory); a part file becomes the image
//! only once it is whole.

use super::{error, json, scope};
use crate::auth::Caller;
use crate::error::{Error, ErrorCode};
use crate::model::{BackupStorage, Host, Image};
use crate::services::Cloud;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use stratus_agent_protocol::H_TOKEN;
use stratus_rt::http::{header, TakeHeaders};
use stratus_store::{Query, Update};
use uuid::Uuid;

/// Where an image's uploaded bytes live: its backup storage's directory.
async fn file_of(c: &Cloud, uuid: Uuid, image: &Image) -> Result<PathBuf, Error> {
    let bs = c.get::<BackupStorage>(image.bs_uuid).await?;
    let Some(dir) = bs.url.strip_prefix("file://") else {
        return Err(Error::new(
            ErrorCode::InvalidState,
            format!(
                "backup storage {} is {}: images are uploaded to a file:// one (a directory of the \
                 management nodes)",
                bs.name, bs.url
            ),
        ));
    };
    Ok(PathBuf::from(dir).join(format!("{uuid}.img")))
}

fn io(what: &str, e: std::io::Error) -> Error {
    let code = if e.raw_os_error() == Some(28) {
        ErrorCode::CapacityExhausted // ENOSPC
    } else {
        ErrorCode::StoreFailure
    };
    Error::new(code, format!("{what}: {e}"))
}

fn parse(id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id).map_err(|_| Error::invalid(format!("{id:?} is not a uuid")))
}

/// `PUT /v1/images/{id}/file`.
pub(super) async fn upload(
    State(c): State<Arc<Cloud>>,
    Extension(me): Extension<Caller>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    match upload_inner(&c, &me, &id, body).await {
        Ok(v) => json(200, &v),
        Err(e) => error(&e),
    }
}

async fn upload_inner(
    c: &Cloud,
    me: &Caller,
    id: &str,
    body: Body,
) -> Result<serde_json::Value, Error> {
    let uuid = parse(id)?;
    scope::check_write(c, me, "image", uuid).await?;
    let image = c.get::<Image>(uuid).await?;
    let path = file_of(c, uuid, &image).await?;
    // Each upload its own part file: two at once do not mix.
    let part = path.with_extension(format!("{}.part", c.engine.ids.uuid().simple()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot make the image directory", e))?;
    }
    let written = async {
        let mut f = std::fs::File::create(&part).map_err(|e| io("cannot store the image", e))?;
        let mut hash = Sha256::new();
        let mut total = 0u64;
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| Error::invalid(format!("the upload broke off: {e}")))?;
            hash.update(&chunk);
            total += chunk.len() as u64;
            f.write_all(&chunk)
                .map_err(|e| io("cannot store the image", e))?;
        }
        f.sync_all().map_err(|e| io("cannot store the image", e))?;
        if total == 0 {
            return Err(Error::invalid("an empty upload"));
        }
        Ok((crate::auth::hex(&hash.finalize()), total))
    }
    .await;
    let (sum, total) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::rename(&part, &path).map_err(|e| io("cannot store the image", e))?;
    c.db()
        .commit(
            stratus_store::Batch::new().update(
                Update::of::<Image>(uuid)
                    .set("url", format!("{}/agent/images/{uuid}", c.api_url))
                    .set("checksum", format!("sha256:{sum}")),
            ),
        )
        .await?;
    tracing::info!(image = %uuid, bytes = total, sha256 = %sum, "image uploaded");
    match c.db().store().get("image", uuid).await? {
        Some(r) => serde_json::to_value(r.api_json())
            .map_err(|e| Error::new(ErrorCode::Internal, e.to_string())),
        None => Err(Error::not_found("image", uuid)),
    }
}

/// `GET /agent/images/{id}`: an uploaded image, to an agent that shows its host's token.
pub(super) async fn serve_to_agent(
    State(c): State<Arc<Cloud>>,
    TakeHeaders(headers): TakeHeaders,
    Path(id): Path<String>,
) -> Response {
    match serve_inner(&c, header(&headers, H_TOKEN).unwrap_or(""), &id).await {
        Ok(r) => r,
        Err(e) => error(&e),
    }
}

async fn serve_inner(c: &Cloud, token: &str, id: &str) -> Result<Response, Error> {
    let known = !token.is_empty()
        && !c
            .db()
            .select::<Host>(&Query::of::<Host>().eq("token", token).limit(1))
            .await?
            .is_empty();
    if !known {
        return Err(Error::new(
            ErrorCode::Unauthorized,
            "images go to agents that show their host's token",
        ));
    }
    let uuid = parse(id)?;
    let image = c.get::<Image>(uuid).await?;
    let path = file_of(c, uuid, &image).await?;
    let mut f = std::fs::File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(
                ErrorCode::NotFound,
                format!("image {uuid} has no uploaded file"),
            )
        } else {
            io("cannot read the image", e)
        }
    })?;
    let len = f
        .metadata()
        .map_err(|e| io("cannot read the image", e))?
        .len();
    let chunks = futures::stream::poll_fn(move |_| {
        let mut buf = vec![0u8; 1 << 20];
        std::task::Poll::Ready(match f.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)))
            }
            Err(e) => Some(Err(e)),
        })
    });
    Ok((
        [
            ("content-type", "application/octet-stream".to_string()),
            ("content-length", len.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}
