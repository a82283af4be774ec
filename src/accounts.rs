//! The account service: every change to an account goes through [`AccountService`].
//!
//! The admin CLI (directly and over the admin socket, `admin::execute`), the web step and
//! `mailgate user import` call it, so a change means the same thing wherever it is made:
//! it is checked the same way, written in one atomic store change
//! ([`Store::update_account`], compare-and-set on both backends; never read-modify-put),
//! and its side effects happen here and only here: live IMAP/SMTP sessions that the
//! change invalidates end ([`LiveSessions::kill`], which also tells the other nodes sharing
//! the store), and the audit event is written. What is only the web's (its own sessions,
//! the page shown) stays in `web`; what is only the CLI's (wording, JSON) in `admin`.
//!
//! Read-only helpers that both show (the app-password list, devices still sending the
//! account password, times) live here too, so the CLI and the web word them alike.

use crate::auth::clock::{Clock, SystemClock};
use crate::auth::crypto::SecretKey;
use crate::auth::{self, Authenticator, app_password, backup_codes, oauth, password, totp};
use crate::live::LiveSessions;
use crate::secret::{Secret, SecretString};
use crate::store::{Account, AppPasswordRecord, AuditEvent, Dump, LastUse, Scope, Store, StoreError, TotpState};
use std::sync::Arc;

/// Why an account change was refused. The CLI prints it; the web maps it to its pages.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Not an e-mail address (see [`check_email`]).
    #[error("`{0}` is not an e-mail address")]
    BadEmail(String),
    /// No such account.
    #[error("unknown user {0}")]
    UnknownUser(String),
    /// The app-password label is refused.
    #[error(transparent)]
    Label(#[from] LabelError),
    /// The account has no password of its own to change (app passwords only).
    #[error("{0} has no account password to change")]
    NoLocalPassword(String),
    /// Two-step verification is off, and the change needs it on.
    #[error("two-factor authentication is off for {0}")]
    SecondFactorOff(String),
    /// Two-step verification is on already (an enrolment finished elsewhere meanwhile).
    #[error("two-factor authentication is on already for {0}")]
    SecondFactorOn(String),
    /// A TOTP or backup code that is not right (or was used already).
    #[error("that code is not right")]
    WrongCode,
    /// A TOTP secret given in base32 is not.
    #[error("the secret is not valid base32")]
    BadSecret,
    /// A TOTP secret that cannot be used (too short) or an issuer that cannot be.
    #[error("cannot use this TOTP secret: {0}")]
    Totp(#[from] totp_rs::TotpError),
    /// An app password's narrowing that cannot be made (issue 20).
    #[error(transparent)]
    Narrow(#[from] app_password::NarrowError),
    /// An app password's expiry that has passed already.
    #[error("that expiry has passed already; give a later date or a duration such as 90d")]
    ExpiryPassed,
    /// The OS gave no randomness.
    #[error("no OS randomness: {0}")]
    Randomness(#[from] getrandom::Error),
    /// Sealing or hashing a secret failed.
    #[error("{0}")]
    Crypto(String),
    /// The hashing threads are too busy to take the work now.
    #[error("the server is too busy; try again")]
    Busy,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A store export whose TOTP secrets this mailgate's key cannot open: it was made by a
    /// mailgate with another `secret.key`.
    #[error(
        "the export holds TOTP secrets of {accounts} account(s) (e.g. {example}) sealed with another key than this mailgate's secret.key: \
         stop `mailgate serve`, copy the secret.key of the server that made the export into `server.data_dir` (replacing the one there), then import again; nothing was imported"
    )]
    ForeignKey {
        /// How many accounts' secrets do not open.
        accounts: usize,
        /// One of them.
        example: String,
    },
}

impl AccountError {
    /// Nothing was wrong with the request: the store or the hashing threads could not
    /// serve it now ("try again in a minute").
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AccountError::Busy | AccountError::Store(StoreError::Backend(_)))
    }
}

fn crypto(e: impl std::fmt::Display) -> AccountError {
    AccountError::Crypto(e.to_string())
}

/// Who makes a change: recorded in the audit event and as an app password's creator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The admin CLI.
    Admin,
    /// The account's owner on the web step.
    Web,
}

impl Actor {
    /// The audit detail of a change it makes.
    fn detail(self) -> &'static str {
        match self {
            Actor::Admin => "by admin",
            Actor::Web => "on the web",
        }
    }

    /// An app password's `created_by`, and the `by …` of its audit events.
    fn name(self) -> &'static str {
        match self {
            Actor::Admin => "admin",
            Actor::Web => "web",
        }
    }
}

/// Two-step verification turned on: what to show once.
pub struct TotpOn {
    /// The otpauth:// URI of the secret (only when the secret was made or given here).
    pub uri: Option<SecretString>,
    /// The new set of backup codes, grouped.
    pub backup_codes: Vec<SecretString>,
    /// An earlier TOTP secret was replaced.
    pub replaced: bool,
    /// Sessions opened with the account password that ended.
    pub ended: usize,
}

/// A TOTP secret being enrolled (kept by the web step until its first code comes).
pub struct PendingTotp {
    /// The secret in base32, shown to type in.
    pub base32: SecretString,
    /// Its otpauth:// URI, shown as a QR code.
    pub uri: SecretString,
}

/// A new app password: shown once.
pub struct CreatedAppPassword {
    /// The password and its public id.
    pub new: app_password::NewAppPassword,
    /// The label as stored (trimmed).
    pub label: String,
    /// The scopes as stored (sorted, defaulted).
    pub scopes: Vec<Scope>,
}

/// Every change to an account. Cheap to clone.
#[derive(Clone)]
pub struct AccountService {
    store: Arc<dyn Store>,
    key: Arc<SecretKey>,
    issuer: String,
    actor: Actor,
    live: Option<LiveSessions>,
    auth: Option<Authenticator>,
    clock: Arc<dyn Clock>,
}

