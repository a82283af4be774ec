//! The `mailgate` binary: `serve`, `init` and the admin commands. Thin over the library.

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use mailgate::admin::{self, Request, Response};
use mailgate::app;
use mailgate::auth::password;
use mailgate::config::{Config, DEFAULT_CONFIG_PATH};
use mailgate::store::Scope;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
        /// Read the account password from the first line of standard input.
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
    },
    /// Set an account password (read from standard input).
    Passwd {
        /// The account.
        email: String,
        /// Read the password from the first line of standard input without a prompt.
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
        /// Comma-separated: imap, smtp (default both).
        #[arg(long, value_delimiter = ',')]
        scope: Vec<String>,
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
    /// Turn on TOTP for an account (prints the otpauth:// URI last).
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
}

/// Where the configuration came from.
enum Source {
    File(PathBuf),
    Embedded,
}

fn load_config(cli_path: Option<PathBuf>) -> Result<(Config, Source), String> {
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
    Config::load(&path).map(|c| (c, Source::File(path))).map_err(|e| e.to_string())
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
        Command::User(c) => user(&config, c),
        Command::AppPassword(c) => app_password(&config, c),
        Command::Totp(c) => totp(&config, c),
        Command::Store(c) => store_cmd(&config, c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dev_cert_names(config: &Config) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !names.contains(&config.hostname) {
        names.push(config.hostname.clone());
    }
    names
}

fn init(config: &Config) -> anyhow::Result<ExitCode> {
    {
        let store = app::open_store(config)?;
        app::load_key(config, store.as_ref())?;
    }
    println!("data directory: {} (store, secret.key, admin.sock)", config.data_dir.display());
    if mailgate::tls::ensure_dev_cert(&config.tls_cert, &config.tls_key, &dev_cert_names(config))? {
        println!(
            "made a self-signed development certificate: {} / {}",
            config.tls_cert.display(),
            config.tls_key.display()
        );
    } else {
        println!("certificate: {} / {}", config.tls_cert.display(), config.tls_key.display());
    }
    let secret = &config.upstream_imap.master_password_file;
    if !secret.exists() {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).map_err(|e| anyhow!("no OS randomness: {e}"))?;
        let pw: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        mailgate::fsutil::write_private(secret, format!("{pw}\n").as_bytes())
            .with_context(|| format!("writing {}", secret.display()))?;
        println!(
            "made an upstream master password in {} (give it to Dovecot's master user `{}`: see docs/dovecot.md)",
            secret.display(),
            config.upstream_imap.master_user
        );
    } else {
        println!("upstream master password file: {}", secret.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(config: Config, source: Source) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
    // Fail on the certificates before opening any port.
    mailgate::tls::server_config(&config.tls_cert, &config.tls_key, &["imap"])
        .with_context(|| "[tls] cert/key".to_string())?;
    for (up, key) in
        [(&config.upstream_imap, "[upstream.imap] ca_file"), (&config.upstream_smtp, "[upstream.smtp] ca_file")]
    {
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
        for l in &listeners.imap_tls {
            eprintln!("mailgate: IMAP (implicit TLS) on {}", l.local_addr()?);
        }
        for l in &listeners.imap_starttls {
            eprintln!("mailgate: IMAP (STARTTLS) on {}", l.local_addr()?);
        }
        for l in &listeners.smtp_tls {
            eprintln!("mailgate: SMTP submission (implicit TLS) on {}", l.local_addr()?);
        }
        for l in &listeners.smtp_starttls {
            eprintln!("mailgate: SMTP submission (STARTTLS) on {}", l.local_addr()?);
        }
        for l in &listeners.web {
            eprintln!("mailgate: web step on https://{} (public URL {})", l.local_addr()?, config.public_url);
        }
        eprintln!(
            "mailgate: upstream IMAP {} (tls {:?}, login {:?} as {}); upstream SMTP {} (tls {:?}, login {:?}); data in {}; certificate {}",
            config.upstream_imap.address,
            config.upstream_imap.tls,
            config.upstream_imap.login,
            config.upstream_imap.master_user,
            config.upstream_smtp.address,
            config.upstream_smtp.tls,
            config.upstream_smtp.login,
            config.data_dir.display(),
            config.tls_cert.display()
        );
        app::run(Arc::new(config), store, key, listeners, app::shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Sends a request to the running server, or executes it on the store directly.
fn dispatch(config: &Config, req: Request) -> anyhow::Result<Response> {
    let socket = config.admin_socket_path();
    if let Some(resp) = admin::socket::request(&socket, &req).map_err(anyhow::Error::msg)? {
        return Ok(resp);
    }
    let store = app::open_store(config).map_err(|e| {
        anyhow!("{e:#}\n(if `mailgate serve` is running, its admin socket {} did not answer)", socket.display())
    })?;
    let key = app::load_key(config, store.as_ref())?;
    let ctx = admin::Context {
        store: store.clone(),
        key: Arc::new(key),
        issuer: config.hostname.clone(),
        sessions: None,
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

/// Reads a password from standard input (first line), prompting on a terminal.
fn read_password(prompt: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if prompt && stdin.is_terminal() {
        eprint!("New password (shown as you type; use --password-stdin to pipe it): ");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.chars().count() < 8 {
        return Err(anyhow!("the password must have at least 8 characters"));
    }
    if pw.len() > mailgate::proto::sasl::MAX_FIELD {
        return Err(anyhow!("the password is too long (at most {} bytes)", mailgate::proto::sasl::MAX_FIELD));
    }
    Ok(pw)
}

fn hash_password(pw: String) -> anyhow::Result<String> {
    let pw = mailgate::secret::SecretString::from(pw);
    password::hash(pw.expose().as_bytes()).map_err(anyhow::Error::msg)
}

fn user(config: &Config, cmd: UserCmd) -> anyhow::Result<ExitCode> {
    let upstream = config.accounts.password_check == mailgate::config::PasswordCheck::Upstream;
    let owned_upstream = || {
        anyhow!(
            "[accounts] password_check = \"upstream\": account passwords are checked by the upstream server; set or change them there (mailgate keeps none)"
        )
    };
    match &cmd {
        UserCmd::Passwd { .. } | UserCmd::Add { password_stdin: true, .. } | UserCmd::Import { .. } if upstream => {
            return Err(owned_upstream());
        }
        _ => {}
    }
    match cmd {
        UserCmd::Add { email, addresses, password_stdin } => {
            let password_hash = if password_stdin { Some(hash_password(read_password(false)?)?) } else { None };
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
        UserCmd::List { json } => print(dispatch(config, Request::UserList)?, json),
        UserCmd::Passwd { email, password_stdin } => {
            let password_hash = hash_password(read_password(!password_stdin)?)?;
            print(dispatch(config, Request::UserPasswd { email, password_hash })?, false)
        }
        UserCmd::Remove { email } => print(dispatch(config, Request::UserRemove { email })?, false),
        UserCmd::Unlock { email } => print(dispatch(config, Request::UserUnlock { email })?, false),
    }
}

fn app_password(config: &Config, cmd: AppCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AppCmd::Create { email, label, scope } => {
            let scopes = scope
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.parse::<Scope>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            print(dispatch(config, Request::AppPasswordCreate { email, label, scopes })?, false)
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
    }
}
