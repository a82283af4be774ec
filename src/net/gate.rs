//! The one login gate: every protocol's login goes through [`Gate::login`].
//!
//! Credentials, the client and the protocol go in; out comes either the verified login
//! ([`Authenticated`]) with its upstream session open and its place in the live-session
//! registry, or a [`Refusal`] that each protocol words in its own syntax. The check
//! itself is `auth`'s; the gate adds what needs I/O — with `password_check = "upstream"`
//! the upstream server's word (for an account without a second factor, the user's own
//! upstream login is both the check and the session) — and applies the waits, the
//! login line (`auth::login_log`) and the per-address session cap the same way for every protocol. What
//! differs between protocols is data: the [`Upstream`] implementation they pass.

use crate::auth::login_log::{Line, Method, Outcome};
use crate::auth::{self, Authenticated, Authenticator, CheckResult, Peer, Protocol, UpstreamCheck, Verdict};
use crate::live::{LiveGuard, LiveSessions};
use crate::metrics::UpstreamResult;
use crate::net::driver::{Conn, DriveError};
use crate::net::stream::Transport;
use crate::net::upstream::UpstreamFailure;
use crate::proto::Machine;
use crate::proto::sasl::Credentials;
use crate::secret::SecretBytes;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Opens the upstream session of a login; one implementation per protocol.
pub trait Upstream: Send + Sync {
    /// An open, logged-in upstream session.
    type Connection: Send;
    /// Logs in upstream as the verified user (master login or XCLIENT).
    fn open(
        &self,
        who: &Authenticated,
        origin: &Origin<'_>,
    ) -> impl Future<Output = Result<Self::Connection, UpstreamFailure>> + Send;
    /// Logs in upstream as the user with the password the client sent
    /// (`password_check = "upstream"`, an account without a second factor).
    fn open_as_user(
        &self,
        check: &UpstreamCheck,
        origin: &Origin<'_>,
    ) -> impl Future<Output = Result<Self::Connection, UpstreamFailure>> + Send;
    /// Whether this protocol's own upstream login can check account passwords (else the
    /// upstream IMAP server checks them and the session is a master login).
    fn checks_passwords(&self) -> bool;
}

/// A protocol's pre-auth machine as [`Gate::front_login`] drives it.
pub trait LoginMachine: Machine {
    /// How the protocol answers a failed login.
    type Reply;
    /// An event of the machine: credentials to check, or a refusal it made before any
    /// check (malformed SASL, a cancel, a foreign authzid).
    fn login_event(event: Self::Event) -> Result<Credentials, Self::Reply>;
    /// The protocol's words for the gate's refusal.
    fn reply_for(refusal: Refusal) -> Self::Reply;
    /// Answers the client's failed login.
    fn auth_failed(&mut self, reply: Self::Reply);
    /// The client's `ID` fields passed on to upstream (IMAP only).
    fn client_id(&self) -> &[(String, String)] {
        &[]
    }
    /// The client's own name for the owner's log of logins (IMAP `ID`).
    fn client_name(&self) -> Option<&str> {
        None
    }
}

/// [`LoginMachine`] for `crate::proto::<module>::PreAuth`, whose `Action` is
/// `Authenticate(Credentials) | Refuse(AuthReply)` and whose `AuthReply` has `Failed`,
/// `NeedsAppPassword(String)`, `Unavailable` and `TooMany`; further items (e.g. IMAP's
/// `client_id`) go in the braces.
macro_rules! login_machine {
    ($module:ident { $($extra:item)* }) => {
        impl crate::net::gate::LoginMachine for crate::proto::$module::PreAuth {
            type Reply = crate::proto::$module::AuthReply;
            fn login_event(
                event: crate::proto::$module::Action,
            ) -> Result<crate::proto::sasl::Credentials, Self::Reply> {
                match event {
                    crate::proto::$module::Action::Authenticate(creds) => Ok(creds),
                    crate::proto::$module::Action::Refuse(reply) => Err(reply),
                }
            }
            fn reply_for(refusal: crate::net::gate::Refusal) -> Self::Reply {
                use crate::net::gate::Refusal;
                match refusal {
                    Refusal::Failed | Refusal::Gone => Self::Reply::Failed,
                    Refusal::NeedsAppPassword(text) => Self::Reply::NeedsAppPassword(text),
                    Refusal::Unavailable => Self::Reply::Unavailable,
                    Refusal::TooMany => Self::Reply::TooMany,
                }
            }
            fn auth_failed(&mut self, reply: Self::Reply) {
                crate::proto::$module::PreAuth::auth_failed(self, reply)
            }
            $($extra)*
        }
    };
}
pub(crate) use login_machine;

