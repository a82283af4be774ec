//! The account service: checks, atomic changes and their side effects.

use super::*;
use crate::auth::clock::FakeClock;
use crate::store::sled_store::SledStore;

// ---------------------------------------------------------------------------------------
// Labels, addresses, wording

/// Issue 13 item 12: labels that do not look like what they are are refused, each
/// with a message naming the character by its code point.
#[test]
fn labels_with_bidi_invisible_or_control_characters_are_refused() {
    for (label, want) in [
        ("\u{202E}gnp.exe", LabelError::Bidi(CodePoint('\u{202E}'))),
        ("Phone \u{202A}x", LabelError::Bidi(CodePoint('\u{202A}'))),
        ("a\u{202B}b", LabelError::Bidi(CodePoint('\u{202B}'))),
        ("a\u{202C}b", LabelError::Bidi(CodePoint('\u{202C}'))),
        ("a\u{202D}b", LabelError::Bidi(CodePoint('\u{202D}'))),
        ("a\u{2066}b", LabelError::Bidi(CodePoint('\u{2066}'))),
        ("a\u{2067}b", LabelError::Bidi(CodePoint('\u{2067}'))),
        ("a\u{2068}b", LabelError::Bidi(CodePoint('\u{2068}'))),
        ("a\u{2069}b", LabelError::Bidi(CodePoint('\u{2069}'))),
        ("a\u{200E}b", LabelError::Bidi(CodePoint('\u{200E}'))),
        ("a\u{200F}b", LabelError::Bidi(CodePoint('\u{200F}'))),
        ("a\u{061C}b", LabelError::Bidi(CodePoint('\u{061C}'))),
        ("Lap\u{200B}top", LabelError::Invisible(CodePoint('\u{200B}'))),
        ("Lap\u{200C}top", LabelError::Invisible(CodePoint('\u{200C}'))),
        ("Lap\u{200D}top", LabelError::Invisible(CodePoint('\u{200D}'))),
        ("\u{FEFF}Laptop", LabelError::Invisible(CodePoint('\u{FEFF}'))),
        ("Lap\u{2060}top", LabelError::Invisible(CodePoint('\u{2060}'))),
        ("Lap\u{2064}top", LabelError::Invisible(CodePoint('\u{2064}'))),
        ("Lap\u{00AD}top", LabelError::Invisible(CodePoint('\u{00AD}'))),
        ("Lap\u{E0041}top", LabelError::Invisible(CodePoint('\u{E0041}'))),
        ("Lap\u{2028}top", LabelError::Invisible(CodePoint('\u{2028}'))),
        ("Lap\ttop", LabelError::Control(CodePoint('\t'))),
        ("Lap\ntop", LabelError::Control(CodePoint('\n'))),
        ("Lap\u{1B}[31mtop", LabelError::Control(CodePoint('\u{1B}'))),
        ("Lap\u{0}top", LabelError::Control(CodePoint('\u{0}'))),
        ("Lap\u{7F}top", LabelError::Control(CodePoint('\u{7F}'))),
        ("Lap\u{85}top", LabelError::Control(CodePoint('\u{85}'))),
        ("", LabelError::Empty),
        (" \t ", LabelError::Empty),
        (&"x".repeat(MAX_LABEL_CHARS + 1), LabelError::TooLong),
    ] {
        assert_eq!(check_label(label), Err(want.clone()), "{label:?}");
    }
    let e = check_label("\u{202E}gnp.exe").unwrap_err().to_string();
    assert!(e.contains("U+202E") && e.contains("bidirectional text control"), "{e}");
    assert!(!e.contains('\u{202E}'), "the message carries the character itself: {e:?}");
    assert!(check_label("a\u{200B}b").unwrap_err().to_string().contains("U+200B, an invisible"));
    assert!(check_label("a\u{7}b").unwrap_err().to_string().contains("U+0007, a control character"));
}

