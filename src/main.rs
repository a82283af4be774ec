//! The `mailgate` binary: `serve`, `init` and the admin commands. Thin over the library.

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use mailgate::admin::{self, Request, Response};
use mailgate::app;
use mailgate::auth::password;
use mailgate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use mailgate::secret::SecretString;
use mailgate::store::Narrowing;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use zeroize::Zeroize as _;

/// Exit code for a configuration error (EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "mailgate", version, about = "IMAP/SMTP authentication proxy with app passwords and TOTP")]
struct Cli {
    /// Configuration file. Without it, config/mailgate.toml is used if it exists,
    /// otherwise the embedded defaults (loopback listeners, data in data/).
    #[arg(long, global = true, env = "MAILGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a development certificate, the data directory, the secret key and an upstream
    /// master password file where missing. Safe to run again (while `serve` is stopped).
    Init,
    /// Run the proxy.
    Serve,
    /// Check that this configuration can serve: certificate, store, each upstream with
    /// its TLS, the logins as a user (--user), the web step. Exit status 1 if a check failed.
    Check {
        /// Also log in upstream as this user (an address that exists upstream), the way
        /// `serve` does: the master login and the client-address forwarding.
        #[arg(long, value_name = "EMAIL")]
        user: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Everything that can sign in to an account: app passwords and apps signed in
    /// through the browser (with last use and a stale mark), and the mail apps still
    /// sending the account password.
    Devices {
        /// The account.
        email: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage app passwords.
    #[command(subcommand, name = "app-password")]
    AppPassword(AppCmd),
    /// Manage TOTP two-factor authentication.
    #[command(subcommand)]
    Totp(TotpCmd),
    /// Export or import the whole store (to move it, or across a store format change).
    #[command(subcommand)]
    Store(StoreCmd),
    /// Write the Thunderbird add-on (.xpi) that lets Thunderbird sign in through the web
    /// step with OAuth2 ([oauth]); the web step also offers it for download.
    #[command(name = "thunderbird-addon")]
    ThunderbirdAddon {
        /// Where to write it, e.g. oauth@mail.example.com.xpi.
        #[arg(long, value_name = "FILE.xpi")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Write everything in the store to FILE (mode 0600). Hashes and sealed TOTP secrets
    /// stay as they are; back up data/secret.key separately.
    Export {
        /// The file to write.
        file: PathBuf,
    },
    /// Load FILE (made by `store export`) into an empty store. Copy the old
    /// data/secret.key first, or the TOTP secrets cannot be opened.
    Import {
        /// The file to read.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add an account.
    Add {
        /// The login name (e-mail address).
        email: String,
        /// Another address the account may send as (repeatable).
        #[arg(long = "address")]
        addresses: Vec<String>,
        /// Give the account a password: asked twice, not shown, on a terminal.
        #[arg(long, conflicts_with = "password_stdin")]
        password: bool,
        /// Read the account password from the first line of standard input, without a
        /// prompt (for scripts).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Import accounts with their passwords from a Dovecot passwd-file
    /// (`user:{SCHEME}hash`; all or nothing).
    Import {
        /// The passwd-file.
        file: PathBuf,
        /// Domain for names without one (`alice` → `alice@DOMAIN`).
        #[arg(long)]
        domain: Option<String>,
    },
    /// List accounts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only the accounts that `[policy] require_second_factor` obliges to use two-step
        /// verification and that have not turned it on yet.
        #[arg(long)]
        needs_2fa: bool,
    },
    /// Set an account password (asked twice, not shown, on a terminal).
    Passwd {
        /// The account.
        email: String,
        /// Read the password from the first line of standard input without a prompt (for
        /// scripts).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Refill an account's password and code guess budgets and clear its failure delay
    /// (there is no account lock; see docs/security.md#throttling).
    Unlock {
        /// The account.
        email: String,
    },
    /// Remove an account and its app passwords; its live sessions end.
    Remove {
        /// The account.
        email: String,
    },
}

#[derive(Subcommand)]
enum AppCmd {
    /// Create an app password; it is printed once, on the last line.
    Create {
        /// The account.
        email: String,
        /// What it is for, e.g. "Thunderbird laptop".
        #[arg(long)]
        label: String,
        /// Comma-separated: imap, imap:read (IMAP, read-only), smtp, pop3, sieve (default
        /// imap,smtp).
        #[arg(long, value_delimiter = ',')]
        scope: Vec<String>,
        /// Comma-separated IMAP folders (LIST patterns, `*` and `%`, `/` between levels):
        /// only these exist for it.
        #[arg(long)]
        folders: Option<String>,
        /// Comma-separated addresses of the account it may send as (a subset of its own).
        #[arg(long, value_delimiter = ',')]
        send_as: Vec<String>,
        /// Comma-separated recipients it may send to: addresses or @domain.
        #[arg(long, value_delimiter = ',')]
        send_to: Vec<String>,
        /// At most this many messages per hour (SMTP).
        #[arg(long)]
        max_messages: Option<u32>,
        /// At most this many recipients per hour (SMTP).
        #[arg(long)]
        max_recipients: Option<u32>,
        /// Stops working after a duration (30d, 12h, 8w) or at the end of a date
        /// (YYYY-MM-DD, UTC).
        #[arg(long)]
        expires: Option<String>,
        /// Comma-separated networks or addresses it may be used from (192.0.2.0/24,
        /// 2001:db8::/32); from anywhere else it is refused like a wrong password.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
    },
    /// List an account's app passwords.
    List {
        /// The account.
        email: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an app password; its live sessions end.
    Revoke {
        /// The account.
        email: String,
        /// The app password's id (first column of `list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum TotpCmd {
    /// Turn on TOTP for an account (prints new backup codes, then the otpauth:// URI last).
    Enable {
        /// The account.
        email: String,
        /// Import this base32 secret instead of generating one.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Turn off TOTP for an account.
    Disable {
        /// The account.
        email: String,
    },
    /// Make a new set of backup codes for an account with TOTP (the old set stops working).
    BackupCodes {
        /// The account.
        email: String,
    },
}

/// Where the configuration came from.
enum Source {
    File(PathBuf),
    Embedded,
}

fn load_config(cli_path: Option<PathBuf>) -> Result<(Config, Source), ConfigError> {
    let path = match cli_path {
        Some(p) => p,
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            if !p.exists() {
                return Ok((Config::embedded_defaults(), Source::Embedded));
            }
            p
        }
    };
    Config::load(&path).map(|c| (c, Source::File(path)))
}

/// rustls' notes on what a client's ClientHello carried (e.g. an IP address as the TLS
/// server name, which OpenSSL-based clients send) are WARN lines, one per connection, of an
/// ordinary client quirk: half of an imaptest run's log. They are left out unless
/// `RUST_LOG` names rustls.
const QUIET_CLIENT_QUIRKS: &str = "rustls::msgs::handshake=error";

/// The log filter: `RUST_LOG` (default `info`), without rustls' client-quirk notes unless
/// it asks for rustls.
fn log_filter(rust_log: Option<&str>) -> String {
    match rust_log {
        Some(v) if v.contains("rustls") => v.to_string(),
        Some(v) if !v.trim().is_empty() => format!("{v},{QUIET_CLIENT_QUIRKS}"),
        _ => format!("info,{QUIET_CLIENT_QUIRKS}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, source) = match load_config(cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailgate: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = match cli.command {
        Command::Serve => serve(config, source),
        Command::Init => init(&config),
        Command::Check { user, json } => check(&config, &source, user.as_deref(), json),
        Command::Devices { email, json } => {
            let stale_after_days = config.accounts.stale_after.as_secs() / 86_400;
            dispatch(&config, Request::Devices { email, stale_after_days }).and_then(|r| print(r, json))
        }
        Command::User(c) => user(&config, c),
        Command::AppPassword(c) => app_password(&config, c),
        Command::Totp(c) => totp(&config, c),
        Command::Store(c) => store_cmd(&config, c),
        Command::ThunderbirdAddon { out } => thunderbird_addon(&config, &out),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mailgate thunderbird-addon --out FILE`.
fn thunderbird_addon(config: &Config, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    let xpi = mailgate::web::thunderbird_addon(config)?;
    std::fs::write(out, xpi).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "wrote {} (add-on oauth@{}, sign-in at {}/oauth/authorize)",
        out.display(),
        config.hostname,
        config.public_url
    );
    if !config.oauth.enabled {
        eprintln!(
            "mailgate: note: [oauth] enabled = false; the web step answers the add-on's sign-ins once it is true"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn dev_cert_names(config: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !names.contains(&config.hostname) {
        names.push(config.hostname.clone());
    }
    names
}

/// One line of `init`'s report: what it made or kept, and where.
fn init_line(made: bool, what: &str, detail: &str) -> String {
    format!("{} {what}: {detail}", if made { "made" } else { "kept" })
}

fn init(config: &Config) -> anyhow::Result<ExitCode> {
    let had_data_dir = config.data_dir.exists();
    let key_path = config.secret_key_path();
    let had_key = key_path.exists();
    {
        let store = app::open_store(config)?;
        app::load_key(config, store.as_ref())?;
    }
    println!(
        "{}",
        init_line(
            !had_data_dir,
            "data directory",
            &format!("{} (mode 0700; store, admin socket)", config.data_dir.display())
        )
    );
    println!("{}", init_line(!had_key, "secret key", &format!("{} (mode 0600; back it up)", key_path.display())));
    let names = dev_cert_names(config);
    let pair = format!("{} / {}", config.tls_cert.display(), config.tls_key.display());
    if mailgate::tls::ensure_dev_cert(&config.tls_cert, &config.tls_key, &names)? {
        println!("{}", init_line(true, "certificate", &format!("{pair} (self-signed, for {})", names.join(", "))));
    } else {
        println!("{}", init_line(false, "certificate", &pair));
    }
    let secret = &config.upstream_imap.master_password_file;
    if !secret.exists() {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).map_err(|e| anyhow!("no OS randomness: {e}"))?;
        let mut pw: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        bytes.zeroize();
        let written = mailgate::fsutil::write_private(secret, format!("{pw}\n").as_bytes());
        pw.zeroize();
        written.with_context(|| format!("writing {}", secret.display()))?;
        println!(
            "{}",
            init_line(
                true,
                "upstream master password",
                &format!(
                    "{} (give it to Dovecot's master user `{}`: see docs/dovecot.md)",
                    secret.display(),
                    config.upstream_imap.master_user
                )
            )
        );
    } else {
        println!("{}", init_line(false, "upstream master password", &secret.display().to_string()));
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(config: Config, source: Source) -> anyhow::Result<ExitCode> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(std::env::var("RUST_LOG").ok().as_deref())))
        .with_writer(std::io::stderr);
    match config.log_format {
        mailgate::config::LogFormat::Text => {
            logs.with_ansi(log_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"))).init()
        }
        mailgate::config::LogFormat::Json => {
            // Values go in unquoted: JSON quotes and escapes them itself.
            mailgate::auth::login_log::set_json();
            logs.json().with_ansi(false).init()
        }
    }
    match &source {
        Source::File(p) => eprintln!("mailgate: configuration {}", p.display()),
        Source::Embedded => {
            eprintln!(
                "mailgate: no configuration file ({DEFAULT_CONFIG_PATH} not found): running on the embedded defaults"
            );
            if mailgate::tls::ensure_dev_cert(&config.tls_cert, &config.tls_key, &dev_cert_names(&config))? {
                eprintln!("mailgate: made a self-signed development certificate in {}", config.tls_cert.display());
            }
        }
    }
    // `[tls] acme`: a self-signed placeholder until the first order completes.
    if let Some(acme) = &config.acme
        && mailgate::acme::ensure_placeholder(acme)?
    {
        eprintln!(
            "mailgate: made a self-signed placeholder certificate in {} until the ACME order completes",
            config.tls_cert.display()
        );
    }
    // Fail on the certificates before opening any port.
    mailgate::tls::CertStore::load(&config.tls_cert, &config.tls_key).with_context(|| "[tls] cert/key".to_string())?;
    let upstreams = [
        (Some(&config.upstream_imap), "[upstream.imap] ca_file"),
        (Some(&config.upstream_smtp), "[upstream.smtp] ca_file"),
        (config.upstream_pop3.as_ref(), "[upstream.pop3] ca_file"),
        (config.upstream_sieve.as_ref(), "[upstream.sieve] ca_file"),
    ];
    for (up, key) in upstreams.into_iter().filter_map(|(up, key)| Some((up?, key))) {
        if up.tls != mailgate::config::UpstreamTls::None {
            mailgate::tls::client_config(up.ca_file.as_deref()).with_context(|| key.to_string())?;
        }
    }
    let store = app::open_store(&config)?;
    let key = app::load_key(&config, store.as_ref())?;
    let mut masters = vec![&config.upstream_imap.master_password_file];
    if config.upstream_smtp.login != mailgate::config::UpstreamLogin::Xclient {
        masters.push(&config.upstream_smtp.master_password_file);
    }
    for up in [&config.upstream_pop3, &config.upstream_sieve].into_iter().flatten() {
        masters.push(&up.master_password_file);
    }
    masters.sort();
    masters.dedup();
    for master in masters {
        if !master.exists() {
            eprintln!(
                "mailgate: warning: {} does not exist; upstream logins will fail until it does (run `mailgate init`)",
                master.display()
            );
        }
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listeners = app::Listeners::bind(&config).await?;
        let mail = [
            (&listeners.imap_tls, "IMAP (implicit TLS)"),
            (&listeners.imap_starttls, "IMAP (STARTTLS)"),
            (&listeners.smtp_tls, "SMTP submission (implicit TLS)"),
            (&listeners.smtp_starttls, "SMTP submission (STARTTLS)"),
            (&listeners.pop3_tls, "POP3 (implicit TLS)"),
            (&listeners.pop3_starttls, "POP3 (STLS)"),
            (&listeners.sieve, "ManageSieve (STARTTLS)"),
        ];
        for (list, what) in mail {
            for l in list {
                eprintln!("mailgate: {what} on {}", l.local_addr()?);
            }
        }
        for l in &listeners.web {
            eprintln!("mailgate: web step on https://{} (public URL {})", l.local_addr()?, config.public_url);
        }
        for line in config.startup_summary() {
            eprintln!("mailgate: {line}");
        }
        app::run(Arc::new(config), store, key, listeners, app::shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `mailgate check`: every check, one line each (or JSON); status 1 when one failed.
fn check(config: &Config, source: &Source, user: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let source = match source {
        Source::File(p) => p.display().to_string(),
        Source::Embedded => format!("embedded defaults ({DEFAULT_CONFIG_PATH} not found)"),
    };
    let findings = mailgate::check::run(config, &source, user);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&mailgate::check::to_json(&findings))?)?;
    } else {
        write!(out, "{}", mailgate::check::render(&findings))?;
    }
    Ok(if mailgate::check::failed(&findings) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Sends a request to the running server, or executes it on the store directly.
fn dispatch(config: &Config, req: Request) -> anyhow::Result<Response> {
    let socket = config.admin_socket_path();
    if let Some(resp) = admin::socket::request(&socket, &req).map_err(anyhow::Error::msg)? {
        return Ok(resp);
    }
    let store = app::open_store(config).map_err(|e| {
        let e = anyhow::Error::from(e);
        anyhow!("{e:#}\n(if `mailgate serve` is running, its admin socket {} did not answer)", socket.display())
    })?;
    let key = app::load_key(config, store.as_ref())?;
    let ctx = admin::Context {
        store: store.clone(),
        key: Arc::new(key),
        issuer: config.hostname.clone(),
        live: None,
        hashing: None,
    };
    let resp = admin::execute(&ctx, req);
    store.flush()?;
    Ok(resp)
}

fn print(resp: Response, json: bool) -> anyhow::Result<ExitCode> {
    if !resp.ok {
        return Err(anyhow!(resp.error.unwrap_or_else(|| "failed".into())));
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&resp.json.unwrap_or_default())?)?;
    } else {
        for l in resp.lines {
            writeln!(out, "{l}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether log lines get ANSI colours: only on a terminal, and never when `NO_COLOR` is
/// set to anything but the empty string (https://no-color.org).
fn log_colour(to_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    to_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A new account password: from the first line of standard input when `from_stdin` or when
/// standard input is not a terminal (no prompt), else asked twice on the terminal without
/// echo. Either way it must pass the password policy (`auth::password::policy`).
fn new_password(from_stdin: bool) -> anyhow::Result<SecretString> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let pw = SecretString::from(line.trim_end_matches(['\r', '\n']).to_string());
        line.zeroize();
        password::policy(pw.expose())?;
        return Ok(pw);
    }
    ask_twice(|prompt| rpassword::prompt_password(prompt).map(SecretString::from))
}

/// Asks for a new password, checks it against the policy, and asks for it again; the two
/// must be the same. `ask` shows a prompt and reads one answer (on a terminal: without
/// echo). Nothing is changed when this fails.
fn ask_twice(mut ask: impl FnMut(&str) -> std::io::Result<SecretString>) -> anyhow::Result<SecretString> {
    let first = ask("New password: ")?;
    password::policy(first.expose())?;
    let again = ask("The same password again: ")?;
    if first != again {
        return Err(anyhow!("the two passwords are not the same; nothing was changed"));
    }
    Ok(first)
}

fn hash_password(pw: SecretString) -> anyhow::Result<String> {
    Ok(password::hash(pw.expose().as_bytes())?)
}

fn user(config: &Config, cmd: UserCmd) -> anyhow::Result<ExitCode> {
    let upstream = config.accounts.password_check == mailgate::config::PasswordCheck::Upstream;
    let owned_upstream = || {
        anyhow!(
            "[accounts] password_check = \"upstream\": account passwords are checked by the upstream server; set or change them there (mailgate keeps none)"
        )
    };
    match &cmd {
        UserCmd::Passwd { .. }
        | UserCmd::Add { password_stdin: true, .. }
        | UserCmd::Add { password: true, .. }
        | UserCmd::Import { .. }
            if upstream =>
        {
            return Err(owned_upstream());
        }
        _ => {}
    }
    match cmd {
        UserCmd::Add { email, addresses, password, password_stdin } => {
            let password_hash =
                if password || password_stdin { Some(hash_password(new_password(password_stdin)?)?) } else { None };
            print(dispatch(config, Request::UserAdd { email, addresses, password_hash })?, false)
        }
        UserCmd::Import { file, domain } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let users = mailgate::import::parse_passwd_file(&text, domain.as_deref())
                .map_err(|e| anyhow!("{} was not imported (nothing was):\n{e}", file.display()))?;
            if users.is_empty() {
                return Err(anyhow!("{} has no users", file.display()));
            }
            let plain = users.iter().filter(|u| u.was_plaintext).count();
            if plain > 0 {
                eprintln!(
                    "mailgate: note: {plain} passwords in the file were in plain text; they are stored hashed (argon2id). Delete the file."
                );
            }
            let users = users.into_iter().map(|u| (u.email, u.stored_hash)).collect();
            print(dispatch(config, Request::UserImport { users })?, false)
        }
        UserCmd::List { json, needs_2fa: false } => print(dispatch(config, Request::UserList)?, json),
        UserCmd::List { json, needs_2fa: true } => {
            let policy = &config.policy;
            if policy.require_second_factor.is_empty() {
                return Err(anyhow!(
                    "no domain requires two-step verification: set [policy] require_second_factor in the config"
                ));
            }
            let mut resp = dispatch(config, Request::UserList)?;
            let due = |user: &serde_json::Value| {
                let name = user["username"].as_str().unwrap_or_default();
                policy.requires_second_factor(name) && user["totp"] != serde_json::Value::Bool(true)
            };
            let users: Vec<serde_json::Value> = resp
                .json
                .take()
                .and_then(|j| j.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter(due)
                .collect();
            let names: Vec<String> = users.iter().filter_map(|u| u["username"].as_str().map(str::to_string)).collect();
            resp.lines.retain(|l| names.iter().any(|n| l.split('\t').next() == Some(n.as_str())));
            let when = match policy.grace_until {
                Some(at) if mailgate::fsutil::now_unix() < at => {
                    format!(
                        "they keep their account password on the mail ports until {}",
                        mailgate::accounts::fmt_time(at)
                    )
                }
                _ => "the grace period is over: their mail apps are refused the account password".to_string(),
            };
            resp.lines.push(format!("{} account(s) without two-step verification; {when}", names.len()));
            resp.json = Some(users.into());
            print(resp, json)
        }
        UserCmd::Passwd { email, password_stdin } => {
            let password_hash = hash_password(new_password(password_stdin)?)?;
            print(dispatch(config, Request::UserPasswd { email, password_hash })?, false)
        }
        UserCmd::Remove { email } => print(dispatch(config, Request::UserRemove { email })?, false),
        UserCmd::Unlock { email } => print(dispatch(config, Request::UserUnlock { email })?, false),
    }
}

fn app_password(config: &Config, cmd: AppCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AppCmd::Create {
            email,
            label,
            scope,
            expires,
            allow,
            folders,
            send_as,
            send_to,
            max_messages,
            max_recipients,
        } => {
            let (scopes, read_only) = mailgate::auth::app_password::parse_scopes(&scope)?;
            let now = mailgate::fsutil::now_unix();
            let expires_at = expires.map(|e| mailgate::auth::app_password::parse_expiry(&e, now)).transpose()?;
            let allow = mailgate::auth::app_password::parse_allow(&allow)?;
            let folders = folders.map(|f| f.split(',').map(|p| p.trim().to_string()).collect()).unwrap_or_default();
            let narrow = Narrowing { read_only, folders, send_as, send_to, max_messages, max_recipients };
            let request = if narrow.is_empty() {
                Request::AppPasswordCreate { email, label, scopes, expires_at, allow }
            } else {
                Request::AppPasswordCreateNarrow { email, label, scopes, expires_at, allow, narrow }
            };
            print(dispatch(config, request)?, false)
        }
        AppCmd::List { email, json } => print(dispatch(config, Request::AppPasswordList { email })?, json),
        AppCmd::Revoke { email, id } => print(dispatch(config, Request::AppPasswordRevoke { email, id })?, false),
    }
}

fn store_cmd(config: &Config, cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCmd::Export { file } => {
            let resp = dispatch(config, Request::StoreExport)?;
            if !resp.ok {
                return print(resp, false);
            }
            let text = serde_json::to_vec_pretty(&resp.json.clone().unwrap_or_default())?;
            mailgate::fsutil::write_private(&file, &text).with_context(|| format!("writing {}", file.display()))?;
            println!("{} -> {}", resp.lines.join(" "), file.display());
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Import { file } => {
            let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let dump: mailgate::store::Dump = serde_json::from_slice(&text)
                .map_err(|e| anyhow!("{} is not a mailgate store export: {e}", file.display()))?;
            print(dispatch(config, Request::StoreImport { dump: Box::new(dump) })?, false)
        }
    }
}

fn totp(config: &Config, cmd: TotpCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TotpCmd::Enable { email, secret } => print(dispatch(config, Request::TotpEnable { email, secret })?, false),
        TotpCmd::Disable { email } => print(dispatch(config, Request::TotpDisable { email })?, false),
        TotpCmd::BackupCodes { email } => print(dispatch(config, Request::BackupCodesRegenerate { email })?, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// Colour only on a terminal, and not when NO_COLOR is set (to anything but "").
    #[test]
    fn log_colour_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsString::new())), "an empty NO_COLOR does not count");
        assert!(!log_colour(true, Some(OsString::from("1"))));
        assert!(!log_colour(false, None), "a pipe or a file gets no escape codes");
        assert!(!log_colour(false, Some(OsString::from("1"))));
    }

    fn answers(list: &[&str]) -> impl FnMut(&str) -> std::io::Result<SecretString> {
        let mut list: Vec<String> = list.iter().rev().map(|s| s.to_string()).collect();
        move |_prompt| list.pop().map(SecretString::from).ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }

    /// The terminal prompt asks twice; two different answers, or a first answer that fails
    /// the policy (then it does not ask again), change nothing.
    #[test]
    fn a_new_password_is_asked_twice_and_checked() {
        let pw = ask_twice(answers(&["a-long-enough-password", "a-long-enough-password"])).unwrap();
        assert_eq!(pw.expose(), "a-long-enough-password");
        let e = ask_twice(answers(&["a-long-enough-password", "a-long-enough-passwort"])).unwrap_err();
        assert_eq!(e.to_string(), "the two passwords are not the same; nothing was changed");
        let mut asked = 0;
        let e = ask_twice(|_| {
            asked += 1;
            Ok(SecretString::from("short".to_string()))
        })
        .unwrap_err();
        assert_eq!(asked, 1, "a refused password is not asked for again");
        assert_eq!(e.to_string(), "the password must have at least 15 characters");
        let e = ask_twice(answers(&["passwordpassword", "passwordpassword"])).unwrap_err();
        assert!(e.to_string().contains("too easy to guess"), "{e}");
        assert!(ask_twice(answers(&["a-long-enough-password"])).is_err(), "end of input");
    }

    #[test]
    fn init_says_made_or_kept() {
        assert_eq!(init_line(true, "secret key", "data/secret.key"), "made secret key: data/secret.key");
        assert_eq!(init_line(false, "certificate", "a / b"), "kept certificate: a / b");
    }
}

#[cfg(test)]
mod log_filter_tests {
    use super::log_filter;

    #[test]
    fn rustls_client_quirks_are_left_out_unless_asked_for() {
        assert_eq!(log_filter(None), "info,rustls::msgs::handshake=error");
        assert_eq!(log_filter(Some("debug,sled=info")), "debug,sled=info,rustls::msgs::handshake=error");
        assert_eq!(log_filter(Some("info,rustls=debug")), "info,rustls=debug");
        assert_eq!(log_filter(Some(" ")), "info,rustls::msgs::handshake=error");
    }
}
