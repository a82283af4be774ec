use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    StartTls,
    Auth { user: String, pass: Vec<u8> },
    Refuse(AuthReply),
    Close,
}

fn pump(p: &mut PreAuth) -> (String, Vec<Ev>) {
    let mut w = Vec::new();
    let mut ev = Vec::new();
    for _ in 0..100_000 {
        match p.poll() {
            Action::Write(b) => w.extend(b),
            Action::NeedInput => return (String::from_utf8_lossy(&w).into_owned(), ev),
            Action::StartTls => ev.push(Ev::StartTls),
            Action::Authenticate(c) => {
                ev.push(Ev::Auth { user: c.username.clone(), pass: c.password.expose().clone() })
            }
            Action::Refuse(r) => ev.push(Ev::Refuse(r)),
            Action::Close => {
                ev.push(Ev::Close);
                return (String::from_utf8_lossy(&w).into_owned(), ev);
            }
        }
    }
    panic!("poll loop did not settle");
}

#[test]
fn explore() {
    let mut p = PreAuth::new("mx", true, false);
    let _ = pump(&mut p);
    let mut line = b"a ID (\"name\" \"".to_vec();
    line.extend(vec![b'x'; 9000]);
    line.extend(b"\")\r\n");
    p.feed(&line);
    println!("{:?}", pump(&mut p));
    let mut p = PreAuth::new("mx", true, false);
    let _ = pump(&mut p);
    p.feed(b"a AUTHENTICATE PLAIN =\r\n");
    println!("{:?}", pump(&mut p));
    let mut p = PreAuth::new("mx", true, false);
    let _ = pump(&mut p);
    for l in [
        &b"a COMPRESS DEFLATE\r\n"[..],
        b"b ENABLE CONDSTORE\r\n",
        b"c IDLE\r\n",
        b"d NOOP\n",
        b"e NOOP\rf NOOP\r\n",
        b"g LOGIN \"u\0\" p\r\n",
    ] {
        p.feed(l);
        println!("{:?}", pump(&mut p));
    }
    let mut p = PreAuth::new("mx", true, false);
    let _ = pump(&mut p);
    p.feed(b"a FOO {10+}\r");
    println!("{:?}", pump(&mut p));
    p.feed(b"\nXYZ NOOP\r\n");
    println!("{:?}", pump(&mut p));
    let mut p = PreAuth::new("mx", true, false);
    let _ = pump(&mut p);
    p.feed(b"a LOGIN alice \"hunter2");
    let _ = pump(&mut p);
    println!("{p:?}");
}