#[test]
fn ordinary_labels_in_any_script_are_accepted_and_trimmed() {
    for (label, want) in [
        ("Thunderbird laptop", "Thunderbird laptop"),
        ("  Phone  ", "Phone"),
        ("Téléphone de Zoë", "Téléphone de Zoë"),
        ("هاتف", "هاتف"),
        ("עבודה", "עבודה"),
        ("携帯電話", "携帯電話"),
        ("Ноутбук", "Ноутбук"),
        ("iPad 📱", "iPad 📱"),
        ("👩\u{1F3FD}", "👩\u{1F3FD}"),
    ] {
        assert_eq!(check_label(label), Ok(want), "{label:?}");
    }
    assert!(check_label(&"é".repeat(MAX_LABEL_CHARS)).is_ok(), "the limit counts characters, not bytes");
}

#[test]
fn addresses_are_normalised_or_refused() {
    assert_eq!(check_email(" Alice@Example.COM ").unwrap(), "alice@example.com");
    for bad in ["alice", "@x", "a@", "a@b@c", "a b@x", "a\"b@x", "a:b@x"] {
        let e = check_email(bad).unwrap_err();
        assert_eq!(e.to_string(), format!("`{bad}` is not an e-mail address"));
    }
}

/// The one "last used" text, for the CLI's list and the web's account page.
#[test]
fn last_use_reads_time_address_and_client() {
    assert_eq!(last_used_text(None), "never");
    let u = LastUse { at: 1_800_000_010, ip: "192.0.2.7".into(), client: Some("Thunderbird".into()), protocol: None };
    assert_eq!(last_used_text(Some(&u)), format!("{} from 192.0.2.7 (Thunderbird)", fmt_time(1_800_000_010)));
    let u = LastUse { client: None, ..u };
    assert_eq!(last_used_text(Some(&u)), format!("{} from 192.0.2.7", fmt_time(1_800_000_010)));
    assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
    // Per protocol, in the order of the scopes; an older record shows its one last use.
    let mut rec = crate::store::conformance::app("id1", "a@x", "Phone");
    assert_eq!(last_uses_text(&rec), "never");
    rec.last_used = Some(u.clone());
    assert_eq!(last_uses_text(&rec), last_used_text(Some(&u)));
    let pop = LastUse { at: 1_800_000_020, protocol: Some(Scope::Pop3), ..u.clone() };
    rec.last_used_by.insert(Scope::Pop3, pop);
    rec.last_used_by.insert(Scope::Imap, LastUse { protocol: Some(Scope::Imap), ..u.clone() });
    assert_eq!(
        last_uses_text(&rec),
        format!("IMAP {} from 192.0.2.7; POP3 {} from 192.0.2.7", fmt_time(1_800_000_010), fmt_time(1_800_000_020))
    );
    assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
}

// ---------------------------------------------------------------------------------------
// The service

const T0: u64 = 1_800_000_010;
const ALICE: &str = "alice@example.test";

struct Env {
    store: Arc<dyn Store>,
    key: Arc<SecretKey>,
    clock: FakeClock,
    live: LiveSessions,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env {
            store: Arc::new(SledStore::open(dir.path()).unwrap()),
            key: Arc::new(SecretKey::from_bytes(&[7; 32]).unwrap()),
            clock: FakeClock::at(T0),
            live: LiveSessions::default(),
            _dir: dir,
        }
    }

    fn service(&self, actor: Actor) -> AccountService {
        AccountService::new(self.store.clone(), self.key.clone(), "mail.example.test", actor)
            .with_live(self.live.clone())
            .with_clock(Arc::new(self.clock.clone()))
    }

    fn account(&self) -> Account {
        self.store.get_account(ALICE).unwrap().unwrap()
    }

    fn audit_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.store.recent_audit(ALICE, 100).unwrap().into_iter().map(|e| e.kind).collect();
        kinds.reverse();
        kinds
    }
}

/// The TOTP code of a raw secret at `t`.
fn code(secret: &[u8], t: u64) -> String {
    totp_rs::Builder::new().with_secret(secret.to_vec()).build_noncompliant().generate(t).to_string()
}