/// Why a login was refused; each protocol words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong credentials, unknown user, or anything else that is one answer for all.
    Failed,
    /// The right account password of an account with a second factor: these words tell
    /// the person where to make an app password.
    NeedsAppPassword(String),
    /// The check or the upstream login could not run; try later.
    Unavailable,
    /// The account has too many live sessions from this address.
    TooMany,
    /// The client left while its check waited; nothing to answer.
    Gone,
}

/// A login that passed the gate.
pub struct Admitted<S> {
    /// The proof.
    pub who: Authenticated,
    /// Its upstream session.
    pub upstream: S,
    /// Its place in the live-session registry (ends it on revocation).
    pub live: LiveGuard,
    /// The password the session logged in upstream with, when it is the user's own
    /// (`password_check = "upstream"`): a reconnect needs it again.
    pub own_password: Option<SecretBytes>,
}

/// Where a login comes from, as upstream is told.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The client's address.
    pub client: SocketAddr,
    /// The mailgate address it connected to.
    pub local: SocketAddr,
    /// The client's own `ID` fields (IMAP), passed on to upstream.
    pub id: &'a [(String, String)],
}

/// Who is logging in, from where.
pub struct Attempt<'a> {
    /// What the client sent.
    pub creds: &'a Credentials,
    /// The protocol.
    pub protocol: Protocol,
    /// Where from.
    pub origin: Origin<'a>,
    /// The client's name (IMAP `ID`), for the owner's log of logins.
    pub client_name: Option<String>,
}

/// The login gate shared by every protocol.
#[derive(Clone)]
pub struct Gate {
    auth: Authenticator,
    live: LiveSessions,
    /// Where the person makes an app password (in the 2FA refusal).
    app_password_url: String,
    /// Live sessions per account and client address.
    max_per_address: usize,
}

impl Gate {
    /// A gate over `auth`'s checks, registering sessions in `sessions`.
    pub fn new(auth: Authenticator, sessions: LiveSessions, app_password_url: String, max_per_address: usize) -> Gate {
        Gate { auth, live: sessions, app_password_url, max_per_address }
    }

    /// The credential checks.
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The live-session registry.
    pub fn live(&self) -> &LiveSessions {
        &self.live
    }

    /// Waits before answering an exchange that failed before any check (malformed SASL,
    /// a cancel): a refusal costs the same time whatever its cause.
    pub async fn refused_early(&self) {
        tokio::time::sleep(self.auth.base_delay()).await;
    }

    /// The pre-auth part of a client connection (IMAP, POP3, ManageSieve): runs `machine`
    /// on `conn` until a login passes the gate, answering each refusal in the protocol's
    /// words (an exchange that failed before any check waits as a refusal does). `None`:
    /// the client left while its check waited.
    pub async fn front_login<M: LoginMachine, U: Upstream, S: Transport>(
        &self,
        conn: &mut Conn<S>,
        machine: &mut M,
        upstream: &U,
        protocol: Protocol,
        origin: (SocketAddr, SocketAddr),
    ) -> Result<Option<Admitted<U::Connection>>, DriveError> {
        loop {
            match M::login_event(conn.next(machine).await?) {
                Err(reply) => {
                    self.refused_early().await;
                    machine.auth_failed(reply);
                }
                Ok(creds) => {
                    let attempt = Attempt {
                        creds: &creds,
                        protocol,
                        origin: Origin { client: origin.0, local: origin.1, id: machine.client_id() },
                        client_name: machine.client_name().map(str::to_string),
                    };
                    match self.login(upstream, attempt, conn.peer_gone()).await {
                        Ok(admitted) => return Ok(Some(admitted)),
                        Err(Refusal::Gone) => return Ok(None),
                        Err(refusal) => machine.auth_failed(M::reply_for(refusal)),
                    }
                }
            }
        }
    }

