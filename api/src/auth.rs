//! Bearer tokens with roles and namespace scopes.
//!
//! Tokens live in a JSON file (`<data>/tokens.json` by default) that holds
//! only their BLAKE3 hashes, so the file itself grants nothing. On first
//! start, when there is no file, the server mints one admin token, stores its
//! hash, and writes the token itself to `admin.token` beside the tokens file
//! (`<data>/admin.token` by default; mode 0600) for the operator to pick up.
//!
//! Roles: `producer` (create and cancel tasks, read), `worker` (claim and
//! report on steps, read), `operator` (everything a producer does, plus
//! retry, resolve, give up, pause, resume, concurrency, and what an auditor
//! reads: the event feed, audit log and workers), `auditor` (read
//! everything, including the event feed; write nothing), `admin` (all).
//! A scope limits a token to some namespaces; the writer enforces it against
//! the ledger, which knows each task's namespace.
//!
//! Revocation: an entry with `"revoked": true` stays in the file (so the
//! record of who held it survives) but authenticates nobody. The file is read
//! at startup and again on SIGHUP ([`Tokens::reload_from`]): a reload swaps the
//! whole table at once (a file that fails to parse or check changes nothing),
//! and what a token's holder has open ends with it — its following event
//! feeds end, its GraphQL WebSockets close with 4403 — when a reload revokes or
//! removes the token or changes its roles or scope ([`Tokens::still_valid`]).
//! (Revoking a leaked token took a restart, and a SIGHUP ended the server.)

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use domain::Namespace;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Producer,
    Worker,
    Operator,
    Auditor,
    Admin,
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Create tasks.
    Produce,
    /// Cancel a task.
    Cancel,
    /// Claim, heartbeat, complete, fail, release, add steps.
    Work,
    /// Retry, resolve, give up, pause, resume, set concurrency.
    Operate,
    /// Read tasks and queues.
    Read,
    /// Read the raw event feed and audit data.
    Audit,
}

impl Role {
    fn grants(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Admin => true,
            Role::Producer => matches!(permission, Produce | Cancel | Read),
            Role::Worker => matches!(permission, Work | Read),
            Role::Operator => matches!(permission, Produce | Cancel | Operate | Read | Audit),
            Role::Auditor => matches!(permission, Read | Audit),
        }
    }
}

/// One entry of the tokens file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it; recorded as the actor of every command sent with it.
    pub name: String,
    /// Lower-case hex BLAKE3 of the token.
    pub token_blake3: String,
    pub roles: BTreeSet<Role>,
    /// Namespaces the token may touch; absent or empty means all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// A revoked token authenticates nobody (401), whatever its roles.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub tokens: Vec<TokenEntry>,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    pub roles: BTreeSet<Role>,
    /// `None`: every namespace.
    pub scope: Option<Arc<[Namespace]>>,
    /// The BLAKE3 of its token, to look it up again after a reload.
    token_blake3: Arc<str>,
}

impl Principal {
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.roles.iter().any(|r| r.grants(permission)) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "token {:?} (roles {:?}) may not do this; it needs a role granting {permission:?}",
                self.name, self.roles
            )))
        }
    }

    /// Admin-only actions that span every namespace (a backup, a projection rebuild): the admin
    /// role and no namespace scope. `what` names the action in the refusal.
    pub fn require_unscoped_admin(&self, what: &str) -> Result<(), ApiError> {
        if !self.roles.contains(&Role::Admin) {
            return Err(ApiError::forbidden(format!(
                "token {:?} (roles {:?}) may not {what}; it needs the admin role",
                self.name, self.roles
            )));
        }
        if self.scope.is_some() {
            return Err(ApiError::forbidden(format!(
                "a namespace-scoped token may not {what}: it spans every namespace"
            )));
        }
        Ok(())
    }

    /// Whether reads of `namespace` are allowed.
    pub fn may_see(&self, namespace: &Namespace) -> bool {
        self.scope.as_ref().is_none_or(|s| s.contains(namespace))
    }

    /// The actor recorded on events.
    pub fn actor(&self) -> String {
        format!("{ACTOR_PREFIX}{}", self.name)
    }
}

/// The tokens of one version of the tokens file, by hash.
#[derive(Debug, Default)]
struct TokenTable {
    by_hash: HashMap<String, Principal>,
    /// Hashes of revoked tokens, only to say "revoked" rather than "unknown".
    revoked: BTreeSet<String>,
}

/// All known tokens; the table is replaced whole by a reload. Cheap to clone: clones share it.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    table: Arc<RwLock<Arc<TokenTable>>>,
    /// Counts the reloads, for what must look again at its token when one happens.
    reloads: Arc<watch::Sender<u64>>,
}

/// What a reload found in the tokens file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenCounts {
    pub live: usize,
    pub revoked: usize,
}