const B32: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

fn raw_secret() -> Vec<u8> {
    totp_rs::Secret::try_from_base32(B32).unwrap().as_bytes().to_vec()
}

/// Moved from `auth::totp` (its `enrol` is the service's `enable_totp` now): a new secret
/// or an imported base32 one, sealed for the account, its URI shown once.
#[test]
fn enable_generates_and_imports_a_secret() {
    let env = Env::new();
    let svc = env.service(Actor::Admin);
    svc.create(ALICE, &[], None).unwrap();
    let on = svc.enable_totp(ALICE, None).unwrap();
    assert!(on.uri.unwrap().expose().starts_with("otpauth://totp/mail.example.test:alice%40example.test?"));
    assert!(!on.replaced);
    assert_eq!(on.backup_codes.len(), backup_codes::COUNT);
    let on = svc.enable_totp(ALICE, Some("jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp")).unwrap();
    assert!(on.uri.unwrap().expose().contains("secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"));
    assert!(on.replaced);
    let a = env.account();
    assert_eq!(env.key.open(&a.totp.unwrap().secret_enc, ALICE).unwrap().expose().len(), 20);
    assert!(matches!(svc.enable_totp(ALICE, Some("not base32!")), Err(AccountError::BadSecret)));
    assert!(matches!(svc.enable_totp(ALICE, Some("JBSWY3DPEHPK3PXP")), Err(AccountError::Totp(_))), "80 bits");
}

/// A refused change writes nothing and records nothing.
#[test]
fn a_refused_change_writes_nothing() {
    let env = Env::new();
    let svc = env.service(Actor::Web);
    svc.create(ALICE, &[], None).unwrap();
    let before = env.account().updated_at;
    env.clock.advance(100);
    assert!(matches!(svc.set_password(ALICE, "h".into(), true), Err(AccountError::NoLocalPassword(_))));
    assert!(matches!(svc.regenerate_backup_codes(ALICE), Err(AccountError::SecondFactorOff(_))));
    assert!(matches!(svc.accept_totp_code(ALICE, "123456"), Err(AccountError::SecondFactorOff(_))));
    let a = env.account();
    assert!(a.password_hash.is_none() && a.backup_codes.is_none());
    assert_eq!(a.updated_at, before);
    assert_eq!(env.audit_kinds(), ["account_created"]);
    assert!(matches!(svc.set_password("nobody@x", "h".into(), false), Err(AccountError::UnknownUser(_))));
    assert_eq!(svc.set_password("nobody@x", "h".into(), false).unwrap_err().to_string(), "unknown user nobody@x");
}

/// The web's confirmation turns TOTP on once: a second confirmation (another tab) is
/// refused instead of replacing the secret and the backup codes just shown.
#[test]
fn confirming_an_enrolment_twice_is_refused() {
    let env = Env::new();
    let svc = env.service(Actor::Web);
    svc.create(ALICE, &[], Some("h".into())).unwrap();
    let b32 = SecretString::from(B32.to_string());
    let near: Vec<String> = (0..5).map(|k| code(&raw_secret(), T0 + k * 30 - 60)).collect();
    let wrong = (0..1000).map(|n| format!("{n:06}")).find(|c| !near.contains(c)).unwrap();
    assert!(matches!(svc.confirm_totp(ALICE, &b32, &wrong), Err(AccountError::WrongCode)));
    assert!(env.account().totp.is_none(), "a wrong code turns nothing on");
    let on = svc.confirm_totp(ALICE, &b32, &code(&raw_secret(), T0)).unwrap();
    assert!(on.uri.is_none());
    let first = env.account().backup_codes.unwrap().hashes;
    let again = svc.confirm_totp(ALICE, &b32, &code(&raw_secret(), T0 + 30));
    assert!(matches!(again, Err(AccountError::SecondFactorOn(_))), "{:?}", again.err());
    assert_eq!(env.account().backup_codes.unwrap().hashes, first);
    // The confirming code's step counts as used.
    assert!(matches!(svc.accept_totp_code(ALICE, &code(&raw_secret(), T0)), Err(AccountError::WrongCode)));
    svc.accept_totp_code(ALICE, &code(&raw_secret(), T0 + 30)).unwrap();
}

