//! The endpoints. Store work runs on tokio's blocking pool (SQLite calls
//! block); live state and reloads go through the control loop, which alone
//! owns the registry, as the CLI's notifications do.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Api, ApiError, Caller, MAX_BODY};
use crate::cli::admin::{self, IssueRequest, Issued};
use crate::control::protocol::{Request as LoopRequest, Response as LoopResponse, StatusView};
use crate::dataplane::Engine;
use crate::keys::PublicKey;
use crate::registry::{PeerName, Store, StoreError};

type Answer = Result<Response, ApiError>;

/// Time allowed for a request body (at most 64 KiB) to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

pub(super) async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

pub(super) async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

pub(super) async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

pub(super) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// The peer behind a tunnel source address, and whether any peer is an admin.
pub(super) fn caller(engine: &Engine, ip: IpAddr) -> (Caller, bool) {
    let table = engine.table.load();
    let any_admin = table.peers.iter().any(|p| p.admin.load(Ordering::Relaxed));
    let caller = match table.routes.lookup(ip).and_then(|i| table.peers.get(*i)) {
        Some(p) => Caller::Peer {
            name: p.name.to_string(),
            admin: p.admin.load(Ordering::Relaxed),
        },
        None => Caller::Other(ip),
    };
    (caller, any_admin)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(format!("store task failed: {e}")))?
}

async fn ask_loop(api: &Api, req: LoopRequest) -> Result<LoopResponse, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    api.to_loop
        .send((req, tx))
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "daemon is shutting down"))?;
    rx.await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "daemon is shutting down"))
}

async fn live(api: &Api) -> Result<StatusView, ApiError> {
    match ask_loop(api, LoopRequest::Status {}).await? {
        LoopResponse::Status(v) => Ok(v),
        other => Err(internal(format!("unexpected control answer {other:?}"))),
    }
}

/// Tells the control loop to apply a committed action now; a failure is
/// logged by the loop and the periodic store check still applies it.
async fn apply(api: &Api, action: &admin::AdminAction) {
    let req = LoopRequest::Reload {
        event: Some(action.daemon_event()),
    };
    if let Ok(LoopResponse::Error { message }) = ask_loop(api, req).await {
        tracing::warn!(event = "reload_failed", error = %message, origin = "api");
    }
}

pub(super) async fn status(State(api): State<Arc<Api>>) -> Answer {
    let view = live(&api).await?;
    let mut v = serde_json::to_value(&view).map_err(internal)?;
    if let Value::Object(m) = &mut v {
        m.insert("running".into(), Value::Bool(true));
    }
    Ok(Json(v).into_response())
}

fn open_store(api: &Api) -> Result<Store, ApiError> {
    Store::open_sealed(&api.cfg.store, api.seal.clone()).map_err(internal)
}

/// The `peer list --json` objects for the given peers (all when `name` is None).
async fn peer_objects(api: &Arc<Api>, name: Option<PeerName>) -> Result<Vec<Value>, ApiError> {
    let view = live(api).await?;
    let api = Arc::clone(api);
    blocking(move || {
        let store = open_store(&api)?;
        let peers = match &name {
            None => store.peers().map_err(internal)?,
            Some(n) => match store.peer(n).map_err(internal)? {
                Some(p) => vec![p],
                None => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("no peer named `{n}`"),
                    ))
                }
            },
        };
        crate::cli::peer_values(&store, &peers, Some(&view), crate::cli::unix_now())
            .map_err(internal)
    })
    .await
}

pub(super) async fn peers(State(api): State<Arc<Api>>) -> Answer {
    Ok(Json(Value::Array(peer_objects(&api, None).await?)).into_response())
}

fn path_name(name: &str) -> Result<PeerName, ApiError> {
    PeerName::new(name).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

pub(super) async fn peer(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Answer {
    let name = path_name(&name)?;
    let mut list = peer_objects(&api, Some(name)).await?;
    Ok(Json(list.pop().unwrap_or(Value::Null)).into_response())
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes: 413 past it (checked on
/// `Content-Length` before reading, so an oversized upload is refused at
/// once), 400 for malformed JSON, 422 for unknown fields and bad values. An
/// empty body reads as `{}`.
async fn json_body<T: DeserializeOwned>(req: Request) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    // A body trickled in slowly would hold one of the few connection slots.
    let read = tokio::time::timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(req.into_body(), MAX_BODY),
    );
    let bytes: Bytes = match read.await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            ))
        }
        Ok(r) => r.map_err(|_| too_large())?,
    };
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let status = match e.classify() {
            Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, format!("request body: {e}"))
    })
}

fn unprocessable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
}