impl AccountService {
    /// A service over `store`, sealing TOTP secrets with `key`, naming `issuer` (the
    /// server's host name) in otpauth URIs, making changes as `actor`. Without
    /// [`with_live`](Self::with_live) no live session is ended (no server runs).
    pub fn new(store: Arc<dyn Store>, key: Arc<SecretKey>, issuer: &str, actor: Actor) -> AccountService {
        AccountService {
            store,
            key,
            issuer: issuer.to_string(),
            actor,
            live: None,
            auth: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// The live sessions that changes end (a server runs).
    pub fn with_live(mut self, sessions: LiveSessions) -> AccountService {
        self.live = Some(sessions);
        self
    }

    /// The server's authenticator: an unlock also clears its in-memory failure delay, and
    /// backup codes of old (argon2) sets are checked on its hashing threads.
    pub fn with_authenticator(mut self, auth: Authenticator) -> AccountService {
        self.auth = Some(auth);
        self
    }

    /// The clock of changes and their audit events (the web step's, in its tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> AccountService {
        self.clock = clock;
        self
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Records an audit event at the service's time; a failure to write is logged, not fatal.
    pub fn audit(&self, username: &str, kind: &str, detail: String) {
        let ev = AuditEvent { at: self.now(), username: username.into(), kind: kind.into(), detail };
        if let Err(e) = self.store.append_audit(&ev) {
            tracing::warn!(error = %e, kind, "cannot write an audit event");
        }
    }

    /// Queues the security notification of a change (`notify`), when a server runs with
    /// `[notify]` on; never fails the change.
    fn notify(&self, username: &str, kind: crate::notify::Kind, facts: &[(&str, &str)]) {
        if let Some(n) = self.auth.as_ref().and_then(|a| a.notifier()) {
            n.notify(username, kind, facts);
        }
    }

    fn end_sessions(&self, username: &str, app_password_id: Option<&str>) -> usize {
        self.live.as_ref().map(|s| s.kill(username, app_password_id)).unwrap_or(0)
    }

    /// After a change that the account password used so far no longer passes (a new
    /// password, TOTP turned on): the sessions opened with it end, and the change (`kind`)
    /// is audited. Returns how many sessions ended.
    fn account_password_retired(&self, username: &str, kind: &str) -> usize {
        let ended = self.live.as_ref().map(|s| s.kill_account_password_sessions(username)).unwrap_or(0);
        self.audit(username, kind, self.actor.detail().into());
        ended
    }

    /// One atomic change of an account: `f` sees the current record and may refuse, and
    /// nothing is written then.
    fn change(
        &self,
        username: &str,
        mut f: impl FnMut(&mut Account) -> Result<(), AccountError>,
    ) -> Result<Account, AccountError> {
        let mut refused = None;
        let result = self.store.update_account(username, &mut |a: &mut Account| {
            f(a).map_err(|e| {
                refused = Some(e);
                StoreError::Conflict("refused".into())
            })
        });
        match (result, refused) {
            (_, Some(e)) => Err(e),
            (Ok(a), None) => Ok(a),
            (Err(StoreError::NotFound(_)), None) => Err(AccountError::UnknownUser(username.to_string())),
            (Err(e), None) => Err(e.into()),
        }
    }

    /// The account, or `UnknownUser`.
    pub fn account(&self, username: &str) -> Result<Account, AccountError> {
        self.store.get_account(username)?.ok_or_else(|| AccountError::UnknownUser(username.to_string()))
    }

    // ------------------------------------------------------------------------------
    // Accounts

    /// Creates an account with its other addresses and (argon2id) password hash; returns
    /// the normalised address. `None`: app passwords only.
    pub fn create(
        &self,
        email: &str,
        addresses: &[String],
        password_hash: Option<String>,
    ) -> Result<String, AccountError> {
        let email = check_email(email)?;
        let mut aliases = Vec::new();
        for a in addresses {
            let a = check_email(a)?;
            if a != email && !aliases.contains(&a) {
                aliases.push(a);
            }
        }
        let account = Account { addresses: aliases, password_hash, ..Account::new(&email, self.now()) };
        self.store.create_account(&account)?;
        self.audit(&email, "account_created", String::new());
        Ok(email)
    }

    /// Creates accounts with their stored (Dovecot) password hashes, all or none; returns
    /// how many.
    pub fn import_users(&self, users: &[(String, String)]) -> Result<usize, AccountError> {
        let now = self.now();
        let accounts = users
            .iter()
            .map(|(email, hash)| {
                Ok(Account { password_hash: Some(hash.clone()), ..Account::new(&check_email(email)?, now) })
            })
            .collect::<Result<Vec<Account>, AccountError>>()?;
        self.store.create_accounts(&accounts)?;
        for a in &accounts {
            self.audit(&a.username, "account_created", "imported".into());
        }
        Ok(accounts.len())
    }

    /// Loads a store export into an empty store (all or nothing).
    /// Imports a store export into an empty store. The export's TOTP secrets must open
    /// with this mailgate's key (the export's backup codes are keyed with the same key):
    /// otherwise nothing is imported, since every 2FA account would lose its second factor
    /// without a word (a data_dir whose secret.key was not copied gets a new one).
    pub fn import_store(&self, dump: &Dump) -> Result<(), AccountError> {
        let foreign: Vec<&str> = dump
            .accounts
            .iter()
            .filter(|a| a.totp.as_ref().is_some_and(|t| self.key.open(&t.secret_enc, &a.username).is_err()))
            .map(|a| a.username.as_str())
            .collect();
        if let Some(example) = foreign.first() {
            return Err(AccountError::ForeignKey { accounts: foreign.len(), example: (*example).to_string() });
        }
        Ok(self.store.import(dump)?)
    }

    /// Removes an account and its app passwords (its audit events stay); returns how many
    /// live sessions ended.
    pub fn remove(&self, email: &str) -> Result<usize, AccountError> {
        let email = check_email(email)?;
        self.store.remove_account(&email)?;
        let ended = self.end_sessions(&email, None);
        // Audit events outlive the account: its history stays readable in an export.
        self.audit(&email, "account_removed", self.actor.detail().into());
        Ok(ended)
    }

    /// Sets the account password (an argon2id hash made by the caller, outside any store
    /// lock); with `must_have_one`, only if the account has one already (the owner
    /// changing it; an admin may give one to an app-passwords-only account). Sessions
    /// opened with the old password end; returns how many.
    pub fn set_password(&self, email: &str, hash: String, must_have_one: bool) -> Result<usize, AccountError> {
        let now = self.now();
        self.change(email, |a| {
            if must_have_one && a.password_hash.is_none() {
                return Err(AccountError::NoLocalPassword(a.username.clone()));
            }
            a.password_hash = Some(hash.clone());
            a.updated_at = now;
            Ok(())
        })?;
        // Apps signed in through the browser signed in with the old password.
        self.end_oauth_grants(email);
        self.notify(email, crate::notify::Kind::AccountPasswordChanged, &[("by", self.actor.detail())]);
        Ok(self.account_password_retired(email, "account_password_changed"))
    }

    /// Clears the account's failed-login lock: its guess budgets (in the store, shared by
    /// the nodes) and, when a server runs, its in-memory failure delay.
    pub fn unlock(&self, email: &str) -> Result<(), AccountError> {
        self.account(email)?;
        match &self.auth {
            Some(auth) => auth.forget_failures(email),
            None => auth::budget::Budgets::clear_account(self.store.as_ref(), email),
        }?;
        self.audit(email, "account_unlocked", self.actor.detail().into());
        Ok(())
    }

    // ------------------------------------------------------------------------------
    // Two-step verification

    /// A fresh TOTP secret for an enrolment that the owner confirms with a code
    /// ([`confirm_totp`](Self::confirm_totp)). Changes nothing.
    pub fn new_totp_secret(&self, email: &str) -> Result<PendingTotp, AccountError> {
        let secret = totp_rs::Secret::generate();
        let base32 = SecretString::from(secret.to_base32());
        let uri = totp::otpauth_uri(&self.issuer, email, secret.as_bytes())?;
        Ok(PendingTotp { base32, uri })
    }

    /// The otpauth:// URI of a pending secret (shown again while its enrolment lasts).
    pub fn totp_uri(&self, email: &str, base32: &SecretString) -> Result<SecretString, AccountError> {
        Ok(totp::otpauth_uri(&self.issuer, email, decode_base32(base32.expose())?.expose())?)
    }

    /// Turns two-step verification on with a secret the owner's app shows `code` for now:
    /// the code's time step counts as used, and a new set of backup codes comes with it.
    /// Refused if it is on already.
    pub fn confirm_totp(&self, email: &str, base32: &SecretString, code: &str) -> Result<TotpOn, AccountError> {
        let now = self.now();
        let raw = decode_base32(base32.expose())?;
        let step = totp::matching_step(raw.expose(), code, now).ok_or(AccountError::WrongCode)?;
        self.turn_on_totp(email, raw.expose(), step, false).map(|on| TotpOn { uri: None, ..on })
    }

    /// Turns two-step verification on (or replaces its secret) for an admin: a new
    /// secret, or the given base32 one. A new set of backup codes comes with it.
    pub fn enable_totp(&self, email: &str, base32: Option<&str>) -> Result<TotpOn, AccountError> {
        let raw = match base32 {
            Some(b32) => decode_base32(&b32.trim().replace(' ', "").to_ascii_uppercase())?,
            None => Secret::new(totp_rs::Secret::generate().as_bytes().to_vec()),
        };
        let uri = totp::otpauth_uri(&self.issuer, email, raw.expose())?;
        let on = self.turn_on_totp(email, raw.expose(), 0, true)?;
        Ok(TotpOn { uri: Some(uri), ..on })
    }

    fn turn_on_totp(&self, email: &str, raw: &[u8], step: u64, may_replace: bool) -> Result<TotpOn, AccountError> {
        let now = self.now();
        let sealed = self.key.seal(raw, email).map_err(crypto)?;
        let (shown, set) = backup_codes::generate(now, &self.key)?;
        let mut replaced = false;
        self.change(email, |a| {
            if a.has_second_factor() && !may_replace {
                return Err(AccountError::SecondFactorOn(a.username.clone()));
            }
            replaced = a.totp.is_some();
            a.totp = Some(TotpState { secret_enc: sealed.clone(), enabled_at: now, last_step: step });
            a.second_factor_required = true;
            a.backup_codes = Some(set.clone());
            a.updated_at = now;
            Ok(())
        })?;
        // From now on the account password no longer opens IMAP/SMTP.
        let ended = self.account_password_retired(email, "totp_enabled");
        self.notify(email, crate::notify::Kind::TotpEnabled, &[("by", self.actor.detail())]);
        Ok(TotpOn { uri: None, backup_codes: shown, replaced, ended })
    }

    /// Turns two-step verification off: the TOTP secret and the backup codes go. Also
    /// succeeds when it is off. Ends the apps signed in through the browser (OAuth grants), no other session.
    pub fn disable_totp(&self, email: &str) -> Result<(), AccountError> {
        let now = self.now();
        let mut was_on = false;
        self.change(email, |a| {
            was_on = a.has_second_factor();
            a.totp = None;
            a.second_factor_required = false;
            a.backup_codes = None;
            a.updated_at = now;
            Ok(())
        })?;
        self.audit(email, "totp_disabled", self.actor.detail().into());
        if was_on {
            self.notify(email, crate::notify::Kind::TotpDisabled, &[("by", self.actor.detail())]);
        }
        // Apps signed in through the browser signed in with the second factor.
        self.end_oauth_grants(email);
        Ok(())
    }

    /// A new set of backup codes replaces the old one at once; refused while two-step
    /// verification is off.
    pub fn regenerate_backup_codes(&self, email: &str) -> Result<Vec<SecretString>, AccountError> {
        let now = self.now();
        let (shown, set) = backup_codes::generate(now, &self.key)?;
        self.change(email, |a| {
            if !a.has_second_factor() {
                return Err(AccountError::SecondFactorOff(a.username.clone()));
            }
            a.backup_codes = Some(set.clone());
            a.updated_at = now;
            Ok(())
        })?;
        self.audit(email, "backup_codes_generated", self.actor.detail().into());
        self.notify(email, crate::notify::Kind::BackupCodesGenerated, &[("by", self.actor.detail())]);
        Ok(shown)
    }

    /// Accepts a TOTP code at sign-in: checked and the last accepted step moved forward
    /// in one atomic change, so the same code (or an earlier one) never works twice, and
    /// of two concurrent submissions one wins.
    pub fn accept_totp_code(&self, email: &str, code: &str) -> Result<(), AccountError> {
        let now = self.now();
        let key = self.key.clone();
        self.change(email, |a| {
            let Some(t) = a.totp.as_mut() else { return Err(AccountError::SecondFactorOff(email.to_string())) };
            let secret = key.open(&t.secret_enc, email).map_err(crypto)?;
            match totp::matching_step(secret.expose(), code, now) {
                Some(step) if step > t.last_step => {
                    t.last_step = step;
                    Ok(())
                }
                _ => Err(AccountError::WrongCode),
            }
        })?;
        Ok(())
    }

    /// Spends a backup code at sign-in; returns how many are left. The typed code is
    /// found outside any store lock (one HMAC; argon2 per code for a set from before
    /// keyed hashes, on a hashing thread in `ip`'s turn), then spent in one atomic change
    /// if it is still unused: a code works once however many requests bring it at once.
    pub async fn consume_backup_code(
        &self,
        email: &str,
        code: &SecretString,
        ip: std::net::IpAddr,
    ) -> Result<usize, AccountError> {
        let set = self.account(email)?.backup_codes.ok_or(AccountError::WrongCode)?;
        let found = if backup_codes::needs_hashing(&set) {
            let (key, typed) = (self.key.clone(), SecretString::from(code.expose().clone()));
            let find = move || backup_codes::find(&set, typed.expose(), &key);
            match &self.auth {
                Some(auth) => auth.hash_for(ip, find).await.ok_or(AccountError::Busy)?,
                None => find(),
            }
        } else {
            backup_codes::find(&set, code.expose(), &self.key)
        };
        let found = found.ok_or(AccountError::WrongCode)?;
        let mut left = 0;
        self.change(email, |a| {
            let Some(set) = a.backup_codes.as_mut() else { return Err(AccountError::WrongCode) };
            if !backup_codes::spend(set, &found) {
                return Err(AccountError::WrongCode);
            }
            left = set.remaining();
            Ok(())
        })?;
        self.audit(email, "backup_code_used", format!("{left} left"));
        let facts = [("left", left.to_string()), ("address", ip.to_string())];
        self.notify(email, crate::notify::Kind::BackupCodeUsed, &facts.each_ref().map(|(k, v)| (*k, v.as_str())));
        Ok(left)
    }

    // ------------------------------------------------------------------------------
    // App passwords

    /// Creates an app password (label checked by [`check_label`], scopes defaulting to
    /// both); durable on return. Hashes: call it on a hashing thread.
    pub fn create_app_password(
        &self,
        email: &str,
        label: &str,
        scopes: Vec<Scope>,
    ) -> Result<CreatedAppPassword, AccountError> {
        self.create_limited_app_password(email, label, scopes, app_password::Limits::default())
    }

    /// [`create_app_password`](Self::create_app_password) with an expiry and the networks
    /// it may be used from.
    pub fn create_limited_app_password(
        &self,
        email: &str,
        label: &str,
        scopes: Vec<Scope>,
        limits: app_password::Limits,
    ) -> Result<CreatedAppPassword, AccountError> {
        if limits.expires_at.is_some_and(|at| at <= self.now()) {
            return Err(AccountError::ExpiryPassed);
        }
        let label = check_label(label)?.to_string();
        let mut scopes = if scopes.is_empty() { vec![Scope::Imap, Scope::Smtp] } else { scopes };
        scopes.sort();
        scopes.dedup();
        let account = self.account(email)?;
        let narrow = match &limits.narrow {
            Some(n) => {
                let own: Vec<String> =
                    std::iter::once(account.username.clone()).chain(account.addresses.iter().cloned()).collect();
                app_password::check_narrowing(n, &scopes, &own)?
            }
            None => None,
        };
        let new = app_password::generate().map_err(crypto)?;
        let hash = password::hash(new.password.expose().as_bytes()).map_err(crypto)?;
        let by = self.actor.name();
        let record = AppPasswordRecord {
            id: new.id.clone(),
            username: email.to_string(),
            label: label.clone(),
            scopes: scopes.clone(),
            hash,
            created_at: self.now(),
            created_by: by.into(),
            last_used: None,
            last_used_by: Default::default(),
            oauth: None,
            expires_at: limits.expires_at,
            allow: limits.allow.clone(),
            narrow,
        };
        self.store.create_app_password(&record)?;
        self.audit(email, "app_password_created", format!("{label} ({}) by {by}{}", new.id, limits_text(&record)));
        let scopes_text = scopes.iter().map(|s| s.label()).collect::<Vec<_>>().join(", ");
        let facts = [("label", label.as_str()), ("id", &new.id), ("scopes", &scopes_text), ("by", self.actor.detail())];
        self.notify(email, crate::notify::Kind::AppPasswordCreated, &facts);
        Ok(CreatedAppPassword { new, label, scopes })
    }

    /// Revokes an app password and ends the live sessions opened with it; returns the
    /// record and how many sessions ended. Durable on return; of two concurrent
    /// revocations one succeeds, the other finds nothing.
    pub fn revoke_app_password(&self, email: &str, id: &str) -> Result<(AppPasswordRecord, usize), AccountError> {
        let id = id.trim().to_ascii_lowercase();
        let rec = self.store.revoke_app_password(email, &id)?;
        let ended = self.end_sessions(email, Some(&id));
        self.audit(email, "app_password_revoked", format!("{} ({id}) by {}", rec.label, self.actor.name()));
        Ok((rec, ended))
    }

    /// Revokes every app password of the account; returns how many.
    pub fn revoke_all_app_passwords(&self, email: &str) -> Result<usize, AccountError> {
        let mut revoked = 0;
        for rec in self.store.list_app_passwords(email)? {
            if self.revoke_app_password(email, &rec.id).is_ok() {
                revoked += 1;
            }
        }
        Ok(revoked)
    }

    // ------------------------------------------------------------------------------
    // OAuth grants (`auth::oauth`): the web step's authorization and token endpoints

    /// Issues a single-use authorization code for `email`, after the web step's sign-in
    /// (second factor included) and the person's consent to `approved`.
    pub fn oauth_issue_code(
        &self,
        email: &str,
        approved: &oauth::Approved,
        config: &crate::config::OAuth,
    ) -> Result<SecretString, AccountError> {
        let account = self.account(email)?;
        let claims = oauth::CodeClaims {
            user: account.username,
            client: approved.client_id.clone(),
            redirect: approved.redirect_uri.clone(),
            challenge: approved.code_challenge.clone(),
            scopes: approved.scopes.clone(),
            expires: self.now() + config.code_lifetime.as_secs(),
            nonce: app_password::random_chars(24)?,
        };
        oauth::seal_code(&self.key, &claims).map_err(crypto)
    }

    /// Redeems an authorization code at the token endpoint (`grant_type=authorization_code`):
    /// the code must be unused, unexpired, issued to `client` for `redirect_uri`, and
    /// `code_verifier` must match its S256 challenge. Creates the grant (a device in the
    /// app-password list, audited) and its first tokens.
    pub fn oauth_redeem_code(
        &self,
        code: &str,
        client: &crate::config::OAuthClient,
        redirect_uri: &str,
        code_verifier: &str,
        from: &oauth::Requester,
        config: &crate::config::OAuth,
    ) -> Result<oauth::Tokens, oauth::OAuthError> {
        use oauth::OAuthError::{InvalidGrant, Unavailable};
        let claims = oauth::open_code(&self.key, code).ok_or(InvalidGrant)?;
        let now = self.now();
        if claims.expires < now {
            return Err(InvalidGrant);
        }
        // Single use, atomically with every other redemption on every node: the code's
        // nonce is a budget of one attempt that comes back long after the code expired.
        let once = crate::store::Budget {
            key: format!("oauth-code:{}", claims.nonce),
            burst: 1,
            refill_secs: config.code_lifetime.as_secs() + 86_400,
        };
        match self.store.take_attempt(std::slice::from_ref(&once), now) {
            Ok(None) => {}
            Ok(Some(_)) => {
                self.audit(&claims.user, "oauth_code_replayed", format!("{} from {}", client.name, from.ip));
                return Err(InvalidGrant);
            }
            Err(e) => {
                tracing::error!(error = %e, "store error redeeming an authorization code");
                return Err(Unavailable);
            }
        }
        if claims.client != client.id
            || claims.redirect != redirect_uri
            || !oauth::pkce_matches(code_verifier, &claims.challenge)
        {
            return Err(InvalidGrant);
        }
        let account = match self.store.get_account(&claims.user) {
            Ok(Some(a)) => a,
            Ok(None) => return Err(InvalidGrant),
            Err(_) => return Err(Unavailable),
        };
        let id = app_password::random_chars(app_password::ID_LEN).map_err(|_| Unavailable)?;
        let refresh = oauth::new_refresh_token(&id, 0).map_err(|_| Unavailable)?;
        let record = AppPasswordRecord {
            id: id.clone(),
            username: account.username.clone(),
            label: format!("{} ({id})", client.name),
            scopes: claims.scopes.clone(),
            hash: String::new(),
            created_at: now,
            created_by: "oauth".into(),
            last_used: None,
            last_used_by: Default::default(),
            oauth: Some(crate::store::OAuthGrant {
                client_id: client.id.clone(),
                client_name: client.name.clone(),
                refresh_generation: 0,
                refresh_hash: oauth::token_hash(refresh.expose()),
                retired: vec![],
                refreshed_at: now,
                user_agent: from.user_agent.clone(),
            }),
            expires_at: None,
            allow: vec![],
            narrow: None,
        };
        match self.store.create_app_password(&record) {
            Ok(()) => {}
            Err(StoreError::Limit(_)) => {
                self.audit(
                    &account.username,
                    "oauth_grant_refused",
                    format!("{} from {}: too many app passwords and signed-in apps", client.name, from.ip),
                );
                return Err(InvalidGrant);
            }
            Err(e) => {
                tracing::error!(error = %e, "store error creating an OAuth grant");
                return Err(Unavailable);
            }
        }
        self.audit(
            &account.username,
            "oauth_grant_created",
            format!("{} ({id}) signed in through the browser from {}", client.name, from.ip),
        );
        let address = from.ip.to_string();
        let facts = [("app", client.name.as_str()), ("id", &id), ("address", &address)];
        self.notify(&account.username, crate::notify::Kind::OAuthGrantCreated, &facts);
        Ok(self.tokens(&account.username, &id, refresh, &claims.scopes, config))
    }

    fn tokens(
        &self,
        username: &str,
        id: &str,
        refresh: SecretString,
        scopes: &[Scope],
        config: &crate::config::OAuth,
    ) -> oauth::Tokens {
        let lifetime = config.access_token_lifetime.as_secs();
        oauth::Tokens {
            access_token: oauth::new_access_token(&self.key, id, username, self.now() + lifetime),
            expires_in: lifetime,
            refresh_token: refresh,
            scope: oauth::oauth_scope_string(scopes),
            grant_id: id.to_string(),
        }
    }

    /// `grant_type=refresh_token`: rotates the refresh token and issues an access token.
    /// A retired refresh token presented again revokes the grant and ends its sessions.
    pub fn oauth_refresh(
        &self,
        refresh_token: &str,
        client: &crate::config::OAuthClient,
        from: &oauth::Requester,
        config: &crate::config::OAuth,
    ) -> Result<oauth::Tokens, oauth::OAuthError> {
        use oauth::OAuthError::{InvalidGrant, Unavailable};
        let (id, generation) = oauth::parse_refresh_token(refresh_token).ok_or(InvalidGrant)?;
        let presented = oauth::token_hash(refresh_token);
        let next = oauth::new_refresh_token(&id, generation.wrapping_add(1)).map_err(|_| Unavailable)?;
        let next_hash = oauth::token_hash(next.expose());
        let now = self.now();
        let lifetime = config.refresh_token_lifetime.as_secs();
        #[derive(PartialEq)]
        enum Refused {
            Grant,
            Client,
            Replayed,
        }
        let mut refused = None;
        let result = self.store.update_app_password(&id, &mut |rec| {
            let mut refuse = |why| {
                refused = Some(why);
                Err(StoreError::Conflict("refused".into()))
            };
            let Some(grant) = rec.oauth.as_mut() else { return refuse(Refused::Grant) };
            if grant.client_id != client.id {
                return refuse(Refused::Client);
            }
            let current = generation == grant.refresh_generation
                && crate::secret::ct_eq(presented.as_bytes(), grant.refresh_hash.as_bytes());
            if !current {
                let replayed = grant.retired.iter().any(|h| crate::secret::ct_eq(h.as_bytes(), presented.as_bytes()));
                return refuse(if replayed { Refused::Replayed } else { Refused::Grant });
            }
            if grant.refreshed_at.saturating_add(lifetime) < now {
                return refuse(Refused::Grant);
            }
            let old = std::mem::replace(&mut grant.refresh_hash, next_hash.clone());
            grant.retired.push(old);
            let excess = grant.retired.len().saturating_sub(oauth::RETIRED_KEPT);
            grant.retired.drain(..excess);
            grant.refresh_generation = generation.wrapping_add(1);
            grant.refreshed_at = now;
            if from.user_agent.is_some() {
                grant.user_agent = from.user_agent.clone();
            }
            Ok(())
        });
        match (result, refused) {
            (Ok(rec), _) => Ok(self.tokens(&rec.username, &id, next, &rec.scopes, config)),
            // RFC 6749 §5.2: a refresh token issued to another client is invalid_grant.
            (_, Some(Refused::Client)) => Err(InvalidGrant),
            (_, Some(Refused::Replayed)) => {
                // RFC 9700 §4.14.2: a refresh token used twice means one copy was stolen;
                // the grant ends for both holders.
                if let Ok(Some(rec)) = self.store.get_app_password(&id)
                    && let Ok(_) = self.store.revoke_app_password(&rec.username, &id)
                {
                    let ended = self.end_sessions(&rec.username, Some(&id));
                    self.audit(
                        &rec.username,
                        "oauth_refresh_replayed",
                        format!("{} ({id}): an old refresh token was used from {}; the sign-in was ended and {ended} session(s) closed", rec.label, from.ip),
                    );
                }
                Err(InvalidGrant)
            }
            (_, Some(Refused::Grant)) | (Err(StoreError::NotFound(_)), None) => Err(InvalidGrant),
            (Err(e), None) => {
                tracing::error!(error = %e, "store error refreshing an OAuth grant");
                Err(Unavailable)
            }
        }
    }

    /// RFC 7009 revocation of an access or refresh token issued to `client_id`: revokes
    /// its grant (ends the sessions). An unknown or malformed token is not an error.
    pub fn oauth_revoke_token(&self, token: &str, client_id: &str) -> Result<(), oauth::OAuthError> {
        let id = if let Some((id, _)) = oauth::parse_refresh_token(token) {
            id
        } else if let Some(id) = oauth::grant_id_of(token.as_bytes()) {
            id
        } else {
            return Ok(());
        };
        let rec = match self.store.get_app_password(&id) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(()),
            Err(_) => return Err(oauth::OAuthError::Unavailable),
        };
        let Some(grant) = &rec.oauth else { return Ok(()) };
        if grant.client_id != client_id {
            return Err(oauth::OAuthError::InvalidClient);
        }
        // Only the holder of a token of this grant may end it.
        let hash = oauth::token_hash(token);
        let holds = if token.starts_with(oauth::REFRESH_PREFIX) {
            std::iter::once(&grant.refresh_hash)
                .chain(&grant.retired)
                .any(|h| crate::secret::ct_eq(h.as_bytes(), hash.as_bytes()))
        } else {
            // An expired access token still proves it was issued for this grant.
            oauth::check_access_token(&self.key, token.as_bytes(), &rec.username, 0).is_ok()
        };
        if !holds {
            return Ok(());
        }
        match self.store.revoke_app_password(&rec.username, &id) {
            Ok(_) => {
                let ended = self.end_sessions(&rec.username, Some(&id));
                self.audit(
                    &rec.username,
                    "oauth_grant_revoked",
                    format!("{} ({id}) by the app; {ended} session(s) closed", rec.label),
                );
                Ok(())
            }
            Err(StoreError::NotFound(_)) => Ok(()),
            Err(_) => Err(oauth::OAuthError::Unavailable),
        }
    }

    /// Ends every OAuth grant of the account (a new password, two-step verification
    /// turned off): their refresh tokens stop and their sessions end. Returns how many.
    fn end_oauth_grants(&self, email: &str) -> usize {
        let Ok(recs) = self.store.list_app_passwords(email) else { return 0 };
        let mut ended = 0;
        for rec in recs.into_iter().filter(|r| r.oauth.is_some()) {
            if self.store.revoke_app_password(email, &rec.id).is_ok() {
                self.end_sessions(email, Some(&rec.id));
                ended += 1;
            }
        }
        if ended > 0 {
            self.audit(
                email,
                "oauth_grants_ended",
                format!("{ended} app(s) signed in through the browser must sign in again"),
            );
        }
        ended
    }

    /// Devices that still send the account password of a 2FA account (refused), newest
    /// first, at most 10: (description, last time).
    pub fn stale_devices(&self, email: &str) -> Result<Vec<(String, u64)>, AccountError> {
        let mut stale: Vec<(String, u64)> = Vec::new();
        for ev in self.store.recent_audit(email, 500)? {
            if ev.kind == "account_password_refused_2fa" && !stale.iter().any(|(d, _)| *d == ev.detail) {
                stale.push((ev.detail, ev.at));
            }
        }
        stale.truncate(10);
        Ok(stale)
    }
}

/// An app password's limits in words (`""` without any): `, expires 2027-01-31 00:00:00
/// UTC, only from 192.0.2.0/24`.
pub fn limits_text(rec: &AppPasswordRecord) -> String {
    let mut out = String::new();
    if let Some(at) = rec.expires_at {
        out.push_str(&format!(", expires {}", fmt_time(at)));
    }
    if !rec.allow.is_empty() {
        let nets: Vec<String> = rec.allow.iter().map(|n| n.to_string()).collect();
        out.push_str(&format!(", only from {}", nets.join(", ")));
    }
    if let Some(n) = &rec.narrow {
        out.push_str(&n.words());
    }
    out
}

/// Everything that can sign in to an account, for the device list (`mailgate devices`,
/// the web page).
#[derive(Debug, Clone)]
pub struct Devices {
    /// App passwords and apps signed in through the browser (OAuth grants), oldest first.
    pub signed_in: Vec<Device>,
    /// Mail apps still sending the account password, grouped by address and client
    /// name, newest first.
    pub account_password: Vec<PasswordDevice>,
}

/// An app password or OAuth grant.
#[derive(Debug, Clone)]
pub struct Device {
    /// The record.
    pub record: AppPasswordRecord,
    /// Unused (or never used) for longer than `[accounts] stale_device_days`.
    pub stale: bool,
    /// The last refusal of its right value, if any (expired, outside its networks).
    pub last_refusal: Option<(u64, String)>,
}

/// A mail app that used (or tried) the account password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordDevice {
    /// Client address.
    pub ip: String,
    /// Client name from IMAP `ID`, if sent.
    pub client: Option<String>,
    /// Protocols seen, in the order first seen (`IMAP`, `SMTP`).
    pub protocols: Vec<String>,
    /// When last seen (unix seconds).
    pub last_seen: u64,
    /// Refused (the account has two-step verification, or `[policy]` requires it).
    pub refused: bool,
}

