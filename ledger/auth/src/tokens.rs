//! Bearer-token authorization (roles: docs/http-api.md), shared by every Tally HTTP service.
//!
//! Tokens are random 256-bit strings handed out once by `tally token new`; the token file stores
//! only their SHA-256 (hex), a name and a role. Because a token has 256 bits of entropy, a plain
//! hash is enough (nothing to brute-force), and because lookup is by hash, comparing never leaks
//! timing about a stored token.
//!
//! Roles and what they may do are one table, [`Role::reach`]: every route of both services
//! names the one [`Action`] it performs and asks [`Principal::may`] (the matrix, route by route,
//! is in docs/http-api.md). A refusal never depends on whether the other tenant exists, so it
//! reveals nothing about it. A token may carry an expiry (`expires_at`), checked on every request.
//!
//! The file is re-read when it changes ([`FileWatch`]: size, inode, modification and change
//! times), so a token is revoked by deleting its stanza, without a restart. The store fails
//! closed: while the file is missing or does not parse, no token is accepted
//! ([`AuthError::TokenFileInvalid`]), because the old tokens may be exactly the ones an operator
//! was revoking. Each failed reload is logged and counted ([`TokenStore::reload_failures`]).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use jiff::Timestamp;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::watch::FileWatch;

/// Prefix of every token, so a leaked one is recognisable (secret scanners key on prefixes).
pub const TOKEN_PREFIX: &str = "tally_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// One tenant's application: everything about that tenant, nothing about others.
    Tenant,
    /// A gateway in front of the tenants it names: admission (authorize, release) and budget
    /// state, never their audit trails.
    Gateway,
    /// Reads the records, proofs, reports and budget state of the tenants it names; never spends.
    Regulator,
    /// Every tenant's spend, nothing per record.
    Billing,
    /// Reads `/metrics` of both services and nothing else: for a Prometheus scraper, which
    /// should never hold a token that reads data.
    Metrics,
    Admin,
}

/// What a request does. Every route checks exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A tenant's audit trail: checkpoints, tiles, records, receipts, consistency proofs, and the
    /// query service's events, SQL and audit export.
    ReadAudit,
    /// A tenant's cost roll-ups (the query service's `/costs`): sums, never a record.
    ReadCosts,
    /// A tenant's budget state (`GET …/budget`).
    ReadBudget,
    /// Reserving and releasing a tenant's budget (authorize, release): spends its money.
    SpendBudget,
    /// Freezing and unfreezing a tenant, or a scope of it (the kill switch).
    Freeze,
    /// Erasing personal data of a tenant's records (one subject's, or all): irreversible.
    Erase,
    /// Every tenant's spend (`/v1/spend`).
    ReadAllSpend,
    /// A service's `/metrics` (which never carry a tenant id).
    ReadMetrics,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::ReadAudit,
        Action::ReadCosts,
        Action::ReadBudget,
        Action::SpendBudget,
        Action::Freeze,
        Action::Erase,
        Action::ReadAllSpend,
        Action::ReadMetrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::ReadAudit => "read_audit",
            Action::ReadCosts => "read_costs",
            Action::ReadBudget => "read_budget",
            Action::SpendBudget => "spend_budget",
            Action::Freeze => "freeze",
            Action::Erase => "erase",
            Action::ReadAllSpend => "read_all_spend",
            Action::ReadMetrics => "read_metrics",
        }
    }

    /// Whether the action is about one tenant (the path names it).
    pub fn is_per_tenant(self) -> bool {
        matches!(self, Action::ReadAudit | Action::ReadCosts | Action::ReadBudget | Action::SpendBudget | Action::Freeze | Action::Erase)
    }

    /// What a refusal says the token does not grant.
    fn refusal(self) -> &'static str {
        match self {
            Action::ReadAudit => "this tenant's audit trail",
            Action::ReadCosts => "this tenant's cost reports",
            Action::ReadBudget => "this tenant's budget state",
            Action::SpendBudget => "changes to this tenant's budget",
            Action::Freeze => "freezing this tenant (its own tenant token or admin)",
            Action::Erase => "erasing this tenant's personal data (its own tenant token or admin)",
            Action::ReadAllSpend => "billing reports (role billing or admin)",
            Action::ReadMetrics => "metrics access",
        }
    }
}

