//! Tests of the test harnesses themselves: the private PostgreSQL cluster
//! (tests/support/postgres.rs) and the private HAProxy (tests/support/haproxy.rs).
//! They prove what the PostgreSQL store tests rely on: SQL over the superuser socket
//! and over TCP with the `mailgate` password exactly as `url()` gives it, data kept
//! across restart and crash recovery, parallel clusters, and HAProxy's round-robin
//! with a PROXY protocol v2 header in front of the backends.

use crate::support::client::PROMPTLY;
use crate::support::haproxy::Haproxy;
use crate::support::postgres::{Postgres, psql_url};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

#[test]
fn postgres_sql_over_socket_and_tcp_password() {
    let pg = Postgres::start();
    let url = pg.url();
    assert_eq!(url, format!("postgres://mailgate:{}@127.0.0.1:{}/mailgate", pg.password(), pg.port));
    assert_ne!(pg.port, 5432, "never the system cluster's port");

    // The application role over TCP with its password, URL exactly as url() gives it.
    let out = psql_url(
        &url,
        "CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);\n\
         INSERT INTO t VALUES (1, 'one'), (2, 'zwei');\n\
         SELECT current_user, inet_server_addr(), inet_server_port();\n",
    )
    .unwrap_or_else(|e| panic!("psql over TCP: {e}\n--- log ---\n{}", pg.log()));
    assert_eq!(out.trim(), format!("mailgate|127.0.0.1|{}", pg.port));

    // The superuser over the private unix socket sees the same data and can write.
    pg.psql("INSERT INTO t VALUES (3, 'grüße');");
    assert_eq!(pg.psql("SELECT id, name FROM t ORDER BY id;"), "1|one\n2|zwei\n3|grüße\n");
    assert_eq!(pg.psql("SELECT current_user, inet_server_addr() IS NULL;").trim(), "postgres|t");
    assert_eq!(psql_url(&url, "SELECT count(*) FROM t;").unwrap().trim(), "3");

    // The superuser also has a TCP password.
    assert_eq!(
        psql_url(&pg.superuser_url(), "SELECT rolsuper FROM pg_roles WHERE rolname = current_user;").unwrap().trim(),
        "t"
    );

    // Password auth really is enforced over TCP, with SCRAM.
    let wrong = url.replace(pg.password(), "wrong-password");
    let err = psql_url(&wrong, "SELECT 1;").expect_err("a wrong password must be refused");
    assert!(err.contains("password authentication failed for user \"mailgate\""), "{err}");
    assert_eq!(
        pg.psql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%', rolsuper, rolcanlogin FROM pg_authid WHERE rolname = 'mailgate';")
            .trim(),
        "t|f|t"
    );
    assert_eq!(
        pg.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mailgate';").trim(),
        "mailgate"
    );
    // Durability is left on (crash tests), and only loopback is listened on.
    assert_eq!(pg.psql("SHOW fsync;\nSHOW synchronous_commit;\nSHOW listen_addresses;"), "on\non\n127.0.0.1\n");
    assert_eq!(pg.psql("SELECT version();").split_whitespace().nth(1).unwrap().split('.').next(), Some("15"));

    // psql() panics with psql's stderr on an SQL error.
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pg.psql("SELECT * FROM no_such_table;")))
        .expect_err("an SQL error must panic");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("relation \"no_such_table\" does not exist"), "{msg}");

    let log = pg.log();
    assert!(log.contains("database system is ready to accept connections"), "{log}");
    assert!(log.contains("connection authorized: user=mailgate database=mailgate"), "{log}");
    // The server runs as the postgres user, never as root.
    let status = std::fs::read_to_string(format!("/proc/{}/status", pg.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().split_whitespace().nth(1).unwrap();
    assert_ne!(uid, "0");
}

#[test]
fn postgres_restart_and_crash_keep_committed_data() {
    let mut pg = Postgres::start();
    let (url, port, pid) = (pg.url(), pg.port, pg.pid());
    psql_url(&url, "CREATE TABLE kv (k text PRIMARY KEY, v int);\nINSERT INTO kv VALUES ('a', 1);").unwrap();

    // Outage: stop, the server refuses connections, restart on the same port.
    pg.stop();
    assert!(!pg.is_running());
    assert!(psql_url(&url, "SELECT 1;").is_err(), "stopped server must refuse");
    pg.restart();
    assert_eq!(pg.port, port);
    assert_eq!(pg.url(), url);
    assert_ne!(pg.pid(), pid);
    assert_eq!(psql_url(&url, "SELECT v FROM kv WHERE k = 'a';").unwrap().trim(), "1");

    // restart() of a running server.
    let pid = pg.pid();
    psql_url(&url, "INSERT INTO kv VALUES ('b', 2);").unwrap();
    pg.restart();
    assert_ne!(pg.pid(), pid);
    assert_eq!(psql_url(&url, "SELECT count(*) FROM kv;").unwrap().trim(), "2");

    // Crash: SIGKILL; committed rows survive through WAL replay, the uncommitted one not.
    psql_url(&url, "INSERT INTO kv VALUES ('c', 3);").unwrap();
    let pid = pg.pid();
    let mut open_tx = TcpStream::connect(pg.addr()).unwrap(); // a client connected at crash time
    pg.kill();
    assert!(!pg.is_running());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "postmaster {pid} reaped");
    // The connection is cut (reset or EOF), not left hanging.
    open_tx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    let r = open_tx.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?} {buf:?}\n{}", pg.log());
    pg.restart();
    assert_eq!(psql_url(&url, "SELECT string_agg(k, ',' ORDER BY k) FROM kv;").unwrap().trim(), "a,b,c");
    let log = pg.log();
    assert!(log.contains("database system was interrupted") || log.contains("not properly shut down"), "{log}");
}

