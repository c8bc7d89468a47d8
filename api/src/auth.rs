//! Who is asking, and what they may see.
//!
//! Every request and every WebSocket or SSE connection runs as a [`Principal`]:
//! the subject of a verified token, or, in the explicit dev mode, the
//! [`Principal::dev`] user who may see everything. Resolvers find it in the
//! GraphQL context; market data is restricted to its [`Entitlements`] before any
//! filter the client asks for, so no argument can widen what a user sees.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_ingest::producers::TokenBucket;

/// One dimension of entitlements: everything, or only the listed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope<T> {
    All,
    Only(Vec<T>),
}

impl<T: PartialEq> Scope<T> {
    pub fn allows(&self, value: &T) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(v) => v.contains(value),
        }
    }
}

/// What market data a principal may receive: an event is visible when its
/// venue *and* its instrument's asset class are both allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitlements {
    pub venues: Scope<String>,
    pub asset_classes: Scope<AssetClass>,
}

impl Entitlements {
    /// Every venue and asset class.
    pub fn all() -> Self {
        Self {
            venues: Scope::All,
            asset_classes: Scope::All,
        }
    }

    /// Nothing at all: what a token without an entitlements claim gets.
    pub fn none() -> Self {
        Self {
            venues: Scope::Only(Vec::new()),
            asset_classes: Scope::Only(Vec::new()),
        }
    }

    pub fn is_all(&self) -> bool {
        self.venues == Scope::All && self.asset_classes == Scope::All
    }

    pub fn allows(&self, venue: &str, asset_class: AssetClass) -> bool {
        let venue_ok = match &self.venues {
            Scope::All => true,
            Scope::Only(v) => v.iter().any(|m| m == venue),
        };
        venue_ok && self.asset_classes.allows(&asset_class)
    }
}

/// The user a request runs as.
#[derive(Debug, Clone)]
pub struct Principal {
    subject: String,
    entitlements: Entitlements,
    admin: bool,
    expires_at: Option<SystemTime>,
    dev: bool,
}

impl Principal {
    pub fn new(
        subject: impl Into<String>,
        entitlements: Entitlements,
        admin: bool,
        expires_at: Option<SystemTime>,
    ) -> Self {
        Self {
            subject: subject.into(),
            entitlements,
            admin,
            expires_at,
            dev: false,
        }
    }

    /// The user of the dev mode (`--auth none`): entitled to everything, an
    /// administrator, never expiring.
    pub fn dev() -> Self {
        Self {
            dev: true,
            ..Self::new("dev", Entitlements::all(), true, None)
        }
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn entitlements(&self) -> &Entitlements {
        &self.entitlements
    }

    /// May list and replay dead letters.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// When the token stops being valid; `None` never.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// How long from now until the token expires (zero when it has).
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    /// The dev-mode user, who is not counted against per-user limits.
    pub fn is_dev(&self) -> bool {
        self.dev
    }
}

/// Why a request or connection is not let in. The messages are for the client:
/// they never carry the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `Authorization: Bearer <token>` (or `authorization` in `connection_init`)")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
}

impl AuthError {
    /// `extensions.code` of the GraphQL error.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => "UNAUTHENTICATED",
            AuthError::Expired => "TOKEN_EXPIRED",
        }
    }
}

/// Where the keys that sign user tokens come from. Any combination may be
/// given; a token is checked with the key its `alg` (and `kid`) names, and
/// every other algorithm is refused.
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    /// File holding the HS256 shared secret (its bytes, trailing newline cut).
    pub hs256_secret_file: Option<PathBuf>,
    /// File holding the RS256 public key (PEM).
    pub rs256_public_key_file: Option<PathBuf>,
    /// File holding a JWK Set of RS256 public keys, chosen by the token's `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when given.
    pub issuer: Option<String>,
    /// Required `aud`, when given.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

impl JwtConfig {
    pub fn is_configured(&self) -> bool {
        self.hs256_secret_file.is_some()
            || self.rs256_public_key_file.is_some()
            || self.jwks_file.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not hold a usable key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("no JWT key configured: give an HS256 secret, an RS256 public key or a JWKS file, or run in dev mode")]
    NoKey,
}

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// No authentication: every client is [`Principal::dev`]. For demos and
    /// local development only; the binary asks for it explicitly.
    Dev,
    Jwt(Arc<JwtVerifier>),
}