/// How far a role's grant of an action reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Nothing,
    /// The tenants the token names (a `gateway` may name `*`: every tenant).
    NamedTenants,
    Everything,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Tenant, Role::Gateway, Role::Regulator, Role::Billing, Role::Metrics, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tenant => "tenant",
            Role::Gateway => "gateway",
            Role::Regulator => "regulator",
            Role::Billing => "billing",
            Role::Metrics => "metrics",
            Role::Admin => "admin",
        }
    }

    /// The role matrix: the one place that says who may do what. Anything not listed is refused.
    pub fn reach(self, action: Action) -> Reach {
        use Action::*;
        match (self, action) {
            (Role::Admin, _) => Reach::Everything,
            // A tenant may stop itself, and erase its own people's data (the controller under
            // GDPR); a gateway only obeys freezes, it never sets them; a regulator reads.
            (Role::Tenant, ReadAudit | ReadCosts | ReadBudget | SpendBudget | Freeze | Erase) => Reach::NamedTenants,
            (Role::Gateway, ReadBudget | SpendBudget) => Reach::NamedTenants,
            (Role::Regulator, ReadAudit | ReadCosts | ReadBudget) => Reach::NamedTenants,
            // Billing sees what every tenant is charged, per tenant too, but no record.
            (Role::Billing, ReadAllSpend | ReadCosts) => Reach::Everything,
            (Role::Metrics, ReadMetrics) => Reach::Everything,
            _ => Reach::Nothing,
        }
    }
}

/// A gateway token's `tenants = ["*"]`: every tenant (a platform's shared gateway).
pub const ALL_TENANTS: &str = "*";

/// One `[[token]]` stanza of the token file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it; shown in logs, never the token itself.
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token, lowercase hex.
    pub sha256: String,
    /// `tenant`: exactly one; `regulator`, `gateway`: one or more (`gateway` may say `*`);
    /// others: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// From this instant on the token is refused (`token_expired`); none: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// Who is calling, once the token is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    tenants: BTreeSet<String>,
    expires_at: Option<Timestamp>,
}

impl Principal {
    /// The caller when authorization is off (a loopback-only development setup).
    pub fn anonymous_admin() -> Self {
        Principal { name: "anonymous".into(), role: Role::Admin, tenants: BTreeSet::new(), expires_at: None }
    }

    /// Whether this caller may take `action`, on `tenant` for per-tenant actions (`None` for the
    /// others). Reads the token and the tenant string only, never the tenant's data.
    pub fn may(&self, action: Action, tenant: Option<&str>) -> bool {
        match self.role.reach(action) {
            Reach::Nothing => false,
            Reach::Everything => true,
            Reach::NamedTenants => tenant.is_some_and(|t| self.tenants.contains(t) || self.tenants.contains(ALL_TENANTS)),
        }
    }

    /// [`Principal::may`] as a refusal that says what the token does not grant.
    pub fn check(&self, action: Action, tenant: Option<&str>) -> Result<(), AuthError> {
        if self.may(action, tenant) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(action.refusal()))
        }
    }
}

/// Why a request was refused. `code()` is stable and shown to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("unknown or revoked token")]
    Unknown,
    /// The token's `expires_at` has passed; its holder needs a new one.
    #[error("this token expired at {0}; ask for a new one")]
    Expired(String),
    #[error("this token does not grant {0}")]
    Forbidden(&'static str),
    /// The server's token file is missing or invalid: nobody is authenticated until it is fixed.
    /// The message never names the file.
    #[error("the server's token file is unreadable or invalid, so no token is accepted; an operator must fix it")]
    TokenFileInvalid,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Unknown => "unauthenticated",
            AuthError::Expired(_) => "token_expired",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::TokenFileInvalid => "token_file_invalid",
        }
    }

    /// 401 for who-are-you, 403 for not-allowed, 503 while the server cannot check tokens.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Unknown | AuthError::Expired(_) => 401,
            AuthError::Forbidden(_) => 403,
            AuthError::TokenFileInvalid => 503,
        }
    }
}

