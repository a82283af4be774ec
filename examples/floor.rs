//! What one relayed GB must cost at least on this machine: the floor that `bench/run`
//! compares every proxy's CPU per GB with (issue 21, docs/performance.md "The floor").
//!
//! `cargo run --release --example floor -- [--mib N]` measures, each on one thread, with the
//! crypto library mailgate links (aws-lc-rs, through which rustls encrypts):
//!
//! * `aes`: TLS 1.3 record sealing with AES-256-GCM and AES-128-GCM, `N` MiB in records of
//!   16 KiB of plaintext (the TLS maximum, what mailgate's relay sends when it has data):
//!   aws-lc-rs's `TlsRecordSealingKey` (the key type rustls' aws-lc-rs provider seals TLS 1.3
//!   records with), sealed in place, so no copy; one 5-byte header as AAD, nonce = IV xor
//!   record number, as in TLS 1.3.
//! * `rustls_send`: the same, through a rustls server connection (the provider mailgate uses):
//!   64 KiB writes into `ServerConnection::writer()`, then `write_tls` into a reused buffer
//!   (what mailgate's relay does per read, minus the socket): AES plus rustls' own copy of
//!   the plaintext into its record buffer and its framing.
//! * `memcpy`: `copy_from_slice` of 64 MiB into another 64 MiB (a stand-in for one kernel
//!   copy between a socket buffer and user memory).
//! * `loopback_64k` and `loopback_16k`: one TCP stream over 127.0.0.1, one thread writing
//!   `N` MiB in writes of 64 KiB (16 KiB) and one reading into a buffer of that size: MB/s and
//!   each thread's CPU per GB (the writer pays the copy in and the loopback delivery, the
//!   reader the copy out and the ACKs: together one receive and one send of a relay).
//! * `syscall`: the fixed cost of one `read` + `write` pair (a non-blocking read that finds
//!   nothing, and a zero-length write, on a connected loopback socket).
//!
//! CPU time is each thread's own (`/proc/thread-self/schedstat`, ns), so time spent waiting
//! for a core on a loaded machine is not counted; the wall-clock MB/s is printed too.
//! Output: one JSON object on stdout (`bench/bench.py` reads it; its `floor()` docstring has
//! the formula).
//!
//! The crypto library picks its AES-GCM code from the CPU flags; `OPENSSL_ia32cap` (read by
//! aws-lc at start-up) masks them, e.g. `bench/run --floor-only --no-avx512`.

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, Nonce, TlsProtocolId, TlsRecordSealingKey};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const RECORD: usize = 16 * 1024;
const GB: f64 = 1e9;

/// CPU time of the calling thread, in seconds (scheduler run time, ns resolution).
fn thread_cpu() -> Res<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let ns: u64 = s.split_whitespace().next().ok_or("empty schedstat")?.parse()?;
    Ok(ns as f64 / 1e9)
}

/// Wall and CPU seconds of `f`, run on this thread.
fn timed(f: impl FnOnce() -> Res<()>) -> Res<(f64, f64)> {
    let (c0, t0) = (thread_cpu()?, Instant::now());
    f()?;
    Ok((t0.elapsed().as_secs_f64(), thread_cpu()? - c0))
}

/// `{"mb_s": .., "cpu_ms_per_gb": ..}` for `bytes` moved in `wall` / `cpu` seconds.
fn rate(bytes: u64, wall: f64, cpu: f64) -> serde_json::Value {
    let b = bytes as f64;
    serde_json::json!({
        "mb_s": round1(b / 1e6 / wall.max(1e-9)),
        "cpu_ms_per_gb": round1(cpu * 1000.0 * GB / b),
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Seals `mib` MiB as TLS 1.3 records of 16 KiB with `alg`, in place.
fn aes(alg: &'static Algorithm, mib: u64) -> Res<serde_json::Value> {
    let mut key = vec![0u8; alg.key_len()];
    let mut iv = [0u8; 12];
    aws_lc_rs::rand::fill(&mut key)?;
    aws_lc_rs::rand::fill(&mut iv)?;
    let mut sealer = TlsRecordSealingKey::new(alg, TlsProtocolId::TLS13, &key)?;
    // 16 KiB of data and the inner content type byte, as rustls seals a full record.
    let mut rec = vec![0x5au8; RECORD + 1];
    let mut seq = 0u64;
    let mut seal = |n: u64| -> Res<()> {
        for _ in 0..n {
            let mut nonce = iv;
            for (b, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
                *b ^= s;
            }
            let len = u16::try_from(rec.len() + alg.tag_len())?.to_be_bytes();
            let aad = [0x17, 0x03, 0x03, len[0], len[1]];
            let tag = sealer.seal_in_place_separate_tag(Nonce::from(&nonce), Aad::from(aad), &mut rec)?;
            std::hint::black_box(tag.as_ref());
            seq += 1;
        }
        Ok(())
    };
    let records = mib * 1024 * 1024 / RECORD as u64;
    seal(records / 8)?; // warm-up
    let (wall, cpu) = timed(|| seal(records))?;
    Ok(rate(records * RECORD as u64, wall, cpu))
}

/// The rustls send path: a TLS 1.3 server connection with only `suite`, fed 64 KiB at a
/// time, its records written into a reused buffer.
fn rustls_send(suite: rustls::SupportedCipherSuite, mib: u64) -> Res<serde_json::Value> {
    rustls_send_with(rustls::crypto::aws_lc_rs::default_provider(), suite, mib)
}

/// [`rustls_send`] with another provider's `suite` (ring's, beside aws-lc-rs).
fn rustls_send_with(
    mut provider: rustls::crypto::CryptoProvider,
    suite: rustls::SupportedCipherSuite,
    mib: u64,
) -> Res<serde_json::Value> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg))?;
    let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), ServerName::try_from("localhost")?)?;
    let mut wire = Vec::with_capacity(1 << 20);
    while server.is_handshaking() || client.is_handshaking() {
        wire.clear();
        client.write_tls(&mut wire)?;
        server.read_tls(&mut &wire[..])?;
        server.process_new_packets()?;
        wire.clear();
        server.write_tls(&mut wire)?;
        client.read_tls(&mut &wire[..])?;
        client.process_new_packets()?;
    }
    if server.negotiated_cipher_suite() != Some(suite) {
        return Err("rustls negotiated another suite".into());
    }
    let chunk = vec![0x5au8; 64 * 1024];
    let mut send = |n: u64| -> Res<()> {
        for _ in 0..n {
            server.writer().write_all(&chunk)?;
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire)?;
            }
            std::hint::black_box(&wire);
        }
        Ok(())
    };
    let chunks = mib * 1024 * 1024 / chunk.len() as u64;
    send(chunks / 8)?;
    let (wall, cpu) = timed(|| send(chunks))?;
    Ok(rate(chunks * chunk.len() as u64, wall, cpu))
}