impl Authenticator {
    pub fn jwt(cfg: &JwtConfig) -> Result<Self, AuthConfigError> {
        Ok(Authenticator::Jwt(Arc::new(JwtVerifier::load(cfg)?)))
    }

    pub fn is_dev(&self) -> bool {
        matches!(self, Authenticator::Dev)
    }

    /// The principal of a bearer token (`None`: none given).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        match self {
            Authenticator::Dev => Ok(Principal::dev()),
            Authenticator::Jwt(v) => v.verify(token.ok_or(AuthError::Missing)?),
        }
    }

    /// The principal of an HTTP request's `Authorization: Bearer` header.
    pub fn from_headers(&self, headers: &axum::http::HeaderMap) -> Result<Principal, AuthError> {
        let token = match headers.get(axum::http::header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(bearer)
                    .ok_or_else(|| AuthError::Invalid("expected `Bearer <token>`".into()))?,
            ),
        };
        self.authenticate(token)
    }

    /// The principal of a WebSocket `connection_init` payload: its
    /// `Authorization`/`authorization` (`Bearer <token>`) or `token` member.
    pub fn from_init_payload(
        &self,
        payload: Option<&serde_json::Value>,
    ) -> Result<Principal, AuthError> {
        let obj = payload.and_then(|p| p.as_object());
        let token = match obj {
            None => None,
            Some(o) => match (
                o.get("Authorization").or_else(|| o.get("authorization")),
                o.get("token"),
            ) {
                (Some(v), _) => Some(
                    v.as_str()
                        .and_then(bearer)
                        .ok_or_else(|| AuthError::Invalid("expected `Bearer <token>`".into()))?,
                ),
                (None, Some(v)) => Some(
                    v.as_str()
                        .ok_or_else(|| AuthError::Invalid("`token` must be a string".into()))?,
                ),
                (None, None) => None,
            },
        };
        self.authenticate(token)
    }
}

fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Verifies user tokens: signature, `exp`, `nbf`, and `iss`/`aud` when
/// configured; then reads the entitlements.
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    /// RS256 keys of the JWK Set by `kid`.
    jwks: HashMap<String, DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path).map_err(|source| AuthConfigError::Read {
        path: path.clone(),
        source,
    })
}

impl std::fmt::Debug for JwtVerifier {
    // Keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("jwks_kids", &self.jwks.keys().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtVerifier {
    pub fn load(cfg: &JwtConfig) -> Result<Self, AuthConfigError> {
        if !cfg.is_configured() {
            return Err(AuthConfigError::NoKey);
        }
        let key_err = |path: &PathBuf, reason: String| AuthConfigError::Key {
            path: path.clone(),
            reason,
        };
        let hs256 = match &cfg.hs256_secret_file {
            None => None,
            Some(p) => {
                let mut secret = read(p)?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                // RFC 7518 3.2: an HS256 key must be at least as long as the hash.
                if secret.len() < 32 {
                    return Err(key_err(p, "an HS256 secret needs at least 32 bytes".into()));
                }
                Some(DecodingKey::from_secret(&secret))
            }
        };
        let rs256 = match &cfg.rs256_public_key_file {
            None => None,
            Some(p) => {
                Some(DecodingKey::from_rsa_pem(&read(p)?).map_err(|e| key_err(p, e.to_string()))?)
            }
        };
        let mut jwks = HashMap::new();
        if let Some(p) = &cfg.jwks_file {
            let set: JwkSet =
                serde_json::from_slice(&read(p)?).map_err(|e| key_err(p, e.to_string()))?;
            for (i, jwk) in set.keys.iter().enumerate() {
                let kid = jwk.common.key_id.clone().unwrap_or_default();
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| key_err(p, format!("key {i} ({kid:?}): {e}")))?;
                jwks.insert(kid, key);
            }
            if jwks.is_empty() {
                return Err(key_err(p, "the set holds no keys".into()));
            }
        }
        Ok(Self {
            hs256,
            rs256,
            jwks,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("unreadable header: {e}")))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => match &header.kid {
                Some(kid) => self.jwks.get(kid).or(self.rs256.as_ref()),
                // One key in the set and none named: that one.
                None if self.jwks.len() == 1 => self.jwks.values().next().or(self.rs256.as_ref()),
                None => self.rs256.as_ref(),
            },
            _ => None,
        }
        .ok_or_else(|| {
            AuthError::Invalid(format!(
                "no key for {:?}{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" with kid {k:?}"))
                    .unwrap_or_default()
            ))
        })?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when the token has them, so
        // a configured one must also be required, or leaving it out would pass.
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::MissingRequiredClaim(claim) => AuthError::Invalid(missing(claim)),
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("not valid yet: claim `nbf` is in the future".into())
                }
                ErrorKind::InvalidIssuer => {
                    AuthError::Invalid("claim `iss` is not the issuer this server trusts".into())
                }
                ErrorKind::InvalidAudience => {
                    AuthError::Invalid("claim `aud` does not name this server".into())
                }
                _ => AuthError::Invalid(e.to_string()),
            }
        })?;
        Ok(data.claims.into_principal(self.leeway))
    }
}