/// What a token's actor starts with, before its name.
const ACTOR_PREFIX: &str = "token:";
/// The longest actor the writer records.
const ACTOR_BYTES_MAX: usize = eventlog::record::COMMAND_ID_BYTES_MAX;

pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

impl TokenTable {
    fn from_file(file: TokensFile) -> anyhow::Result<Self> {
        let mut by_hash = HashMap::new();
        let mut revoked = BTreeSet::new();
        // Names are what the log records (`token:<name>`): two tokens of one name could not be told
        // apart in the audit trail (found by a black-box check: a second `admin` was accepted).
        // Revoked entries may share a live token's name (a token rotated under its name): they
        // authenticate nobody, so they record nothing.
        let mut names = std::collections::HashSet::new();
        for entry in file.tokens {
            // The writer refuses an actor it could not record, and every command of the
            // token would then fail with an error about a field its client never sent.
            if entry.name.chars().any(char::is_control) || ACTOR_PREFIX.len() + entry.name.len() > ACTOR_BYTES_MAX {
                anyhow::bail!(
                    "token name {:?} must be at most {} bytes without control characters (the log records \
                     it as the actor `{ACTOR_PREFIX}<name>`)",
                    entry.name,
                    ACTOR_BYTES_MAX - ACTOR_PREFIX.len()
                );
            }
            if entry.name.is_empty() || (!entry.revoked && !names.insert(entry.name.clone())) {
                anyhow::bail!(
                    "token name {:?} is empty or used by two live tokens: each token needs a name of its own",
                    entry.name
                );
            }
            let hash = entry.token_blake3.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!("token {:?}: token_blake3 must be 64 hex digits (the BLAKE3 of the token)", entry.name);
            }
            let repeated = || anyhow::anyhow!("token {:?} has the hash of a token listed before it", entry.name);
            if entry.revoked {
                if by_hash.contains_key(&hash) || !revoked.insert(hash) {
                    return Err(repeated());
                }
                continue;
            }
            if revoked.contains(&hash) {
                return Err(repeated());
            }
            let scope = if entry.namespaces.is_empty() {
                None
            } else {
                let parsed: Result<Vec<Namespace>, _> = entry.namespaces.iter().map(Namespace::new).collect();
                Some(Arc::from(parsed.map_err(|r| anyhow::anyhow!("token {:?}: {r}", entry.name))?))
            };
            if entry.roles.is_empty() {
                anyhow::bail!("token {:?} has no roles", entry.name);
            }
            let principal = Principal {
                name: Arc::from(entry.name.as_str()),
                roles: entry.roles,
                scope,
                token_blake3: Arc::from(hash.as_str()),
            };
            if by_hash.insert(hash, principal).is_some() {
                return Err(repeated());
            }
        }
        Ok(Self { by_hash, revoked })
    }
}

impl Tokens {
    pub fn from_file(file: TokensFile) -> anyhow::Result<Self> {
        Ok(Self { table: Arc::new(RwLock::new(Arc::new(TokenTable::from_file(file)?))), reloads: Arc::default() })
    }

    fn table(&self) -> Arc<TokenTable> {
        self.table.read().expect("tokens lock").clone()
    }

    /// The principal of a live token; `None` for unknown and revoked ones.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        self.table().by_hash.get(&hash_token(token)).cloned()
    }

    /// Whether `token` is listed as revoked.
    pub fn is_revoked(&self, token: &str) -> bool {
        self.table().revoked.contains(&hash_token(token))
    }

    /// Whether `who`'s token still authenticates as `who`: neither revoked nor removed by a
    /// reload, with the same name, roles and scope.
    pub fn still_valid(&self, who: &Principal) -> bool {
        self.table().by_hash.get(&*who.token_blake3) == Some(who)
    }

    /// Reads the tokens file at `path` again and puts its tokens in place of the current ones,
    /// all at once; a file that cannot be read, parsed or checked changes nothing.
    pub fn reload_from(&self, path: &Path) -> anyhow::Result<TokenCounts> {
        let table = TokenTable::from_file(read_tokens_file(path)?)?;
        let counts = TokenCounts { live: table.by_hash.len(), revoked: table.revoked.len() };
        *self.table.write().expect("tokens lock") = Arc::new(table);
        self.reloads.send_modify(|n| *n += 1);
        Ok(counts)
    }

    /// Resolves once a reload leaves `who()` (when there is one yet) no longer valid (see
    /// [`Tokens::still_valid`]); for what a token holds open. A reload between `who`'s
    /// authentication and this call counts too: it looks once at the start.
    pub async fn revoked(&self, who: impl Fn() -> Option<Principal>) {
        let mut reloads = self.reloads.subscribe();
        reloads.mark_changed();
        while reloads.changed().await.is_ok() {
            if who().is_some_and(|who| !self.still_valid(&who)) {
                return;
            }
        }
        std::future::pending().await
    }
}