/// The tokens a service accepts, or none (authorization off).
pub struct TokenStore {
    /// The token file; none when authorization is off.
    watch: Option<FileWatch>,
    /// The tokens of the last valid file; `None` while the file is missing or invalid (fail
    /// closed: nothing is accepted).
    state: RwLock<Option<Loaded>>,
    /// Reloads that found the file missing or invalid.
    reload_failures: AtomicU64,
}

struct Loaded {
    by_hash: HashMap<[u8; 32], Principal>,
}

impl TokenStore {
    /// Authorization off: every caller is an anonymous admin. Only for loopback listeners; the
    /// services refuse to start otherwise.
    pub fn disabled() -> Self {
        TokenStore { watch: None, state: RwLock::new(Some(Loaded { by_hash: HashMap::new() })), reload_failures: AtomicU64::new(0) }
    }

    /// Loads and validates the token file; errors name the offending stanza.
    pub fn load(path: &Path) -> Result<Self> {
        let watch = FileWatch::new(path);
        let loaded = read_file(path)?;
        Ok(TokenStore { watch: Some(watch), state: RwLock::new(Some(loaded)), reload_failures: AtomicU64::new(0) })
    }

    /// How many times a changed token file was found missing or invalid (a Prometheus counter).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    pub fn is_enabled(&self) -> bool {
        self.watch.is_some()
    }

    /// The caller behind an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        if self.watch.is_none() {
            return Ok(Principal::anonymous_admin());
        }
        self.reload_if_changed();
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let Some(loaded) = state.as_ref() else { return Err(AuthError::TokenFileInvalid) };
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let principal = loaded.by_hash.get(&hash).ok_or(AuthError::Unknown)?;
        match principal.expires_at {
            Some(at) if Timestamp::now() >= at => Err(AuthError::Expired(at.to_string())),
            _ => Ok(principal.clone()),
        }
    }

    fn reload_if_changed(&self) {
        let Some(watch) = self.watch.as_ref().filter(|w| w.changed()) else { return };
        let path = watch.path();
        match read_file(path) {
            Ok(loaded) => {
                tracing::info!(path = %path.display(), tokens = loaded.by_hash.len(), "token file reloaded");
                *self.state.write().unwrap_or_else(PoisonError::into_inner) = Some(loaded);
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %path.display(), error = %e, "token file missing or invalid: no token is accepted until it is fixed");
                *self.state.write().unwrap_or_else(PoisonError::into_inner) = None;
            }
        }
    }

    /// Lets the next request look at the token file at once, rather than within a second (tests
    /// use it to see a change without waiting).
    pub fn recheck_now(&self) {
        if let Some(w) = &self.watch {
            w.recheck_now();
        }
    }
}

fn read_file(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file: TokenFile = toml::from_str(&text).map_err(|e| Error::BadTokens(format!("{}: {e}", path.display())))?;
    let by_hash = principals(&file.token).map_err(|e| Error::BadTokens(format!("{}: {e}", path.display())))?;
    Ok(Loaded { by_hash })
}

/// Checks a token file's text as [`TokenStore::load`] would; returns how many tokens it holds.
pub fn check_token_file(text: &str) -> Result<usize> {
    let file: TokenFile = toml::from_str(text).map_err(|e| Error::BadTokens(e.to_string()))?;
    Ok(principals(&file.token).map_err(Error::BadTokens)?.len())
}