/// Why a required claim counts as missing: jsonwebtoken also says so of one it
/// cannot read (`exp` must be an integer it can hold).
fn missing(claim: &str) -> String {
    match claim {
        "exp" => "claim `exp` is missing or not whole seconds since 1970 (0 to 2^64-1)".into(),
        "iss" | "aud" => {
            format!("claim `{claim}` is missing or malformed, and this server requires it")
        }
        _ => format!("claim `{claim}` is missing or malformed"),
    }
}

/// The claims tickgraph reads. Entitlements are deny-by-default: a token
/// without `venues` (or `asset_classes`) sees no market data; `"*"` means all.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Read only to refuse a value jsonwebtoken skips: it checks `nbf` when it
    /// can hold it as an integer and ignores it otherwise, so `1e300` (never
    /// valid) would pass as if absent.
    #[serde(default, deserialize_with = "whole_seconds", rename = "nbf")]
    _nbf: Option<u64>,
    #[serde(default)]
    venues: Option<ScopeClaim<String>>,
    #[serde(default)]
    asset_classes: Option<ScopeClaim<AssetClass>>,
    #[serde(default)]
    roles: Vec<String>,
}

fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<u64>::deserialize(d).map_err(|_| {
        serde::de::Error::custom("claim `nbf` is not whole seconds since 1970 (0 to 2^64-1)")
    })
}

/// The latest expiry a principal keeps, 9999-12-31T23:59:59Z: `exp` may be up
/// to 2^64-1 seconds, which no `SystemTime` holds, and any time this far ahead
/// means the same to a connection.
const LATEST_EXPIRY_SECS: u64 = 253_402_300_799;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ScopeClaim<T> {
    Only(Vec<T>),
    Star(Star),
}

/// The string `"*"`.
#[derive(Debug)]
struct Star;

impl<'de> Deserialize<'de> for Star {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            Ok(Star)
        } else {
            Err(serde::de::Error::custom("expected a list or \"*\""))
        }
    }
}

impl<T> ScopeClaim<T> {
    fn scope(claim: Option<Self>) -> Scope<T> {
        match claim {
            None => Scope::Only(Vec::new()),
            Some(ScopeClaim::Star(Star)) => Scope::All,
            Some(ScopeClaim::Only(v)) => Scope::Only(v),
        }
    }
}

impl Claims {
    /// The principal, valid as long as `decode` accepts the token: until
    /// `exp` plus the clock-skew `leeway` (an `exp` past 9999 counts as then).
    fn into_principal(self, leeway: Duration) -> Principal {
        let admin = self.roles.iter().any(|r| r == ADMIN_ROLE);
        Principal::new(
            self.sub,
            Entitlements {
                venues: ScopeClaim::scope(self.venues),
                asset_classes: ScopeClaim::scope(self.asset_classes),
            },
            admin,
            UNIX_EPOCH.checked_add(
                Duration::from_secs(self.exp.min(LATEST_EXPIRY_SECS)).saturating_add(leeway),
            ),
        )
    }
}

/// A GraphQL error outside any field, with `extensions.code`.
pub fn coded_error(message: impl Into<String>, code: &str) -> async_graphql::ServerError {
    let mut e = async_graphql::ServerError::new(message, None);
    let mut ext = async_graphql::ErrorExtensionValues::default();
    ext.set("code", code);
    e.extensions = Some(ext);
    e
}

/// The role in a token's `roles` claim that may list and replay dead letters.
pub const ADMIN_ROLE: &str = "admin";