/// Reads and parses a tokens file (not yet checked: [`TokenTable::from_file`] does that).
fn read_tokens_file(path: &Path) -> anyhow::Result<TokensFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse tokens file {}", path.display()))
}

/// A fresh random token: 256 bits from the OS, as `tl_` + hex.
pub fn mint_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("tl_{}{}", a.simple(), b.simple())
}

/// Where the tokens came from, for the startup message.
pub enum TokenSource {
    Existing(PathBuf),
    /// A new admin token was minted and written to this file.
    MintedAdmin {
        tokens: PathBuf,
        token_file: PathBuf,
    },
}

/// Loads the tokens file, creating it with one admin token (in `admin.token` beside it) if it
/// is missing.
pub fn load_or_init(tokens_path: &Path) -> anyhow::Result<(Tokens, TokenSource)> {
    if tokens_path.exists() {
        let tokens = Tokens::from_file(read_tokens_file(tokens_path)?)?;
        return Ok((tokens, TokenSource::Existing(tokens_path.to_path_buf())));
    }
    let token = mint_token();
    let file = TokensFile {
        tokens: vec![TokenEntry {
            name: "admin".into(),
            token_blake3: hash_token(&token),
            roles: [Role::Admin].into_iter().collect(),
            namespaces: Vec::new(),
            revoked: false,
        }],
    };
    // The token first, then the file that makes it valid, each written whole under a temporary
    // name and renamed into place: a crash in between leaves no tokens file (the next start
    // mints again), never a torn one or one whose admin token nobody was given. The token goes
    // beside its tokens file: a `--tokens` path elsewhere (a typo) replaced the data dir's
    // admin.token, whose token was still the valid one (found by a black-box check).
    let token_file = tokens_path.with_file_name("admin.token");
    if let Some(parent) = tokens_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    write_durably(&token_file, &(token + "\n")).with_context(|| format!("write {}", token_file.display()))?;
    write_durably(tokens_path, &(serde_json::to_string_pretty(&file)? + "\n"))
        .with_context(|| format!("write {}", tokens_path.display()))?;
    Ok((Tokens::from_file(file)?, TokenSource::MintedAdmin { tokens: tokens_path.to_path_buf(), token_file }))
}