#[test]
fn postgres_clusters_in_parallel() {
    let handles: Vec<_> = (0..3).map(|_| thread::spawn(Postgres::start)).collect();
    let clusters: Vec<Postgres> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut ports: Vec<u16> = clusters.iter().map(|c| c.port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), clusters.len(), "distinct ports");
    for (i, c) in clusters.iter().enumerate() {
        psql_url(&c.url(), &format!("CREATE TABLE who (n int);\nINSERT INTO who VALUES ({i});")).unwrap();
    }
    for (i, c) in clusters.iter().enumerate() {
        assert_eq!(psql_url(&c.url(), "SELECT n FROM who;").unwrap().trim(), i.to_string());
        assert_ne!(c.dir.path(), clusters[(i + 1) % clusters.len()].dir.path());
    }
    // Passwords differ too: one cluster's URL does not open another.
    let crossed = clusters[0].url().replace(&format!(":{}/", clusters[0].port), &format!(":{}/", clusters[1].port));
    assert!(psql_url(&crossed, "SELECT 1;").is_err());

    let dirs: Vec<_> = clusters.iter().map(|c| c.dir.path().to_path_buf()).collect();
    drop(clusters);
    for d in dirs {
        assert!(!d.exists(), "{} removed on drop", d.display());
    }
}

/// A backend that accepts `n` connections and sends back (over the channel) the
/// first `expect` bytes of each one, then answers "ok\n".
fn capture_backend(n: usize, expect: usize) -> (SocketAddr, mpsc::Receiver<(usize, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for (i, conn) in listener.incoming().take(n).enumerate() {
            let mut s = conn.unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = vec![0u8; expect];
            s.read_exact(&mut buf).unwrap();
            s.write_all(b"ok\n").unwrap();
            tx.send((i, buf)).unwrap();
        }
    });
    (addr, rx)
}

const PROXY_V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

#[test]
fn haproxy_send_proxy_v2_to_backend() {
    let payload = b"a1 CAPABILITY\r\n";
    // v2 header for TCP over IPv4: 12 signature + 4 (ver/cmd, fam, len) + 12 addresses.
    let header_len = 16 + 12;
    let (backend, rx) = capture_backend(1, header_len + payload.len());
    let hap = Haproxy::start(&[(0, vec![backend], true)]);
    assert_eq!(hap.ports.len(), 1);
    assert_ne!(hap.port(0), 0);

    let mut c = TcpStream::connect(hap.addr(0)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(payload).unwrap();
    let mut reply = [0u8; 3];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ok\n");

    let (_, got) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(&got[..12], PROXY_V2_SIG);
    assert_eq!(got[12], 0x21, "version 2, PROXY command");
    assert_eq!(got[13], 0x11, "TCP over IPv4");
    assert_eq!(u16::from_be_bytes([got[14], got[15]]), 12);
    // Source = our client socket, destination = HAProxy's frontend.
    let client = c.local_addr().unwrap();
    assert_eq!(&got[16..20], &[127, 0, 0, 1]);
    assert_eq!(&got[20..24], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([got[24], got[25]]), client.port());
    assert_eq!(u16::from_be_bytes([got[26], got[27]]), hap.port(0));
    assert_eq!(&got[header_len..], payload);

    drop(c);
    assert!(hap.wait_for_log("fe0 be0/s0", PROMPTLY), "{}", hap.log());
}

#[test]
fn haproxy_round_robin_without_proxy_header_and_fixed_port() {
    let payload = b"hello\n";
    let (b1, rx1) = capture_backend(2, payload.len());
    let (b2, rx2) = capture_backend(2, payload.len());
    // A fixed listen port chosen by the caller, plus a second frontend on a free port.
    let fixed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (b3, rx3) = capture_backend(1, payload.len());
    let hap = Haproxy::start(&[(fixed, vec![b1, b2], false), (0, vec![b3], false)]);
    assert_eq!(hap.port(0), fixed);
    assert_ne!(hap.port(1), fixed);

    for _ in 0..4 {
        let mut c = TcpStream::connect(hap.addr(0)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(payload).unwrap();
        let mut reply = [0u8; 3];
        c.read_exact(&mut reply).unwrap();
    }
    for rx in [&rx1, &rx2] {
        for _ in 0..2 {
            let (_, got) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(got, payload, "no PROXY header without send-proxy-v2");
        }
    }
    let mut c = TcpStream::connect(hap.addr(1)).unwrap();
    c.write_all(payload).unwrap();
    assert_eq!(rx3.recv_timeout(Duration::from_secs(10)).unwrap().1, payload);

    // Drop kills haproxy: the frontend stops listening.
    let addr = hap.addr(0);
    drop(hap);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}