/// Per-user limits: connections held at once, requests per second (each
/// query, mutation and subscription started counts one), and what the user's
/// live subscriptions hold in memory, across all its connections and
/// transports. Users are the tokens' subjects; in dev mode there are none, and
/// only the per-connection subscription limit applies.
#[derive(Debug, Clone, Copy)]
pub struct UserLimits {
    pub max_connections: usize,
    /// Requests per second, with a burst of as many; 0 turns it off.
    pub requests_per_sec: f64,
    /// Live subscriptions at once.
    pub max_subscriptions: usize,
    /// Values the live subscriptions' filter lists hold together, as given
    /// (instruments, venues, asset classes, sides, `conflateBy` fields).
    pub max_filter_values: usize,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            max_connections: 100,
            requests_per_sec: 100.0,
            max_subscriptions: 1000,
            max_filter_values: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error("too many connections for {subject}: at most {max}")]
    Connections { subject: String, max: usize },
    #[error("rate limit: at most {per_sec} requests per second; retry in {retry_after_ms} ms")]
    Rate { per_sec: f64, retry_after_ms: u64 },
    /// More at once than the rate allows in a second: no wait would let it in.
    #[error(
        "a batch of {operations} operations is more than the {max} this user may send at once: \
         split it"
    )]
    Batch { operations: usize, max: u64 },
    #[error(
        "too many subscriptions for {subject}: at most {max} at once over all its connections"
    )]
    Subscriptions { subject: String, max: usize },
    #[error(
        "too many filter values for {subject}: its subscriptions may name at most {max} at \
         once (instruments, venues, asset classes, sides and conflateBy fields, over all its \
         connections); {held} are named, and this subscription names {asked}"
    )]
    FilterValues {
        subject: String,
        max: usize,
        held: usize,
        asked: usize,
    },
}

impl LimitError {
    pub fn code(&self) -> &'static str {
        match self {
            LimitError::Connections { .. } => "TOO_MANY_CONNECTIONS",
            LimitError::Rate { .. } => "RATE_LIMITED",
            LimitError::Batch { .. } => "BATCH_TOO_LARGE",
            LimitError::Subscriptions { .. } => "TOO_MANY_SUBSCRIPTIONS",
            LimitError::FilterValues { .. } => "TOO_MANY_FILTER_VALUES",
        }
    }

    /// Whether waiting `Retry-After` would let the same request in.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, LimitError::Batch { .. })
    }

    /// Seconds to put in `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            LimitError::Connections { .. }
            | LimitError::Batch { .. }
            | LimitError::Subscriptions { .. }
            | LimitError::FilterValues { .. } => 1,
            LimitError::Rate { retry_after_ms, .. } => retry_after_ms.div_ceil(1000).max(1),
        }
    }
}

/// Enforces [`UserLimits`] across the process.
#[derive(Debug, Default)]
pub struct Users {
    limits: UserLimits,
    state: Mutex<UserState>,
}

#[derive(Debug, Default)]
struct UserState {
    connections: HashMap<String, usize>,
    buckets: HashMap<String, TokenBucket>,
    subscriptions: HashMap<String, Held>,
}

/// A user's live subscriptions and the filter values they name.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    subscriptions: usize,
    values: usize,
}

/// Buckets kept before full ones (users idle for a second or more) are dropped.
const MAX_IDLE_BUCKETS: usize = 10_000;

impl Users {
    pub fn new(limits: UserLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::default(),
        })
    }

    pub fn limits(&self) -> UserLimits {
        self.limits
    }

    /// Counts `n` requests of `p` against its rate.
    pub fn request(&self, p: &Principal, n: usize) -> Result<(), LimitError> {
        let rate = self.limits.requests_per_sec;
        if p.is_dev() || rate <= 0.0 {
            return Ok(());
        }
        // A second's worth is all the bucket holds: more would be told a
        // Retry-After it could never meet.
        let burst = TokenBucket::burst(rate);
        if n as f64 > burst {
            return Err(LimitError::Batch {
                operations: n,
                max: burst as u64,
            });
        }
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.buckets.len() >= MAX_IDLE_BUCKETS {
            st.buckets.retain(|_, b| !b.is_full(rate, now));
        }
        let bucket = st
            .buckets
            .entry(p.subject().to_owned())
            .or_insert_with(|| TokenBucket::full(rate));
        bucket
            .take(n as f64, rate, now)
            .map_err(|wait| LimitError::Rate {
                per_sec: rate,
                retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            })
    }

    /// Holds one of `p`'s connections until the returned guard is dropped.
    pub fn connect(self: &Arc<Self>, p: &Principal) -> Result<ConnectionSlot, LimitError> {
        if p.is_dev() {
            return Ok(ConnectionSlot(None));
        }
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let held = st.connections.entry(p.subject().to_owned()).or_default();
        if *held >= self.limits.max_connections {
            return Err(LimitError::Connections {
                subject: p.subject().to_owned(),
                max: self.limits.max_connections,
            });
        }
        *held += 1;
        Ok(ConnectionSlot(Some((
            Arc::clone(self),
            p.subject().to_owned(),
        ))))
    }
}

