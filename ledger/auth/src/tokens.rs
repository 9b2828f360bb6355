//! Bearer-token authorization (roles: docs/http-api.md), shared by every Tally HTTP service.
//!
//! Tokens are random 256-bit strings handed out once by `tally token new`; the token file stores
//! only their SHA-256 (hex), a name and a role. Because a token has 256 bits of entropy, a plain
//! hash is enough (nothing to brute-force), and because lookup is by hash, comparing never leaks
//! timing about a stored token.
//!
//! Roles: `tenant` (exactly one tenant), `regulator` (the tenants it names: their records and
//! proofs, read only), `billing` (every tenant's spend, nothing per record), `admin` (everything,
//! metrics). Only a tenant's own token and `admin` may change its budget (reserve, release).
//! A refusal never depends on whether the other tenant exists, so it reveals nothing about it.
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
    Tenant,
    Regulator,
    Billing,
    /// Reads `/metrics` of both services and nothing else: for a Prometheus scraper, which
    /// should never hold a token that reads data.
    Metrics,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tenant => "tenant",
            Role::Regulator => "regulator",
            Role::Billing => "billing",
            Role::Metrics => "metrics",
            Role::Admin => "admin",
        }
    }
}

/// One `[[token]]` stanza of the token file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it; shown in logs, never the token itself.
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token, lowercase hex.
    pub sha256: String,
    /// `tenant`: exactly one; `regulator`: one or more; others: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
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
}

impl Principal {
    /// The caller when authorization is off (a loopback-only development setup).
    pub fn anonymous_admin() -> Self {
        Principal { name: "anonymous".into(), role: Role::Admin, tenants: BTreeSet::new() }
    }

    /// May read this tenant's records, proofs and reports.
    pub fn can_read_tenant(&self, tenant: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Tenant | Role::Regulator => self.tenants.contains(tenant),
            Role::Billing | Role::Metrics => false,
        }
    }

    /// May change this tenant's budget: reserve (authorize) and release. Its own `tenant` token
    /// and `admin` only; a regulator reads, and billing sees spend, but neither spends.
    pub fn can_write_budget(&self, tenant: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::Tenant => self.tenants.contains(tenant),
            Role::Regulator | Role::Billing | Role::Metrics => false,
        }
    }

    /// May read every tenant's spend (billing reports).
    pub fn can_read_all_spend(&self) -> bool {
        matches!(self.role, Role::Billing | Role::Admin)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// May read a service's `/metrics` (which never carry a tenant id).
    pub fn can_read_metrics(&self) -> bool {
        matches!(self.role, Role::Metrics | Role::Admin)
    }
}

/// Why a request was refused. `code()` is stable and shown to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("unknown or revoked token")]
    Unknown,
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
            AuthError::Forbidden(_) => "forbidden",
            AuthError::TokenFileInvalid => "token_file_invalid",
        }
    }

    /// 401 for who-are-you, 403 for not-allowed, 503 while the server cannot check tokens.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Unknown => 401,
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
        loaded.by_hash.get(&hash).cloned().ok_or(AuthError::Unknown)
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
            tally_schemas::validate_tenant_id(t).map_err(|_| format!("{at}: {t:?} is not a valid tenant id"))?;
        }
        match (e.role, e.tenants.len()) {
            (Role::Tenant, 1) | (Role::Regulator, 1..) | (Role::Billing | Role::Metrics | Role::Admin, 0) => {}
            (Role::Tenant, _) => return Err(format!("{at}: a tenant token names exactly one tenant")),
            (Role::Regulator, _) => return Err(format!("{at}: a regulator token names at least one tenant")),
            (role, _) => return Err(format!("{at}: a {} token names no tenants", role.as_str())),
        }
        let principal = Principal { name: e.name.clone(), role: e.role, tenants: e.tenants.iter().cloned().collect() };
        if by_hash.insert(hash, principal).is_some() {
            return Err(format!("{at}: the same token appears twice"));
        }
    }
    Ok(by_hash)
}

/// A fresh token and its stanza for the token file. The token is shown once and never stored.
pub fn new_token(name: &str, role: Role, tenants: Vec<String>) -> Result<(String, TokenEntry)> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let entry = TokenEntry { name: name.to_string(), role, sha256: hex::encode(Sha256::digest(token.as_bytes())), tenants };
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

    #[test]
    fn roles_reach_exactly_what_they_should() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let reg = new_token("regulator", Role::Regulator, vec!["acme".into(), "globex".into()]).unwrap();
        let bill = new_token("billing", Role::Billing, vec![]).unwrap();
        let admin = new_token("ops", Role::Admin, vec![]).unwrap();
        let scraper = new_token("prometheus", Role::Metrics, vec![]).unwrap();
        let (_dir, store) = store_with(&[acme.clone(), reg.clone(), bill.clone(), admin.clone(), scraper.clone()]);
        let who = |t: &str| store.authenticate(Some(&format!("Bearer {t}"))).unwrap();

        let p = who(&acme.0);
        assert!(p.can_read_tenant("acme") && !p.can_read_tenant("globex") && !p.can_read_all_spend() && !p.is_admin());
        let p = who(&reg.0);
        assert!(p.can_read_tenant("acme") && p.can_read_tenant("globex") && !p.can_read_tenant("initech"));
        assert!(!p.can_read_all_spend());
        let p = who(&bill.0);
        assert!(p.can_read_all_spend() && !p.can_read_tenant("acme"));
        let p = who(&admin.0);
        assert!(p.is_admin() && p.can_read_tenant("anyone") && p.can_read_metrics());
        let p = who(&scraper.0);
        assert!(p.can_read_metrics() && !p.is_admin() && !p.can_read_tenant("acme") && !p.can_write_budget("acme") && !p.can_read_all_spend());
        for t in [&acme, &reg, &bill] {
            assert!(!who(&t.0).can_read_metrics(), "{}", t.1.name);
        }
        assert!(new_token("prometheus", Role::Metrics, vec!["acme".into()]).unwrap_err().to_string().contains("a metrics token names no tenants"));
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
    fn only_the_tenant_itself_and_admins_may_change_its_budget() {
        let acme = new_token("acme-app", Role::Tenant, vec!["acme".into()]).unwrap();
        let reg = new_token("regulator", Role::Regulator, vec!["acme".into()]).unwrap();
        let bill = new_token("billing", Role::Billing, vec![]).unwrap();
        let admin = new_token("ops", Role::Admin, vec![]).unwrap();
        let scraper = new_token("prometheus", Role::Metrics, vec![]).unwrap();
        let (_dir, store) = store_with(&[acme.clone(), reg.clone(), bill.clone(), admin.clone(), scraper.clone()]);
        let who = |t: &str| store.authenticate(Some(&format!("Bearer {t}"))).unwrap();
        assert!(who(&acme.0).can_write_budget("acme") && !who(&acme.0).can_write_budget("globex"));
        assert!(who(&reg.0).can_read_tenant("acme") && !who(&reg.0).can_write_budget("acme"), "a regulator reads, never spends");
        assert!(!who(&bill.0).can_write_budget("acme"));
        assert!(who(&admin.0).can_write_budget("acme"));
    }

    #[test]
    fn disabled_store_admits_an_anonymous_admin() {
        let store = TokenStore::disabled();
        assert!(!store.is_enabled());
        assert_eq!(store.authenticate(None), Ok(Principal::anonymous_admin()));
    }
}