fn principals(entries: &[TokenEntry]) -> std::result::Result<HashMap<[u8; 32], Principal>, String> {
    let mut by_hash = HashMap::new();
    let mut names = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        let at = format!("token[{i}] ({:?})", e.name);
        if e.name.is_empty() || !names.insert(e.name.clone()) {
            return Err(format!("{at}: name must be non-empty and unique"));
        }
        let hash: [u8; 32] = hex::decode(&e.sha256).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| format!("{at}: sha256 must be 64 hex digits"))?;
        for t in &e.tenants {
            if t == ALL_TENANTS {
                if e.role != Role::Gateway || e.tenants.len() != 1 {
                    return Err(format!("{at}: only a gateway token may name {ALL_TENANTS:?} (every tenant), and then nothing else"));
                }
                continue;
            }
            tally_schemas::validate_tenant_id(t).map_err(|_| format!("{at}: {t:?} is not a valid tenant id"))?;
        }
        match (e.role, e.tenants.len()) {
            (Role::Tenant, 1) | (Role::Regulator | Role::Gateway, 1..) | (Role::Billing | Role::Metrics | Role::Admin, 0) => {}
            (Role::Tenant, _) => return Err(format!("{at}: a tenant token names exactly one tenant")),
            (role @ (Role::Regulator | Role::Gateway), _) => return Err(format!("{at}: a {} token names at least one tenant", role.as_str())),
            (role, _) => return Err(format!("{at}: a {} token names no tenants", role.as_str())),
        }
        let principal = Principal { name: e.name.clone(), role: e.role, tenants: e.tenants.iter().cloned().collect(), expires_at: e.expires_at };
        if by_hash.insert(hash, principal).is_some() {
            return Err(format!("{at}: the same token appears twice"));
        }
    }
    Ok(by_hash)
}

/// A token file's stanzas, validated as [`TokenStore::load`] would.
pub fn parse_token_file(text: &str) -> Result<Vec<TokenEntry>> {
    let file: TokenFile = toml::from_str(text).map_err(|e| Error::BadTokens(e.to_string()))?;
    principals(&file.token).map_err(Error::BadTokens)?;
    Ok(file.token)
}

/// The text of a token file holding `entries` (comments of the old text are not kept).
pub fn render_token_file(entries: Vec<TokenEntry>) -> Result<String> {
    principals(&entries).map_err(Error::BadTokens)?;
    toml::to_string(&TokenFile { token: entries }).map_err(|e| Error::BadTokens(e.to_string()))
}

/// A fresh token and its stanza for the token file. The token is shown once and never stored.
pub fn new_token(name: &str, role: Role, tenants: Vec<String>) -> Result<(String, TokenEntry)> {
    new_token_expiring(name, role, tenants, None)
}

/// [`new_token`], refused from `expires_at` on.
pub fn new_token_expiring(name: &str, role: Role, tenants: Vec<String>, expires_at: Option<Timestamp>) -> Result<(String, TokenEntry)> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let entry = TokenEntry { name: name.to_string(), role, sha256: hex::encode(Sha256::digest(token.as_bytes())), tenants, expires_at };
    principals(std::slice::from_ref(&entry)).map_err(Error::BadTokens)?;
    Ok((token, entry))
}