    /// Decides one login and writes its line (`auth::login_log`: one per checked
    /// attempt, floods aggregated). `gone` resolves if the client leaves: a check still
    /// waiting for a hashing thread is then dropped before it runs.
    pub async fn login<U: Upstream>(
        &self,
        upstream: &U,
        attempt: Attempt<'_>,
        gone: impl Future<Output = ()>,
    ) -> Result<Admitted<U::Connection>, Refusal> {
        let started = Instant::now();
        let Attempt { creds, protocol, origin, client_name } = attempt;
        let client = origin.client;
        let decided = self.decide(upstream, creds, protocol, &origin, client_name, gone).await;
        let (outcome, method, app_password) = match &decided {
            Ok(admitted) => {
                let id = admitted.who.app_password_id().map(str::to_string);
                let method = match creds.mechanism {
                    crate::proto::sasl::Mechanism::Bearer => Method::OAuth,
                    _ if id.is_some() => Method::AppPassword,
                    _ => Method::AccountPassword,
                };
                (Outcome::Ok, method, id)
            }
            Err((_, outcome)) => {
                let password = creds.password.expose();
                let id = match outcome {
                    Outcome::Wrong if creds.mechanism == crate::proto::sasl::Mechanism::Password => {
                        self.auth.app_password_id_of(&creds.username, password)
                    }
                    _ => None,
                };
                (*outcome, Method::of_credentials(creds), id)
            }
        };
        // The failure delay is counted (and the failure recorded) before the line, and
        // waited after it, so the line's duration is the check's and a client that
        // leaves during the wait still has its line.
        let wait = match outcome {
            Outcome::Wrong => {
                let username = auth::normalize_username(&creds.username);
                self.auth.failure_delay(client.ip(), &username, creds.password.expose())
            }
            Outcome::NeedsAppPassword => self.auth.base_delay(),
            _ => Duration::ZERO,
        };
        let client_id = client_id(origin.id);
        self.auth.log_login(&Line {
            result: outcome,
            protocol: protocol.scope().as_str(),
            client: client.ip(),
            user: &creds.username,
            method,
            app_password: app_password.as_deref(),
            client_id: client_id.as_deref(),
            duration: started.elapsed(),
        });
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        decided.map_err(|(refusal, _)| refusal)
    }

    /// The decision on one login, with the result for its line; no waits.
    async fn decide<U: Upstream>(
        &self,
        upstream: &U,
        creds: &Credentials,
        protocol: Protocol,
        origin: &Origin<'_>,
        client_name: Option<String>,
        gone: impl Future<Output = ()>,
    ) -> Result<Admitted<U::Connection>, (Refusal, Outcome)> {
        let client = origin.client;
        let who = Peer { ip: client.ip(), client_name };
        let verdict = tokio::select! {
            v = self.auth.verify(creds, protocol, &who) => v,
            () = gone => {
                debug!(peer = %client, "client left during its login check");
                return Err((Refusal::Gone, Outcome::Gone));
            }
        };
        let (verdict, opened) = match verdict {
            Verdict::CheckUpstream(check) => self.ask_upstream(upstream, check, origin, protocol).await,
            v => (v, None),
        };
        match verdict {
            Verdict::Granted(granted) => self.admit(upstream, granted, opened, origin, protocol).await,
            Verdict::Denied => Err((Refusal::Failed, Outcome::Wrong)),
            Verdict::NeedsAppPassword => Err((
                Refusal::NeedsAppPassword(auth::app_password_hint(&self.app_password_url)),
                Outcome::NeedsAppPassword,
            )),
            Verdict::Throttled => Err((Refusal::Unavailable, Outcome::Throttled)),
            Verdict::Unavailable | Verdict::CheckUpstream(_) => Err((Refusal::Unavailable, Outcome::Unavailable)),
        }
    }