impl Users {
    /// Holds one of `p`'s subscriptions, naming `values` filter values, until
    /// the returned guard is dropped.
    pub fn subscribe(
        self: &Arc<Self>,
        p: &Principal,
        values: usize,
    ) -> Result<SubscriptionSlot, LimitError> {
        if p.is_dev() {
            return Ok(SubscriptionSlot(None));
        }
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let held = st.subscriptions.entry(p.subject().to_owned()).or_default();
        let refused = if held.subscriptions >= self.limits.max_subscriptions {
            Some(LimitError::Subscriptions {
                subject: p.subject().to_owned(),
                max: self.limits.max_subscriptions,
            })
        } else if held.values.saturating_add(values) > self.limits.max_filter_values {
            Some(LimitError::FilterValues {
                subject: p.subject().to_owned(),
                max: self.limits.max_filter_values,
                held: held.values,
                asked: values,
            })
        } else {
            None
        };
        if let Some(e) = refused {
            if held.subscriptions == 0 {
                st.subscriptions.remove(p.subject());
            }
            return Err(e);
        }
        held.subscriptions += 1;
        held.values += values;
        Ok(SubscriptionSlot(Some((
            Arc::clone(self),
            p.subject().to_owned(),
            values,
        ))))
    }
}

/// One subscription counted against its user; released on drop.
#[derive(Debug)]
pub struct SubscriptionSlot(Option<(Arc<Users>, String, usize)>);

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        if let Some((users, subject, values)) = self.0.take() {
            let mut st = users.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(held) = st.subscriptions.get_mut(&subject) {
                held.subscriptions = held.subscriptions.saturating_sub(1);
                held.values = held.values.saturating_sub(values);
                if held.subscriptions == 0 {
                    st.subscriptions.remove(&subject);
                }
            }
        }
    }
}