/// The TOML stanza for one entry, to append to a token file.
pub fn stanza(entry: &TokenEntry) -> Result<String> {
    #[derive(Serialize)]
    struct One<'a> {
        token: [&'a TokenEntry; 1],
    }
    toml::to_string(&One { token: [entry] }).map_err(|e| Error::BadTokens(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(entries: &[(String, TokenEntry)]) -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let text: String = entries.iter().map(|(_, e)| stanza(e).unwrap()).collect::<Vec<_>>().join("\n");
        std::fs::write(&path, text).unwrap();
        let store = TokenStore::load(&path).unwrap();
        (dir, store)
    }

    /// The matrix, written out by hand: a change to [`Role::reach`] must change this table too.
    #[test]
    fn roles_reach_exactly_what_the_matrix_says() {
        use Action::*;
        // (role, action) -> on its own tenant, on another tenant; tenant-less actions: (x, x).
        type Row = (Action, bool, bool);
        let (n, y) = (false, true);
        #[rustfmt::skip]
        let want: [(Role, [Row; 8]); 6] = [
            (Role::Tenant,    [(ReadAudit, y, n), (ReadCosts, y, n), (ReadBudget, y, n), (SpendBudget, y, n), (Freeze, y, n), (Erase, y, n), (ReadAllSpend, n, n), (ReadMetrics, n, n)]),
            (Role::Gateway,   [(ReadAudit, n, n), (ReadCosts, n, n), (ReadBudget, y, n), (SpendBudget, y, n), (Freeze, n, n), (Erase, n, n), (ReadAllSpend, n, n), (ReadMetrics, n, n)]),
            (Role::Regulator, [(ReadAudit, y, n), (ReadCosts, y, n), (ReadBudget, y, n), (SpendBudget, n, n), (Freeze, n, n), (Erase, n, n), (ReadAllSpend, n, n), (ReadMetrics, n, n)]),
            (Role::Billing,   [(ReadAudit, n, n), (ReadCosts, y, y), (ReadBudget, n, n), (SpendBudget, n, n), (Freeze, n, n), (Erase, n, n), (ReadAllSpend, y, y), (ReadMetrics, n, n)]),
            (Role::Metrics,   [(ReadAudit, n, n), (ReadCosts, n, n), (ReadBudget, n, n), (SpendBudget, n, n), (Freeze, n, n), (Erase, n, n), (ReadAllSpend, n, n), (ReadMetrics, y, y)]),
            (Role::Admin,     [(ReadAudit, y, y), (ReadCosts, y, y), (ReadBudget, y, y), (SpendBudget, y, y), (Freeze, y, y), (Erase, y, y), (ReadAllSpend, y, y), (ReadMetrics, y, y)]),
        ];
        // Every action is in every row: a new action cannot be left out of this table.
        for (role, row) in &want {
            assert_eq!(row.iter().map(|(a, ..)| *a).collect::<Vec<_>>(), Action::ALL.to_vec(), "{}", role.as_str());
        }
        assert_eq!(want.iter().map(|(r, _)| *r).collect::<Vec<_>>(), Role::ALL.to_vec());
        let mut tokens = Vec::new();
        for role in Role::ALL {
            let tenants = match role {
                Role::Tenant | Role::Gateway | Role::Regulator => vec!["acme".to_string()],
                _ => vec![],
            };
            tokens.push(new_token(role.as_str(), role, tenants).unwrap());
        }
        let (_dir, store) = store_with(&tokens);
        for ((role, actions), (token, _)) in want.iter().zip(&tokens) {
            let p = store.authenticate(Some(&format!("Bearer {token}"))).unwrap();
            assert_eq!(p.role, *role);
            for (action, own, other) in actions {
                let (got_own, got_other) = if action.is_per_tenant() {
                    (p.may(*action, Some("acme")), p.may(*action, Some("globex")))
                } else {
                    (p.may(*action, None), p.may(*action, None))
                };
                assert_eq!((got_own, got_other), (*own, *other), "{} {}", role.as_str(), action.as_str());
                // A per-tenant action without a tenant is never granted to a named-tenant role.
                if action.is_per_tenant() && role.reach(*action) == Reach::NamedTenants {
                    assert!(!p.may(*action, None));
                }
                assert_eq!(p.check(*action, Some("acme")).is_ok(), p.may(*action, Some("acme")));
            }
        }
        assert!(new_token("prometheus", Role::Metrics, vec!["acme".into()]).unwrap_err().to_string().contains("a metrics token names no tenants"));
        assert!(new_token("gw", Role::Gateway, vec![]).unwrap_err().to_string().contains("a gateway token names at least one tenant"));
    }

    #[test]
    fn a_gateway_may_name_every_tenant_and_nobody_else_may() {
        let gw = new_token("shared-gateway", Role::Gateway, vec![ALL_TENANTS.into()]).unwrap();
        let (_dir, store) = store_with(std::slice::from_ref(&gw));
        let p = store.authenticate(Some(&format!("Bearer {}", gw.0))).unwrap();
        assert!(p.may(Action::SpendBudget, Some("anyone")) && p.may(Action::ReadBudget, Some("globex")));
        assert!(!p.may(Action::ReadAudit, Some("anyone")), "a gateway never reads audit trails");
        for (role, tenants) in [(Role::Regulator, vec!["*"]), (Role::Tenant, vec!["*"]), (Role::Gateway, vec!["*", "acme"])] {
            let err = new_token("x", role, tenants.iter().map(|t| t.to_string()).collect()).unwrap_err().to_string();
            assert!(err.contains("only a gateway token may name \"*\""), "{err}");
        }
    }

    #[test]
    fn an_expired_token_is_refused_and_says_so() {
        let past: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let future = Timestamp::now().checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
        let old = new_token_expiring("old", Role::Tenant, vec!["acme".into()], Some(past)).unwrap();
        let live = new_token_expiring("live", Role::Tenant, vec!["acme".into()], Some(future)).unwrap();
        let (_dir, store) = store_with(&[old.clone(), live.clone()]);
        let err = store.authenticate(Some(&format!("Bearer {}", old.0))).unwrap_err();
        assert_eq!((err.code(), err.status()), ("token_expired", 401));
        assert!(err.to_string().contains("2026-01-01T00:00:00Z"), "{err}");
        assert!(store.authenticate(Some(&format!("Bearer {}", live.0))).is_ok());
        assert!(stanza(&old.1).unwrap().contains("expires_at = \"2026-01-01T00:00:00Z\""));
    }

    #[test]
    fn a_token_file_round_trips_and_a_token_can_be_left_out() {
        let a = new_token("a", Role::Tenant, vec!["acme".into()]).unwrap();
        let b = new_token_expiring("b", Role::Gateway, vec!["acme".into(), "globex".into()], Some("2030-01-01T00:00:00Z".parse().unwrap())).unwrap();
        let text = [stanza(&a.1).unwrap(), stanza(&b.1).unwrap()].join("\n");
        let mut entries = parse_token_file(&text).unwrap();
        assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        entries.retain(|e| e.name != "a");
        let rendered = render_token_file(entries).unwrap();
        let (_dir, store) = store_with(&[]);
        std::fs::write(_dir.path().join("tokens.toml"), &rendered).unwrap();
        store.recheck_now();
        assert_eq!(store.authenticate(Some(&format!("Bearer {}", a.0))), Err(AuthError::Unknown));
        assert_eq!(store.authenticate(Some(&format!("Bearer {}", b.0))).unwrap().name, "b");
        assert!(parse_token_file("[[token]]\nname = \"a\"\n").is_err());
    }

    #[test]
    fn missing_unknown_and_malformed_headers_are_refused() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let (_dir, store) = store_with(std::slice::from_ref(&acme));
        assert_eq!(store.authenticate(None), Err(AuthError::Missing));
        assert_eq!(store.authenticate(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(store.authenticate(Some(&format!("Basic {}", acme.0))), Err(AuthError::Missing));
        assert_eq!(store.authenticate(Some("Bearer tally_0000")), Err(AuthError::Unknown));
        // The stored hash is not a token.
        assert_eq!(store.authenticate(Some(&format!("Bearer {}", acme.1.sha256))), Err(AuthError::Unknown));
        assert_eq!(AuthError::Unknown.status(), 401);
        assert_eq!(AuthError::Forbidden("x").status(), 403);
    }

    #[test]
    fn the_file_holds_hashes_only() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let text = stanza(&acme.1).unwrap();
        assert!(!text.contains(&acme.0));
        assert!(text.contains(&acme.1.sha256));
        assert!(acme.0.starts_with(TOKEN_PREFIX) && acme.0.len() == TOKEN_PREFIX.len() + 64);
    }

    #[test]
    fn bad_stanzas_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let good = "0".repeat(64);
        for (text, expect) in [
            (format!("[[token]]\nname = \"a\"\nrole = \"tenant\"\nsha256 = \"{good}\"\n"), "exactly one tenant"),
            (format!("[[token]]\nname = \"a\"\nrole = \"regulator\"\nsha256 = \"{good}\"\n"), "at least one tenant"),
            (format!("[[token]]\nname = \"a\"\nrole = \"billing\"\nsha256 = \"{good}\"\ntenants = [\"x\"]\n"), "billing token names no tenants"),
            ("[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"abc\"\n".to_string(), "64 hex digits"),
            (format!("[[token]]\nname = \"a\"\nrole = \"tenant\"\nsha256 = \"{good}\"\ntenants = [\"../x\"]\n"), "not a valid tenant id"),
            (format!("[[token]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"{good}\"\n"), "unknown variant"),
            (format!("[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{good}\"\nscope = 1\n"), "unknown field"),
            (
                format!(
                    "[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{good}\"\n[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
                    "1".repeat(64)
                ),
                "unique",
            ),
        ] {
            std::fs::write(&path, &text).unwrap();
            let err = TokenStore::load(&path).err().unwrap().to_string();
            assert!(err.contains(expect), "{text}\n=> {err}");
        }
    }

    #[test]
    fn revoking_takes_effect_without_restart() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let ops = new_token("ops", Role::Admin, vec![]).unwrap();
        let (dir, store) = store_with(&[acme.clone(), ops.clone()]);
        let header = format!("Bearer {}", acme.0);
        assert!(store.authenticate(Some(&header)).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20)); // a distinct mtime
        std::fs::write(dir.path().join("tokens.toml"), stanza(&ops.1).unwrap()).unwrap();
        store.watch.as_ref().unwrap().recheck_now();
        assert_eq!(store.authenticate(Some(&header)), Err(AuthError::Unknown));
        // A broken file fails closed: the old tokens may be the very ones being revoked.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("tokens.toml"), "[[token]]\nname = 1\n").unwrap();
        store.watch.as_ref().unwrap().recheck_now();
        assert_eq!(store.authenticate(Some(&format!("Bearer {}", ops.0))), Err(AuthError::TokenFileInvalid));
        assert_eq!(store.reload_failures(), 1);
    }

    #[test]
    fn a_deleted_token_file_refuses_everyone_until_it_is_back() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let ops = new_token("ops", Role::Admin, vec![]).unwrap();
        let (dir, store) = store_with(&[acme.clone(), ops.clone()]);
        let path = dir.path().join("tokens.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let bearer = |t: &str| format!("Bearer {t}");
        assert!(store.authenticate(Some(&bearer(&ops.0))).is_ok());

        std::fs::remove_file(&path).unwrap();
        store.recheck_now();
        for header in [Some(bearer(&ops.0)), Some(bearer(&acme.0)), Some(bearer("tally_0000")), None] {
            let err = store.authenticate(header.as_deref()).unwrap_err();
            assert_eq!(err, AuthError::TokenFileInvalid, "{header:?}");
            assert_eq!((err.code(), err.status()), ("token_file_invalid", 503));
            assert!(!err.to_string().contains(dir.path().to_str().unwrap()), "never names server paths: {err}");
        }
        assert_eq!(store.reload_failures(), 1, "counted once per change, not per request");

        std::fs::write(&path, &text).unwrap();
        store.recheck_now();
        assert!(store.authenticate(Some(&bearer(&ops.0))).is_ok());
        assert!(store.authenticate(Some(&bearer(&acme.0))).is_ok());
        assert_eq!(store.reload_failures(), 1);
    }

    /// Two files of the same size, the second written within the same second (here: with the
    /// first one's modification time put back, as a coarse-mtime filesystem or `cp -p` would).
    #[test]
    fn a_same_size_rewrite_within_the_same_second_is_noticed() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let other = new_token("acme-apq", Role::Tenant, vec!["acme".into()]).unwrap();
        let (dir, store) = store_with(std::slice::from_ref(&acme));
        let path = dir.path().join("tokens.toml");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        let after = stanza(&other.1).unwrap();
        assert_eq!(before.len(), after.len());

        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, &after).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        store.recheck_now();
        assert_eq!(store.authenticate(Some(&format!("Bearer {}", acme.0))), Err(AuthError::Unknown));
        assert!(store.authenticate(Some(&format!("Bearer {}", other.0))).is_ok());

        // An atomic rename of a file with the same size and modification time.
        let tmp = dir.path().join("tokens.toml.tmp");
        std::fs::write(&tmp, &before).unwrap();
        std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(mtime).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        store.recheck_now();
        assert!(store.authenticate(Some(&format!("Bearer {}", acme.0))).is_ok());
        assert_eq!(store.authenticate(Some(&format!("Bearer {}", other.0))), Err(AuthError::Unknown));
    }

    #[test]
    fn disabled_store_admits_an_anonymous_admin() {
        let store = TokenStore::disabled();
        assert!(!store.is_enabled());
        assert_eq!(store.authenticate(None), Ok(Principal::anonymous_admin()));
    }
}