/// Reads the `who` part of a login audit event: `192.0.2.1 via IMAP (Thunderbird 128)`.
fn parse_who(detail: &str) -> Option<(String, String, Option<String>)> {
    let (ip, rest) = detail.split_once(" via ")?;
    let (protocol, rest) = rest.split_once(' ').map_or((rest, ""), |(p, r)| (p, r));
    let client = rest.strip_prefix('(').and_then(|r| {
        // The client name may itself hold parentheses: take up to the last ')' before
        // " with the account password", if any.
        let end = r.find(") with ").or_else(|| r.rfind(')'))?;
        Some(r[..end].to_string())
    });
    Some((ip.to_string(), protocol.to_string(), client))
}

impl AccountService {
    /// The account's devices (see [`Devices`]), from its records and its 500 most recent
    /// audit events. `stale_after`: seconds without use after which a device is stale.
    pub fn devices(&self, email: &str, stale_after: u64) -> Result<Devices, AccountError> {
        let account = self.account(email)?;
        let now = self.now();
        let events = self.store.recent_audit(&account.username, 500)?;
        let signed_in = self
            .store
            .list_app_passwords(&account.username)?
            .into_iter()
            .map(|record| {
                let last = record.last_used.as_ref().map_or(record.created_at, |u| u.at);
                let tag = format!("({})", record.id);
                let last_refusal = events
                    .iter()
                    .find(|e| e.kind == "app_password_refused" && e.detail.contains(&tag))
                    .map(|e| (e.at, e.detail.rsplit_once(": ").map_or(e.detail.clone(), |(_, why)| why.to_string())));
                Device { stale: last.saturating_add(stale_after) < now, last_refusal, record }
            })
            .collect();
        let second_factor = account.has_second_factor();
        let mut account_password: Vec<PasswordDevice> = Vec::new();
        for e in &events {
            let refused = match e.kind.as_str() {
                "account_password_refused_2fa" => true,
                // Before two-step verification, the account password's own logins; after
                // it, those are history (the refusals above are what matters).
                "login" if !second_factor && e.detail.contains("with the account password") => false,
                _ => continue,
            };
            let Some((ip, protocol, client)) = parse_who(&e.detail) else { continue };
            let full = account_password.len() >= 20;
            match account_password.iter_mut().find(|d| d.ip == ip && d.client == client) {
                Some(d) if !d.protocols.contains(&protocol) => d.protocols.push(protocol),
                Some(_) => {}
                None if !full => {
                    account_password.push(PasswordDevice {
                        ip,
                        client,
                        protocols: vec![protocol],
                        last_seen: e.at,
                        refused,
                    });
                }
                None => {}
            }
        }
        Ok(Devices { signed_in, account_password })
    }
}