/// Writes `text` to `path` readable by its owner only, all or nothing: a temporary file
/// synced, renamed over `path`, and the directory synced.
fn write_durably(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(".tmp");
    let temp = std::path::PathBuf::from(temp_name);
    // A leftover from a crash keeps its mode when opened again: start from no file.
    match std::fs::remove_file(&temp) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// The token of an `Authorization` value `Bearer <token>`; the scheme's case does not matter
/// (RFC 9110 §11.1).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Anything that can authenticate a request.
pub trait HasTokens {
    fn tokens(&self) -> &Tokens;
}

impl<S: HasTokens + Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let mut headers = parts.headers.get_all(AUTHORIZATION).iter();
        let header =
            headers.next().ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
        if headers.next().is_some() {
            return Err(ApiError::unauthorized("send one Authorization header, not several"));
        }
        let token = header
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let tokens = state.tokens();
        tokens.authenticate(token).ok_or_else(|| {
            ApiError::unauthorized(if tokens.is_revoked(token) { "this token was revoked" } else { "unknown token" })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_exactly_their_permissions() {
        use Permission::*;
        let all = [Produce, Cancel, Work, Operate, Read, Audit];
        let granted = |role: Role| all.iter().filter(|p| role.grants(**p)).copied().collect::<Vec<_>>();
        assert_eq!(granted(Role::Producer), [Produce, Cancel, Read]);
        assert_eq!(granted(Role::Worker), [Work, Read]);
        assert_eq!(granted(Role::Operator), [Produce, Cancel, Operate, Read, Audit]);
        assert_eq!(granted(Role::Auditor), [Read, Audit]);
        assert_eq!(granted(Role::Admin), all);
    }

    #[test]
    fn minted_tokens_authenticate_by_hash_only() {
        let token = mint_token();
        assert_eq!(token.len(), 3 + 64);
        let file = TokensFile {
            tokens: vec![TokenEntry {
                name: "w".into(),
                token_blake3: hash_token(&token),
                roles: [Role::Worker].into_iter().collect(),
                namespaces: vec!["mail".into()],
                revoked: false,
            }],
        };
        let tokens = Tokens::from_file(file).unwrap();
        let p = tokens.authenticate(&token).unwrap();
        assert!(p.may_see(&Namespace::new("mail").unwrap()) && !p.may_see(&Namespace::new("etl").unwrap()));
        assert!(tokens.authenticate("tl_nope").is_none());
    }

    #[test]
    fn the_first_start_mints_an_admin_token_that_later_starts_accept() {
        let data = tempfile::tempdir().unwrap();
        let tokens_path = data.path().join("tokens.json");
        // What a start killed while writing the tokens file leaves: its temporary file only.
        std::fs::write(data.path().join("tokens.json.tmp"), "{\"tok").unwrap();
        let (minted, source) = load_or_init(&tokens_path).unwrap();
        let TokenSource::MintedAdmin { token_file, .. } = source else { panic!("no token was minted") };
        let token = std::fs::read_to_string(&token_file).unwrap();
        assert!(minted.authenticate(token.trim()).is_some());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for path in [&token_file, &tokens_path] {
                assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600, "{path:?}");
            }
        }
        let (loaded, source) = load_or_init(&tokens_path).unwrap();
        assert!(matches!(source, TokenSource::Existing(_)));
        assert!(loaded.authenticate(token.trim()).is_some_and(|p| p.may_see(&Namespace::new("any").unwrap())));
        assert!(!data.path().join("admin.token.tmp").exists() && !data.path().join("tokens.json.tmp").exists());
    }

    /// A tokens file elsewhere that does not exist (a typo in `--tokens`) gets its admin token
    /// beside it: the data dir's admin.token, still the valid one, was replaced.
    #[test]
    fn a_minted_admin_token_goes_beside_its_tokens_file() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("admin.token"), "tl_the_real_one\n").unwrap();
        let elsewhere = data.path().join("typo").join("tokens.json");
        let (_, source) = load_or_init(&elsewhere).unwrap();
        let TokenSource::MintedAdmin { token_file, .. } = source else { panic!("no token was minted") };
        assert_eq!(token_file, data.path().join("typo").join("admin.token"));
        assert_eq!(std::fs::read_to_string(data.path().join("admin.token")).unwrap(), "tl_the_real_one\n");
    }

    /// Names are what the log records, so two tokens of one name are refused, as are an empty
    /// name and a hash that is not one (found by a black-box check: a second `admin` was taken).
    #[test]
    fn token_names_are_unique_and_hashes_well_formed() {
        let entry = |name: &str, token: &str| TokenEntry {
            name: name.into(),
            token_blake3: hash_token(token),
            roles: [Role::Producer].into_iter().collect(),
            namespaces: Vec::new(),
            revoked: false,
        };
        let refused =
            |entries: Vec<TokenEntry>| Tokens::from_file(TokensFile { tokens: entries }).unwrap_err().to_string();
        assert!(refused(vec![entry("admin", "a"), entry("admin", "b")]).contains("used by two live tokens"));
        // A token rotated under its name: the old one revoked.
        let mut old = entry("mailer", "old");
        old.revoked = true;
        assert!(Tokens::from_file(TokensFile { tokens: vec![old, entry("mailer", "new")] }).is_ok());
        assert!(refused(vec![entry("", "a")]).contains("empty"));
        assert!(refused(vec![entry("line\nbreak", "a")]).contains("without control characters"));
        let longest = "n".repeat(ACTOR_BYTES_MAX - ACTOR_PREFIX.len());
        assert!(Tokens::from_file(TokensFile { tokens: vec![entry(&longest, "a")] }).is_ok());
        assert!(refused(vec![entry(&format!("{longest}n"), "a")]).contains("at most 250 bytes"));
        assert!(refused(vec![entry("a", "x"), entry("b", "x")]).contains("the hash of a token listed before it"));
        let mut short = entry("a", "x");
        short.token_blake3 = "zz".into();
        assert!(refused(vec![short]).contains("64 hex digits"));
        assert!(Tokens::from_file(TokensFile { tokens: vec![entry("a", "x"), entry("b", "y")] }).is_ok());
    }

    #[test]
    fn revoked_tokens_authenticate_nobody() {
        let entry = |token: &str, revoked: bool| TokenEntry {
            name: token.into(),
            token_blake3: hash_token(token),
            roles: [Role::Admin].into_iter().collect(),
            namespaces: Vec::new(),
            revoked,
        };
        let tokens = Tokens::from_file(TokensFile { tokens: vec![entry("live", false), entry("gone", true)] }).unwrap();
        assert!(tokens.authenticate("live").is_some() && !tokens.is_revoked("live"));
        assert!(tokens.authenticate("gone").is_none() && tokens.is_revoked("gone"));
        let parsed: TokensFile =
            serde_json::from_str(r#"{"tokens":[{"name":"x","token_blake3":"00","roles":["auditor"],"revoked":true}]}"#)
                .unwrap();
        assert!(parsed.tokens[0].revoked);
        assert!(Tokens::from_file(TokensFile { tokens: vec![entry("t", false), entry("t", true)] }).is_err());
    }
}