fn memcpy(mib: u64) -> Res<serde_json::Value> {
    const BUF: usize = 64 * 1024 * 1024;
    let src = vec![0x5au8; BUF];
    let mut dst = vec![0u8; BUF];
    let reps = (mib * 1024 * 1024).div_ceil(BUF as u64);
    dst.copy_from_slice(&src); // warm-up, and the pages are touched
    let (wall, cpu) = timed(|| {
        for _ in 0..reps {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
        }
        Ok(())
    })?;
    Ok(rate(reps * BUF as u64, wall, cpu))
}

/// One loopback TCP stream of `mib` MiB in writes and reads of `chunk` bytes.
fn loopback(mib: u64, chunk: usize) -> Res<serde_json::Value> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let total = mib * 1024 * 1024;
    let writer = std::thread::spawn(move || -> Res<(f64, f64)> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0x5au8; chunk];
        let mut left = total;
        timed(|| {
            while left > 0 {
                let n = left.min(chunk as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            Ok(())
        })
    });
    let (mut s, _) = listener.accept()?;
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    let (wall, cpu) = timed(|| {
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(())
    })?;
    let (_, wcpu) = writer.join().map_err(|_| "writer thread panicked")??;
    if got != total {
        return Err(format!("loopback: read {got} of {total} bytes").into());
    }
    let gb = got as f64 / GB;
    Ok(serde_json::json!({
        "chunk": chunk,
        "mb_s": round1(got as f64 / 1e6 / wall),
        "writer_cpu_ms_per_gb": round1(wcpu * 1000.0 / gb),
        "reader_cpu_ms_per_gb": round1(cpu * 1000.0 / gb),
        "cpu_ms_per_gb": round1((wcpu + cpu) * 1000.0 / gb),
    }))
}

/// Nanoseconds for one read + one write syscall that move nothing.
fn syscall_pair() -> Res<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut a = TcpStream::connect(listener.local_addr()?)?;
    let (mut b, _) = listener.accept()?;
    b.set_nonblocking(true)?;
    let mut buf = [0u8; 64];
    let n = 200_000u32;
    let (_, cpu) = timed(|| {
        for _ in 0..n {
            match b.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return Err(format!("expected WouldBlock, got {other:?}").into()),
            }
            std::hint::black_box(a.write(&[])?);
        }
        Ok(())
    })?;
    Ok(cpu * 1e9 / f64::from(n))
}

fn main() -> Res<()> {
    let mut mib = 1024u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().ok_or("--mib N")?.parse()?,
            _ => return Err(format!("unknown argument {a} (usage: floor [--mib N])").into()),
        }
    }
    let net_mib = mib.max(256);
    let out = serde_json::json!({
        "mib": mib,
        "record_bytes": RECORD,
        "crypto": "aws-lc-rs (rustls aws_lc_rs provider)",
        "aes": {
            "TLS_AES_256_GCM_SHA384": aes(&AES_256_GCM, mib)?,
            "TLS_AES_128_GCM_SHA256": aes(&AES_128_GCM, mib)?,
        },
        "rustls_send": {
            "TLS_AES_256_GCM_SHA384": rustls_send(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384, mib)?,
            "TLS_AES_128_GCM_SHA256": rustls_send(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256, mib)?,
        },
        // rustls' ring provider (ring 0.17): not what mailgate links, measured for comparison.
        // ring ignores OPENSSL_ia32cap: it picks its AES-GCM code from the CPU as it is.
        "rustls_send_ring": {
            "TLS_AES_256_GCM_SHA384": rustls_send_with(rustls::crypto::ring::default_provider(), rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384, mib)?,
            "TLS_AES_128_GCM_SHA256": rustls_send_with(rustls::crypto::ring::default_provider(), rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256, mib)?,
        },
        "memcpy": memcpy(mib)?,
        "loopback_64k": loopback(net_mib, 64 * 1024)?,
        "loopback_16k": loopback(net_mib, RECORD)?,
        "syscall_pair_ns": round1(syscall_pair()?),
    });
    println!("{out}");
    Ok(())
}