    /// `password_check = "upstream"`: the upstream server's word on the account password.
    /// Without a second factor, and where this protocol's upstream can check it, the
    /// user's own upstream login is the check and becomes the session.
    async fn ask_upstream<U: Upstream>(
        &self,
        upstream: &U,
        check: UpstreamCheck,
        origin: &Origin<'_>,
        protocol: Protocol,
    ) -> (Verdict, Option<(U::Connection, SecretBytes)>) {
        let client = origin.client;
        let metrics = self.auth.metrics();
        let label = protocol.scope().as_str();
        let started = Instant::now();
        if check.second_factor() || !upstream.checks_passwords() {
            // Counted by `check_upstream` (the upstream IMAP server's check, unless cached).
            let result = self.auth.check_upstream(check.username(), check.password()).await;
            return (self.auth.confirm_upstream(check, result).await, None);
        }
        match upstream.open_as_user(&check, origin).await {
            Ok(session) => {
                metrics.upstream_login(label, UpstreamResult::Ok, started.elapsed());
                let password = SecretBytes::from(check.password().expose().clone());
                (self.auth.confirm_upstream(check, CheckResult::Valid).await, Some((session, password)))
            }
            Err(e) if e.is_refusal() => {
                metrics.upstream_login(label, UpstreamResult::Refused, started.elapsed());
                (self.auth.confirm_upstream(check, CheckResult::Invalid).await, None)
            }
            Err(e) => {
                metrics.upstream_login(label, UpstreamResult::Failed, started.elapsed());
                warn!(peer = %client, user = %check.username(), error = %e, "upstream login failed");
                (Verdict::Unavailable, None)
            }
        }
    }

    /// A granted login: its place among the live sessions, then its upstream session.
    async fn admit<U: Upstream>(
        &self,
        upstream: &U,
        who: Authenticated,
        opened: Option<(U::Connection, SecretBytes)>,
        origin: &Origin<'_>,
        protocol: Protocol,
    ) -> Result<Admitted<U::Connection>, (Refusal, Outcome)> {
        let client = origin.client;
        let Some(live) = self.live.register_from(&who, client.ip(), self.max_per_address) else {
            return Err((Refusal::TooMany, Outcome::TooMany));
        };
        let metrics = self.auth.metrics();
        let label = protocol.scope().as_str();
        let (session, own_password) = match opened {
            Some((session, password)) => (session, Some(password)),
            None => {
                let started = Instant::now();
                match upstream.open(&who, origin).await {
                    Ok(session) => {
                        metrics.upstream_login(label, UpstreamResult::Ok, started.elapsed());
                        (session, None)
                    }
                    Err(e) => {
                        metrics.upstream_login(label, UpstreamResult::Failed, started.elapsed());
                        warn!(peer = %client, user = %who.username(), %protocol, error = %e, "upstream login failed");
                        return Err((Refusal::Unavailable, Outcome::Unavailable));
                    }
                }
            }
        };
        live.count(metrics.session(label));
        self.auth.succeeded(client.ip(), who.username());
        Ok(Admitted { who, upstream: session, live, own_password })
    }
}

/// The client's own name for the login line: IMAP `ID`'s name, with its version when it
/// sent one (`Thunderbird 128.3`). The fields are printable ASCII already (`proto::imap`).
fn client_id(id: &[(String, String)]) -> Option<String> {
    let field = |key: &str| id.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let name = field("name")?;
    Some(match field("version") {
        Some(version) => format!("{name} {version}"),
        None => name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::client_id;

    #[test]
    fn the_client_id_is_the_id_name_and_version() {
        let id = |fields: &[(&str, &str)]| -> Vec<(String, String)> {
            fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(
            client_id(&id(&[("name", "Thunderbird"), ("version", "128.3")])).as_deref(),
            Some("Thunderbird 128.3")
        );
        assert_eq!(client_id(&id(&[("version", "1"), ("name", "K-9 Mail")])).as_deref(), Some("K-9 Mail 1"));
        assert_eq!(client_id(&id(&[("name", "mutt")])).as_deref(), Some("mutt"));
        assert_eq!(client_id(&id(&[("version", "1")])), None);
        assert_eq!(client_id(&[]), None);
    }
}