/// One connection counted against its user; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Option<(Arc<Users>, String)>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((users, subject)) = self.0.take() {
            let mut st = users.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = st.connections.get_mut(&subject) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.connections.remove(&subject);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_needs_both_its_venue_and_its_asset_class_allowed() {
        let e = Entitlements {
            venues: Scope::Only(vec!["XNAS".into()]),
            asset_classes: Scope::Only(vec![AssetClass::Equity]),
        };
        assert!(e.allows("XNAS", AssetClass::Equity));
        assert!(!e.allows("XLON", AssetClass::Equity));
        assert!(!e.allows("XNAS", AssetClass::Etf));
        assert!(Entitlements::all().allows("XLON", AssetClass::Fx));
        assert!(!Entitlements::none().allows("XNAS", AssetClass::Equity));
    }

    fn verifier(dir: &std::path::Path) -> JwtVerifier {
        verifier_with(dir, JwtConfig::default())
    }

    fn verifier_with(dir: &std::path::Path, cfg: JwtConfig) -> JwtVerifier {
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").expect("write");
        JwtVerifier::load(&JwtConfig {
            hs256_secret_file: Some(secret),
            ..cfg
        })
        .expect("loads")
    }

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .expect("sign")
    }

    fn exp() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 60
    }

    #[test]
    fn claims_are_deny_by_default_and_star_means_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = verifier(dir.path());
        let p = v
            .verify(&sign(serde_json::json!({"sub": "a", "exp": exp(),
                "venues": ["XNAS"], "asset_classes": "*", "roles": ["admin"]})))
            .expect("valid");
        assert_eq!(p.subject(), "a");
        assert!(p.is_admin());
        assert_eq!(p.entitlements().venues, Scope::Only(vec!["XNAS".into()]));
        assert_eq!(p.entitlements().asset_classes, Scope::All);
        let p = v
            .verify(&sign(serde_json::json!({"sub": "b", "exp": exp()})))
            .expect("valid");
        assert!(!p.is_admin());
        assert_eq!(p.entitlements(), &Entitlements::none());
        // A value that is neither a list nor "*", or an unknown asset class,
        // makes the token invalid rather than silently wider or narrower.
        for bad in [
            serde_json::json!({"sub": "c", "exp": exp(), "venues": "XNAS"}),
            serde_json::json!({"sub": "c", "exp": exp(), "asset_classes": ["stocks"]}),
            serde_json::json!({"exp": exp(), "venues": "*"}),
        ] {
            assert!(matches!(v.verify(&sign(bad)), Err(AuthError::Invalid(_))));
        }
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required_not_only_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = verifier_with(
            dir.path(),
            JwtConfig {
                issuer: Some("https://idp.example".into()),
                audience: Some("tickgraph".into()),
                ..JwtConfig::default()
            },
        );
        let token = |iss: Option<&str>, aud: Option<serde_json::Value>| {
            let mut c = serde_json::json!({"sub": "a", "exp": exp()});
            if let Some(iss) = iss {
                c["iss"] = iss.into();
            }
            if let Some(aud) = aud {
                c["aud"] = aud;
            }
            sign(c)
        };
        let good = Some("https://idp.example");
        assert!(v.verify(&token(good, Some("tickgraph".into()))).is_ok());
        assert!(v
            .verify(&token(
                good,
                Some(serde_json::json!(["other", "tickgraph"]))
            ))
            .is_ok());
        for (bad, says) in [
            (token(None, Some("tickgraph".into())), "`iss` is missing"),
            (token(good, None), "`aud` is missing"),
            (token(None, None), "is missing"),
            (
                token(Some("https://evil.example"), Some("tickgraph".into())),
                "`iss`",
            ),
            (token(good, Some("other".into())), "`aud`"),
        ] {
            match v.verify(&bad) {
                Err(AuthError::Invalid(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("expected a refusal saying {says:?}, got {other:?}"),
            }
        }
        // Not configured: neither is needed.
        let open = verifier(dir.path());
        assert!(open.verify(&token(None, None)).is_ok());
    }

    /// A token whose `claim` is the JSON number `literal`, as written.
    fn with_claim(claim: &str, literal: &str) -> String {
        let mut c = serde_json::json!({"sub": "a", "exp": exp()});
        c[claim] = serde_json::from_str(literal).expect("a JSON number");
        sign(c)
    }

    #[test]
    fn numeric_claims_at_their_extremes_are_refused_or_accepted_without_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = verifier_with(
            dir.path(),
            JwtConfig {
                leeway: Duration::from_secs(30),
                ..JwtConfig::default()
            },
        );
        let later = format!("{}.5", exp());
        let extremes = [
            "0",
            "-1",
            "9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "1e300",
            later.as_str(),
        ];
        // Per claim, the literals accepted; every other one is refused.
        for (claim, accepted) in [
            ("exp", &["9223372036854775808", "18446744073709551615"][..]),
            ("nbf", &["0"][..]),
            ("iat", &extremes[..]),
        ] {
            for literal in extremes {
                let got = v.verify(&with_claim(claim, literal));
                if accepted.contains(&literal) {
                    let p = got.unwrap_or_else(|e| panic!("{claim}: {literal}: {e}"));
                    let left = p.expires_in().expect("an expiry");
                    if claim == "exp" {
                        // Far enough ahead to be never, and still a time.
                        assert!(left > Duration::from_secs(1 << 32), "{literal}");
                    }
                } else {
                    let e = got.expect_err(&format!("{claim}: {literal} is refused"));
                    assert!(
                        e.to_string().contains(claim) || e == AuthError::Expired,
                        "{claim}: {literal}: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_configured_algorithms_are_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = verifier(dir.path());
        // An unsigned token ("alg": "none") is refused whatever it claims.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            "eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo5OTk5OTk5OTk5LCJ2ZW51ZXMiOiIqIn0"
        );
        assert!(matches!(v.verify(&none), Err(AuthError::Invalid(_))));
        // No RS256 key is configured: an RS256 token has nothing to verify it.
        let rs = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4In0.c2ln";
        assert!(matches!(v.verify(rs), Err(AuthError::Invalid(m)) if m.contains("no key")));
        let short = dir.path().join("short");
        std::fs::write(&short, "too short").expect("write");
        let err = JwtVerifier::load(&JwtConfig {
            hs256_secret_file: Some(short),
            ..JwtConfig::default()
        })
        .expect_err("refused");
        assert!(err.to_string().contains("32 bytes"), "{err}");
    }
}
