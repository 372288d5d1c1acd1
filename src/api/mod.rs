//! The admin API and page on `[api] listen`, inside the tunnel only (the
//! packet policy lets a peer reach it only with a grant for the service at
//! that address; the firewall keeps the underlay off the tunnel subnet).
//!
//! Every request passes, in order: the per-source rate limit (429), the
//! admin-peer source filter (403) and, except for the page and `/healthz`, the
//! bearer token (401). Admin actions run the CLI's code path (store
//! transaction, audit record) with `actor = api:<peer>`, then reach the
//! control loop as a reload, exactly like a CLI command's notification.
//!
//! Served by hyper's HTTP/1 connection loop over plain TCP or rustls, so
//! both share one path; axum does the routing and extraction.

mod auth;
mod handlers;
mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::config::Config;
use crate::control::server::Pending;
use crate::dataplane::Engine;
use crate::keys::PublicKey;

pub(crate) use auth::{Caller, RateLimits, Token};

/// Largest request body: a peer request is a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the handlers share.
pub(crate) struct Api {
    pub cfg: Arc<Config>,
    pub engine: Arc<Engine>,
    pub to_loop: mpsc::Sender<Pending>,
    pub token: Token,
    pub server_public: PublicKey,
    /// Read once at start, before the daemon drops privileges.
    pub seal: Option<Arc<crate::seal::SealKey>>,
    pub limits: Mutex<RateLimits>,
    pub tls: bool,
}

/// An error answer: `{"error": "..."}` with its status. Messages never carry
/// the token or a key (they name fields and values the client sent, or say
/// what failed).
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// The connection's remote address, put in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Remote(pub SocketAddr);

/// The listener, bound at start so that a wrong address stops `run`.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    api: Arc<Api>,
}

impl Listener {
    /// Binds `[api] listen` and reads the token (and TLS files).
    ///
    /// # Errors
    /// Naming the key at fault: the token file unreadable, too open or too
    /// short; the TLS files unusable; the address not bindable.
    pub async fn bind(
        cfg: Arc<Config>,
        engine: Arc<Engine>,
        to_loop: mpsc::Sender<Pending>,
        server_public: PublicKey,
        seal: Option<Arc<crate::seal::SealKey>>,
    ) -> anyhow::Result<Option<Listener>> {
        let Some(api_cfg) = cfg.api.clone() else {
            return Ok(None);
        };
        let token = read_token(&api_cfg.token_file)?;
        let tls = match &api_cfg.tls {
            Some((cert, key)) => Some(tls::acceptor(cert, key)?),
            None => None,
        };
        let tcp = TcpListener::bind(api_cfg.listen)
            .await
            .with_context(|| format!("cannot listen on api.listen {}", api_cfg.listen))?;
        let api = Arc::new(Api {
            cfg,
            engine,
            to_loop,
            token,
            server_public,
            seal,
            limits: Mutex::new(RateLimits::default()),
            tls: tls.is_some(),
        });
        Ok(Some(Listener { tcp, tls, api }))
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) {
        let app = router(Arc::clone(&self.api));
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (stream, remote) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(event = "api_error", error = %e);
                    continue;
                }
            };
            let app = app.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let result = match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => serve_connection(s, remote, app).await,
                            _ => return,
                        }
                    }
                    None => serve_connection(stream, remote, app).await,
                };
                if let Err(e) = result {
                    tracing::debug!(event = "api_error", error = %e);
                }
            });
        }
    }
}

async fn serve_connection<S>(stream: S, remote: SocketAddr, app: Router) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(Remote(remote));
        let app = app.clone();
        async move { app.oneshot(req.map(axum::body::Body::new)).await }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
}

fn read_token(path: &std::path::Path) -> anyhow::Result<Token> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("api.token_file {}: cannot read", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "api.token_file {} is mode {:04o}: readable by group or others; run chmod 600",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("api.token_file {}: cannot read", path.display()))?,
    );
    Token::from_text(&text)
        .map_err(|why| anyhow::anyhow!("api.token_file {} {why}", path.display()))
}

fn router(api: Arc<Api>) -> Router {
    let api: Arc<Api> = api;
    let open = Router::new()
        .route("/", get(handlers::page))
        .route("/assets/app.js", get(handlers::script))
        .route("/assets/app.css", get(handlers::style))
        .route("/healthz", get(handlers::healthz));
    let guarded = Router::new()
        .route("/v1/status", get(handlers::status))
        .route("/v1/peers", get(handlers::peers).post(handlers::issue))
        .route(
            "/v1/peers/:name",
            get(handlers::peer).delete(handlers::revoke),
        )
        .route("/v1/peers/:name/rotate", post(handlers::rotate))
        .route("/metrics", get(handlers::metrics))
        .layer(middleware::from_fn_with_state(Arc::clone(&api), bearer));
    open.merge(guarded)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(Arc::clone(&api), admit))
        .layer(middleware::from_fn_with_state(Arc::clone(&api), headers))
        .with_state(api)
}

/// The rate limit, then the source filter; the caller goes into the request.
async fn admit(State(api): State<Arc<Api>>, mut req: Request, next: Next) -> Response {
    let Some(Remote(remote)) = req.extensions().get::<Remote>().copied() else {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no remote address")
            .into_response();
    };
    let limited = api
        .limits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(remote.ip(), std::time::Instant::now());
    if let Err(wait) = limited {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests; slow down",
        );
        e.retry_after = Some(wait.as_secs().max(1));
        return e.into_response();
    }
    let (caller, any_admin) = handlers::caller(&api.engine, remote.ip());
    if !caller.allowed(any_admin) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "the admin API serves admin peers only (peer add --admin)",
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The bearer token, compared in constant time.
async fn bearer(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if !api.token.accepts(given) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <api.token_file>)",
        )
        .into_response();
    }
    next.run(req).await
}

/// Security headers on every answer, errors included.
async fn headers(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    if api.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    r
}