/// A base32 TOTP secret's bytes.
fn decode_base32(b32: &str) -> Result<Secret<Vec<u8>>, AccountError> {
    totp_rs::Secret::try_from_base32(b32)
        .map(|s| Secret::new(s.as_bytes().to_vec()))
        .map_err(|_| AccountError::BadSecret)
}

// ----------------------------------------------------------------------------------
// Checks and wording shared by the CLI, the web step and the import

/// Checks and normalises an e-mail address (an account, an alias, an imported user).
pub fn check_email(raw: &str) -> Result<String, AccountError> {
    let e = auth::normalize_username(raw);
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == ':');
    if ok { Ok(e) } else { Err(AccountError::BadEmail(raw.to_string())) }
}

/// Formats unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_time(t: u64) -> String {
    let secs = t % 86_400;
    let (y, m, d) = civil(t);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Year, month, day (UTC) of unix seconds `t` (Howard Hinnant's civil-from-days).
pub(crate) fn civil(t: u64) -> (i64, i64, i64) {
    let z = (t / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// An app password's last use as people read it: `2026-01-02 03:04:05 UTC from 192.0.2.7
/// (Thunderbird)`, or `never`.
pub fn last_used_text(last: Option<&LastUse>) -> String {
    match last {
        Some(u) => format!(
            "{} from {}{}",
            fmt_time(u.at),
            u.ip,
            u.client.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
        ),
        None => "never".into(),
    }
}

/// An app password's last use over each protocol it was used with, as people read it:
/// `IMAP 2026-01-02 03:04:05 UTC from 192.0.2.7 (Thunderbird); SMTP …`. A record from
/// before uses were kept per protocol shows its one last use; an unused one `never`.
pub fn last_uses_text(rec: &AppPasswordRecord) -> String {
    if rec.last_used_by.is_empty() {
        return last_used_text(rec.last_used.as_ref());
    }
    let uses: Vec<String> =
        rec.last_used_by.iter().map(|(p, u)| format!("{} {}", p.label(), last_used_text(Some(u)))).collect();
    uses.join("; ")
}

/// The longest app-password label, in characters.
pub const MAX_LABEL_CHARS: usize = 64;

/// A character, shown as `U+XXXX` (an error message must not contain the character it
/// refuses: a bidi control in it would reorder the message itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodePoint(pub char);

impl std::fmt::Display for CodePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "U+{:04X}", u32::from(self.0))
    }
}