/// Two revocations of one app password at once: one revokes it (and ends its sessions,
/// and is audited), the other finds nothing.
#[test]
fn concurrent_revocations_revoke_once() {
    let env = Env::new();
    let svc = env.service(Actor::Admin);
    svc.create(ALICE, &[], None).unwrap();
    let made = svc.create_app_password(ALICE, "Phone", vec![]).unwrap();
    let id = made.new.id.clone();
    let _live = env.live.register(ALICE, Some(&id));
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| svc.revoke_app_password(ALICE, &id))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 1, "revoked once");
    assert_eq!(ok[0].1, 1, "its live session ended");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, AccountError::Store(StoreError::NotFound(_))))
    );
    let revoked = env.audit_kinds().iter().filter(|k| *k == "app_password_revoked").count();
    assert_eq!(revoked, 1);
    assert_eq!(env.live.len(), 0);
}

/// One backup code brought by many sign-ins at once is spent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_use_of_one_backup_code_spends_it_once() {
    let env = Env::new();
    let svc = env.service(Actor::Web);
    svc.create(ALICE, &[], Some("h".into())).unwrap();
    let on = svc.enable_totp(ALICE, None).unwrap();
    let typed = on.backup_codes[0].clone();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (svc, typed) = (svc.clone(), typed.clone());
        tasks.push(tokio::spawn(async move { svc.consume_backup_code(ALICE, &typed, [192, 0, 2, 1].into()).await }));
    }
    let mut spent = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(left) => {
                spent += 1;
                assert_eq!(left, backup_codes::COUNT - 1);
            }
            Err(e) => assert!(matches!(e, AccountError::WrongCode), "{e}"),
        }
    }
    assert_eq!(spent, 1);
    assert_eq!(env.account().backup_codes.unwrap().remaining(), backup_codes::COUNT - 1);
    assert_eq!(env.audit_kinds().iter().filter(|k| *k == "backup_code_used").count(), 1);
}

/// One TOTP code sent twice at once lets one in.
#[test]
fn concurrent_submissions_of_one_totp_code_accept_one() {
    let env = Env::new();
    let svc = env.service(Actor::Admin);
    svc.create(ALICE, &[], None).unwrap();
    svc.enable_totp(ALICE, Some(B32)).unwrap();
    let c = code(&raw_secret(), T0);
    let accepted = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| svc.accept_totp_code(ALICE, &c).is_ok())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count()
    });
    assert_eq!(accepted, 1);
}

/// Side effects happen in the service: turning TOTP on and changing the password end the
/// sessions opened with the account password (not those of app passwords); removing the
/// account ends them all.
#[test]
fn changes_end_the_sessions_they_invalidate() {
    let env = Env::new();
    let svc = env.service(Actor::Admin);
    svc.create(ALICE, &[], Some("h".into())).unwrap();
    let made = svc.create_app_password(ALICE, "Phone", vec![Scope::Imap]).unwrap();
    let _app = env.live.register(ALICE, Some(&made.new.id));
    let _pw1 = env.live.register(ALICE, None);
    assert_eq!(svc.set_password(ALICE, "h2".into(), false).unwrap(), 1);
    let _pw2 = env.live.register(ALICE, None);
    assert_eq!(svc.enable_totp(ALICE, None).unwrap().ended, 1);
    assert_eq!(env.live.len(), 1, "the app password's session lives on");
    assert_eq!(svc.remove(ALICE).unwrap(), 1);
    assert_eq!(env.live.len(), 0);
    assert_eq!(env.audit_kinds().last().map(String::as_str), Some("account_removed"));
    assert!(matches!(svc.account(ALICE), Err(AccountError::UnknownUser(_))));
}