/// Maps a refused admin action to its status: conflicts, unknown peers and
/// bad values are the client's; anything else is ours.
fn refused(e: anyhow::Error) -> ApiError {
    match e.downcast_ref::<StoreError>() {
        Some(
            StoreError::NameTaken(_)
            | StoreError::NameRetired(_)
            | StoreError::KeyTaken { .. }
            | StoreError::KeyRevoked(_)
            | StoreError::AlreadyRevoked(_)
            | StoreError::RotateRevoked(_),
        ) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        Some(StoreError::UnknownPeer(_)) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        Some(StoreError::Address(_)) => unprocessable(e),
        Some(_) => internal(e),
        None => unprocessable(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    name: String,
    public_key: Option<String>,
    address: Option<String>,
    services: Option<Vec<String>>,
    expires: Option<String>,
    psk: Option<bool>,
    admin: Option<bool>,
}

fn public_key(text: Option<&str>) -> Result<Option<PublicKey>, ApiError> {
    text.map(|k| {
        PublicKey::from_base64(k).map_err(|e| unprocessable(format!("field `public_key`: {e}")))
    })
    .transpose()
}

/// The issued or rotated peer, its client config and the config as a QR code.
fn issued_answer(api: &Api, store: &Store, issued: &Issued) -> Result<Value, ApiError> {
    let config = admin::client_config(
        &api.cfg,
        &api.server_public,
        &issued.peer,
        issued.private_key.as_ref(),
        false,
    );
    let qr = qrcode::QrCode::with_error_correction_level(config.as_bytes(), qrcode::EcLevel::L)
        .map_err(|e| internal(format!("the client config does not fit in a QR code: {e}")))?;
    let svg = qr
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(256, 256)
        .quiet_zone(true)
        .build();
    let peer = crate::cli::peer_values(
        store,
        std::slice::from_ref(&issued.peer),
        None,
        crate::cli::unix_now(),
    )
    .map_err(internal)?
    .pop()
    .unwrap_or(Value::Null);
    Ok(json!({ "peer": peer, "config": config, "qr_svg": svg }))
}

pub(super) async fn issue(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Answer {
    let body: IssueBody = json_body(req).await?;
    let name =
        PeerName::new(&body.name).map_err(|e| unprocessable(format!("field `name`: {e}")))?;
    let public_key = public_key(body.public_key.as_deref())?;
    let address = body
        .address
        .as_deref()
        .map(|a| {
            a.parse::<IpAddr>()
                .map_err(|_| unprocessable(format!("field `address`: `{a}` is not an IP address")))
        })
        .transpose()?;
    let services = crate::cli::resolve_services(&api.cfg, &body.services.unwrap_or_default())
        .map_err(|e| unprocessable(format!("field `services`: {e}")))?;
    let now = crate::cli::unix_now();
    let expires_at = body
        .expires
        .as_deref()
        .map(|s| {
            crate::cli::parse_expires(s, now)
                .map_err(|e| unprocessable(format!("field `expires`: {e}")))
        })
        .transpose()?;
    let request = IssueRequest {
        name,
        public_key,
        address,
        services,
        created_at: now,
        expires_at,
        psk: body.psk.unwrap_or(true),
        admin: body.admin.unwrap_or(false),
    };
    let answer = issue_or_rotate(&api, move |worker, store| {
        admin::issue(
            &worker.cfg,
            store,
            &worker.server_public,
            request,
            caller.actor(),
        )
    })
    .await?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Runs an issue or rotation on the blocking pool (store transaction and
/// audit record), applies it live, and returns the answer with the config.
async fn issue_or_rotate(
    api: &Arc<Api>,
    action: impl FnOnce(&Api, &mut Store) -> anyhow::Result<Issued> + Send + 'static,
) -> Result<Value, ApiError> {
    let worker = Arc::clone(api);
    let (issued, answer) = blocking(move || {
        let mut store = open_store(&worker)?;
        let issued = action(&worker, &mut store).map_err(refused)?;
        let answer = issued_answer(&worker, &store, &issued)?;
        Ok((issued, answer))
    })
    .await?;
    apply(api, &issued.action).await;
    audit_failed(issued.audit_error.as_deref());
    Ok(answer)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    public_key: Option<String>,
    psk: Option<bool>,
}

pub(super) async fn rotate(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: Request,
) -> Answer {
    let name = path_name(&name)?;
    let body: RotateBody = json_body(req).await?;
    let public_key = public_key(body.public_key.as_deref())?;
    let psk = body.psk.unwrap_or(true);
    let answer = issue_or_rotate(&api, move |worker, store| {
        admin::rotate(
            &worker.cfg,
            store,
            &worker.server_public,
            &name,
            public_key,
            psk,
            caller.actor(),
        )
    })
    .await?;
    Ok(Json(answer).into_response())
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    reason: Option<String>,
}

pub(super) async fn revoke(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: Request,
) -> Answer {
    let name = path_name(&name)?;
    let body: RevokeBody = json_body(req).await?;
    let reason = admin::check_reason(body.reason.as_deref())
        .map_err(|e| unprocessable(format!("field `reason`: {e}")))?
        .map(str::to_string);
    let worker = Arc::clone(&api);
    let (action, audit_error, peer) = blocking(move || {
        let mut store = open_store(&worker)?;
        let (peer, _freed, action, audit_error) = admin::revoke(
            &worker.cfg,
            &mut store,
            &name,
            reason.as_deref(),
            caller.actor(),
        )
        .map_err(refused)?;
        let peer = crate::cli::peer_values(
            &store,
            std::slice::from_ref(&peer),
            None,
            crate::cli::unix_now(),
        )
        .map_err(internal)?
        .pop()
        .unwrap_or(Value::Null);
        Ok((action, audit_error, peer))
    })
    .await?;
    apply(&api, &action).await;
    audit_failed(audit_error.as_deref());
    Ok(Json(json!({ "peer": peer })).into_response())
}

/// The action is committed; a lost audit record is an error event, not a
/// failed request (the client's change happened).
fn audit_failed(error: Option<&str>) {
    if let Some(e) = error {
        tracing::error!(event = "audit_error", error = %e, origin = "api");
    }
}

/// Prometheus text format: the live counters and the registry's peer states.
pub(super) async fn metrics(State(api): State<Arc<Api>>) -> Answer {
    let worker = Arc::clone(&api);
    let text = blocking(move || {
        let store = open_store(&worker)?;
        let states =
            crate::metrics::peer_states(&store, crate::cli::unix_now()).map_err(internal)?;
        Ok(crate::metrics::render(&crate::metrics::snapshot(
            &worker.engine,
            states,
        )))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