/// Why an app-password label is refused ([`check_label`]). Labels are shown to the account
/// owner (web page, `app-password list`, audit events) to tell devices apart before one is
/// revoked, so a label must look like what it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Empty, or white space only.
    #[error("the label must not be empty")]
    Empty,
    /// More than [`MAX_LABEL_CHARS`] characters.
    #[error("the label must be at most {MAX_LABEL_CHARS} characters")]
    TooLong,
    /// A control character (Unicode category Cc: tab, newline, escape, ...): it breaks the
    /// tab-separated list and can drive a terminal.
    #[error("the label contains {0}, a control character; leave it out")]
    Control(CodePoint),
    /// A bidirectional text control: it reorders what follows, so that "U+202E gnp.exe"
    /// shows as "exe.png".
    #[error(
        "the label contains {0}, a bidirectional text control, which can make a label show as something it is not \
         (\"exe.png\" for \"gnp.exe\"); leave it out"
    )]
    Bidi(CodePoint),
    /// Another invisible character (category Cf: zero-width space and joiners, soft
    /// hyphen, byte order mark, ...; or a line or paragraph separator, Zl/Zp): two labels
    /// that look the same could differ.
    #[error("the label contains {0}, an invisible formatting character; leave it out")]
    Invisible(CodePoint),
}

/// Checks an app-password label, for the CLI and the web step alike; returns it without
/// surrounding white space. 1 to [`MAX_LABEL_CHARS`] characters, none of them a control
/// character (Cc), a bidirectional text control (U+202A–U+202E, U+2066–U+2069, U+200E,
/// U+200F, U+061C) or another invisible one (Cf, Zl, Zp). General categories come from the
/// `unicode-properties` tables.
pub fn check_label(label: &str) -> Result<&str, LabelError> {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    let label = label.trim();
    if label.is_empty() {
        return Err(LabelError::Empty);
    }
    for c in label.chars() {
        // Every bidi control is also Cf: named first, for the clearer message.
        if matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}') {
            return Err(LabelError::Bidi(CodePoint(c)));
        }
        match c.general_category() {
            GeneralCategory::Control => return Err(LabelError::Control(CodePoint(c))),
            GeneralCategory::Format | GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => {
                return Err(LabelError::Invisible(CodePoint(c)));
            }
            _ => {}
        }
    }
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(LabelError::TooLong);
    }
    Ok(label)
}

#[cfg(test)]
mod tests;