/// `user import`: all or none, addresses checked.
#[test]
fn imports_are_all_or_none() {
    let env = Env::new();
    let svc = env.service(Actor::Admin);
    svc.create("b@x.org", &[], None).unwrap();
    let users = |names: &[&str]| names.iter().map(|n| (n.to_string(), "{PLAIN}x".to_string())).collect::<Vec<_>>();
    assert!(matches!(
        svc.import_users(&users(&["a@x.org", "b@x.org"])),
        Err(AccountError::Store(StoreError::Conflict(_)))
    ));
    assert!(matches!(svc.import_users(&users(&["a@x.org", "not an address"])), Err(AccountError::BadEmail(_))));
    assert!(env.store.get_account("a@x.org").unwrap().is_none());
    assert_eq!(svc.import_users(&users(&["A@x.org", "c@x.org"])).unwrap(), 2);
    assert!(env.store.get_account("a@x.org").unwrap().is_some());
}

/// A store export moves to a data_dir whose secret.key is not the exporter's (the file
/// was not copied, so a new one was made): the import is refused, naming what to copy,
/// and imports nothing; with the right key it goes in and the TOTP secret opens.
#[test]
fn a_store_export_sealed_with_another_key_is_refused() {
    let from = Env::new();
    let svc = from.service(Actor::Admin);
    svc.create(ALICE, &[], None).unwrap();
    svc.enable_totp(ALICE, Some(B32)).unwrap();
    svc.create("bob@example.test", &[], None).unwrap();
    let dump = from.store.export().unwrap();

    let mut other = Env::new();
    other.key = Arc::new(SecretKey::from_bytes(&[8; 32]).unwrap());
    let e = other.service(Actor::Admin).import_store(&dump).unwrap_err();
    assert!(matches!(e, AccountError::ForeignKey { accounts: 1, .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(ALICE) && text.contains("secret.key") && text.contains("nothing was imported"), "{text}");
    assert!(other.store.list_accounts().unwrap().is_empty(), "nothing was imported");

    let same = Env::new();
    same.service(Actor::Admin).import_store(&dump).unwrap();
    let a = same.account();
    assert_eq!(same.key.open(&a.totp.unwrap().secret_enc, ALICE).unwrap().expose(), &raw_secret());
    assert_eq!(same.store.list_accounts().unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------
// OAuth grants (issue 16)

mod oauth_grants {
    use super::*;
    use crate::auth::oauth::{Approved, OAuthError, Requester, Tokens};
    use crate::config::{OAuth, OAuthClient};

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    const REDIRECT: &str = "http://localhost:40123";

    fn config() -> OAuth {
        crate::config::Config::from_toml_str("[oauth]\nenabled = true\n", "test").unwrap().oauth
    }

    fn client(id: &str) -> OAuthClient {
        config().client(id).unwrap().clone()
    }

    fn from() -> Requester {
        Requester { ip: [192, 0, 2, 9].into(), user_agent: Some("Thunderbird 153".into()) }
    }

    fn approved() -> Approved {
        Approved {
            client_id: "thunderbird".into(),
            redirect_uri: REDIRECT.into(),
            code_challenge: CHALLENGE.into(),
            scopes: vec![Scope::Imap, Scope::Smtp],
        }
    }

    fn signed_in(env: &Env, svc: &AccountService) -> Tokens {
        let code = svc.oauth_issue_code(ALICE, &approved(), &config()).unwrap();
        let _ = env;
        svc.oauth_redeem_code(code.expose(), &client("thunderbird"), REDIRECT, VERIFIER, &from(), &config()).unwrap()
    }

    fn setup() -> (Env, AccountService) {
        let env = Env::new();
        let svc = env.service(Actor::Web);
        svc.create(ALICE, &[], Some("h".into())).unwrap();
        (env, svc)
    }

    /// A grant is a security notification (the app, its id, the address; no token), queued
    /// through the authenticator's notifier, as the other changes of the service are.
    #[test]
    fn a_grant_and_the_other_changes_queue_security_notifications() {
        let env = Env::new();
        let notifier = crate::notify::Notifier::new(env.store.clone(), crate::config::Notify::default())
            .with_clock(Arc::new(env.clock.clone()));
        let auth = crate::auth::Authenticator::new(env.store.clone(), 1).with_notifier(notifier);
        let svc = env.service(Actor::Web).with_authenticator(auth);
        svc.create(ALICE, &[], Some("h".into())).unwrap();
        let t = signed_in(&env, &svc);
        let made = svc.create_app_password(ALICE, "Phone", vec![]).unwrap();
        svc.set_password(ALICE, "h2".into(), true).unwrap();
        svc.enable_totp(ALICE, None).unwrap();
        svc.regenerate_backup_codes(ALICE).unwrap();
        svc.disable_totp(ALICE).unwrap();
        svc.disable_totp(ALICE).unwrap(); // off already: nothing to tell
        let queued = env.store.claim_notices(T0, 60, 100).unwrap();
        let kinds: Vec<&str> = queued.iter().map(|n| n.kind.as_str()).collect();
        assert_eq!(
            kinds.iter().copied().collect::<std::collections::BTreeSet<_>>(),
            [
                "oauth_grant_created",
                "app_password_created",
                "account_password_changed",
                "totp_enabled",
                "backup_codes_generated",
                "totp_disabled"
            ]
            .into_iter()
            .collect()
        );
        assert_eq!(kinds.len(), 6);
        let grant = queued.iter().find(|n| n.kind == "oauth_grant_created").unwrap();
        let facts: Vec<&str> = grant.facts.iter().map(|(_, v)| v.as_str()).collect();
        assert!(facts.contains(&"Thunderbird") && facts.contains(&"192.0.2.9"), "{facts:?}");
        let all = format!("{queued:?}");
        for secret in
            [t.access_token.expose().as_str(), t.refresh_token.expose().as_str(), made.new.password.expose().as_str()]
        {
            assert!(!all.contains(secret), "a secret in a notice");
        }
    }

    #[test]
    fn a_code_becomes_a_grant_listed_like_an_app_password() {
        let (env, svc) = setup();
        let t = signed_in(&env, &svc);
        assert_eq!(t.scope, "mail");
        assert_eq!(t.expires_in, 3600);
        assert!(t.access_token.expose().starts_with("mgat1.") && t.refresh_token.expose().starts_with("mgrt1."));
        let list = env.store.list_app_passwords(ALICE).unwrap();
        assert_eq!(list.len(), 1);
        let g = list[0].oauth.as_ref().unwrap();
        assert_eq!((g.client_id.as_str(), g.client_name.as_str()), ("thunderbird", "Thunderbird"));
        assert_eq!(g.user_agent.as_deref(), Some("Thunderbird 153"));
        assert_eq!(list[0].id, t.grant_id);
        assert!(!format!("{:?}", list[0]).contains(&g.refresh_hash));
        assert!(!format!("{t:?}").contains(t.access_token.expose()));
        assert!(env.audit_kinds().contains(&"oauth_grant_created".to_string()));
    }

    #[test]
    fn a_code_works_once_even_when_redeemed_many_times_at_once() {
        let (env, svc) = setup();
        let code = svc.oauth_issue_code(ALICE, &approved(), &config()).unwrap();
        let (c, cfg, who) = (client("thunderbird"), config(), from());
        let won = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|_| s.spawn(|| svc.oauth_redeem_code(code.expose(), &c, REDIRECT, VERIFIER, &who, &cfg).is_ok()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count()
        });
        assert_eq!(won, 1);
        assert_eq!(env.store.list_app_passwords(ALICE).unwrap().len(), 1);
    }

    #[test]
    fn a_code_is_bound_to_client_redirect_verifier_and_time() {
        let (env, svc) = setup();
        let cfg = config();
        let redeem = |code: &str, client_id: &str, redirect: &str, verifier: &str| {
            svc.oauth_redeem_code(code, &client(client_id), redirect, verifier, &from(), &cfg)
        };
        for (client_id, redirect, verifier) in [
            ("open", REDIRECT, VERIFIER),
            ("thunderbird", "http://localhost:40124", VERIFIER),
            ("thunderbird", REDIRECT, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXx"),
            ("thunderbird", REDIRECT, CHALLENGE),
        ] {
            let code = svc.oauth_issue_code(ALICE, &approved(), &cfg).unwrap();
            assert!(matches!(redeem(code.expose(), client_id, redirect, verifier), Err(OAuthError::InvalidGrant)));
            // A refused attempt used the code up: the right request afterwards fails too.
            assert!(redeem(code.expose(), "thunderbird", REDIRECT, VERIFIER).is_err());
        }
        let code = svc.oauth_issue_code(ALICE, &approved(), &cfg).unwrap();
        env.clock.advance(61);
        assert!(matches!(redeem(code.expose(), "thunderbird", REDIRECT, VERIFIER), Err(OAuthError::InvalidGrant)));
        assert!(matches!(redeem("not-a-code", "thunderbird", REDIRECT, VERIFIER), Err(OAuthError::InvalidGrant)));
        assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
    }

    #[test]
    fn refresh_rotates_and_a_replayed_old_token_ends_the_grant() {
        let (env, svc) = setup();
        let first = signed_in(&env, &svc);
        let _live = env.live.register(ALICE, Some(&first.grant_id));
        let (c, cfg) = (client("thunderbird"), config());
        let second = svc.oauth_refresh(first.refresh_token.expose(), &c, &from(), &cfg).unwrap();
        assert_ne!(second.refresh_token.expose(), first.refresh_token.expose());
        assert_eq!(second.grant_id, first.grant_id);
        let third = svc.oauth_refresh(second.refresh_token.expose(), &c, &from(), &cfg).unwrap();
        assert!(matches!(
            svc.oauth_refresh(third.refresh_token.expose(), &client("open"), &from(), &cfg),
            Err(OAuthError::InvalidGrant)
        ));
        // Someone replays the first token: the grant ends for everyone, sessions too.
        assert!(matches!(
            svc.oauth_refresh(first.refresh_token.expose(), &c, &from(), &cfg),
            Err(OAuthError::InvalidGrant)
        ));
        assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
        assert_eq!(env.live.len(), 0);
        assert!(svc.oauth_refresh(third.refresh_token.expose(), &c, &from(), &cfg).is_err());
        assert!(env.audit_kinds().contains(&"oauth_refresh_replayed".to_string()));
    }

    #[test]
    fn a_forged_old_generation_does_not_end_the_grant() {
        let (env, svc) = setup();
        let first = signed_in(&env, &svc);
        let (c, cfg) = (client("thunderbird"), config());
        let second = svc.oauth_refresh(first.refresh_token.expose(), &c, &from(), &cfg).unwrap();
        let forged = format!("mgrt1.{}.0.{}", first.grant_id, "a".repeat(32));
        assert!(svc.oauth_refresh(&forged, &c, &from(), &cfg).is_err());
        assert!(svc.oauth_refresh(second.refresh_token.expose(), &c, &from(), &cfg).is_ok());
    }

    #[test]
    fn refresh_tokens_expire_after_their_lifetime_without_use() {
        let (env, svc) = setup();
        let t = signed_in(&env, &svc);
        env.clock.advance(366 * 86_400);
        assert!(svc.oauth_refresh(t.refresh_token.expose(), &client("thunderbird"), &from(), &config()).is_err());
    }

    #[test]
    fn revocation_needs_a_token_of_the_grant_and_ends_it() {
        let (env, svc) = setup();
        let t = signed_in(&env, &svc);
        let _live = env.live.register(ALICE, Some(&t.grant_id));
        // Unknown, malformed and forged tokens are not errors and change nothing.
        for junk in
            ["", "x", &format!("mgat1.{}.1.AAAA", t.grant_id), &format!("mgrt1.{}.0.{}", t.grant_id, "b".repeat(32))]
        {
            svc.oauth_revoke_token(junk, "thunderbird").unwrap();
        }
        assert!(matches!(svc.oauth_revoke_token(t.access_token.expose(), "open"), Err(OAuthError::InvalidClient)));
        assert_eq!(env.store.list_app_passwords(ALICE).unwrap().len(), 1);
        svc.oauth_revoke_token(t.access_token.expose(), "thunderbird").unwrap();
        assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
        assert_eq!(env.live.len(), 0);
    }

    #[test]
    fn a_new_password_or_2fa_off_ends_every_grant_but_not_app_passwords() {
        let (env, svc) = setup();
        let made = svc.create_app_password(ALICE, "Phone", vec![]).unwrap();
        let t = signed_in(&env, &svc);
        let _g = env.live.register(ALICE, Some(&t.grant_id));
        svc.set_password(ALICE, "h2".into(), false).unwrap();
        let left: Vec<String> = env.store.list_app_passwords(ALICE).unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(left, vec![made.new.id.clone()]);
        assert_eq!(env.live.len(), 0);
        svc.enable_totp(ALICE, None).unwrap();
        signed_in(&env, &svc);
        svc.disable_totp(ALICE).unwrap();
        assert_eq!(env.store.list_app_passwords(ALICE).unwrap().len(), 1);
        assert!(svc.oauth_refresh(t.refresh_token.expose(), &client("thunderbird"), &from(), &config()).is_err());
    }
}

/// Issue 18 point 2: the device list groups account-password use by address and client,
/// marks devices unused past the stale time, and names an app password's last refusal.
#[test]
fn devices_group_password_use_and_mark_stale_ones() {
    let env = Env::new();
    let svc = env.service(Actor::Admin);
    svc.create(ALICE, &[], Some("h".into())).unwrap();
    let phone = svc.create_app_password(ALICE, "Phone", vec![]).unwrap();
    let audit = |kind: &str, detail: &str| svc.audit(ALICE, kind, detail.to_string());
    audit("login", "192.0.2.1 via IMAP (Thunderbird 128.5 (x86_64)) with the account password");
    audit("login", "192.0.2.1 via SMTP with the account password");
    audit("login", "192.0.2.1 via SMTP (Thunderbird 128.5 (x86_64)) with the account password");
    audit("app_password_refused", &format!("Phone ({}) from 198.51.100.1 via IMAP: it has expired", phone.new.id));
    let d = svc.devices(ALICE, 90 * 86_400).unwrap();
    assert_eq!(d.account_password.len(), 2, "{:?}", d.account_password);
    let tb = d.account_password.iter().find(|p| p.client.is_some()).unwrap();
    assert_eq!(tb.client.as_deref(), Some("Thunderbird 128.5 (x86_64)"));
    assert_eq!(tb.protocols, vec!["SMTP".to_string(), "IMAP".to_string()]);
    assert!(!tb.refused);
    assert!(!d.signed_in[0].stale);
    assert_eq!(d.signed_in[0].last_refusal.as_ref().map(|r| r.1.as_str()), Some("it has expired"));
    env.clock.advance(91 * 86_400);
    assert!(svc.devices(ALICE, 90 * 86_400).unwrap().signed_in[0].stale);
    // With two-step verification on, only refusals count as still using the password.
    svc.enable_totp(ALICE, None).unwrap();
    assert!(svc.devices(ALICE, 90 * 86_400).unwrap().account_password.is_empty());
    audit("account_password_refused_2fa", "192.0.2.1 via IMAP (Thunderbird 128.5 (x86_64))");
    let d = svc.devices(ALICE, 90 * 86_400).unwrap();
    assert!(
        d.account_password[0].refused && d.account_password[0].client.as_deref() == Some("Thunderbird 128.5 (x86_64)")
    );
}
