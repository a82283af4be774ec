//! Tests of the restricted-session IMAP filter: bytes in, bytes out, no sockets.

use super::*;
use crate::proto::chunked;
use crate::proto::testing::split_at;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn read_only() -> Restriction {
    Restriction { read_only: true, folders: None }
}

fn folders(list: &str) -> Restriction {
    Restriction { read_only: false, folders: Some(FolderSet::parse(list, b'/').unwrap()) }
}

/// What the command filter produced: bytes for upstream, bytes for the client, closed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Run {
    upstream: Vec<u8>,
    client: Vec<u8>,
    closed: bool,
}

impl Run {
    fn up(&self) -> String {
        String::from_utf8_lossy(&self.upstream).into_owned()
    }
    fn cl(&self) -> String {
        String::from_utf8_lossy(&self.client).into_owned()
    }
}

/// Polls the command filter until it needs input.
fn pump(f: &mut CommandFilter, run: &mut Run) {
    for _ in 0..1_000_000 {
        match f.next() {
            Next::Write(b) => {
                assert!(!b.is_empty(), "empty write");
                run.client.extend(b);
            }
            Next::Event(ToUpstream(b)) => {
                assert!(!b.is_empty(), "empty forward");
                run.upstream.extend(b);
            }
            Next::NeedInput => return,
            Next::Close => {
                run.closed = true;
                return;
            }
            Next::StartTls => panic!("StartTls from the filter"),
        }
    }
    panic!("next() did not settle");
}

/// Runs `chunks` through a filter whose upstream accepts every literal and IDLE at once
/// (the `+` comes as soon as the filter waits for it).
fn run_chunks(rules: &Restriction, chunks: &[Vec<u8>]) -> Run {
    let mut f = CommandFilter::new(rules.clone());
    let mut run = Run::default();
    for c in chunks {
        f.feed(c);
        loop {
            pump(&mut f, &mut run);
            if run.closed || !f.waiting() {
                break;
            }
            f.upstream_continuation();
        }
        if run.closed {
            break;
        }
    }
    run
}

impl CommandFilter {
    /// Whether the filter waits for upstream's `+`.
    fn waiting(&self) -> bool {
        matches!(self.state, State::AwaitContinue { .. } | State::AwaitIdle { .. })
    }
}

fn run(rules: &Restriction, bytes: &[u8]) -> Run {
    run_chunks(rules, &[bytes.to_vec()])
}

/// Every way of cutting `bytes` in two, byte by byte, and in 7-byte reads gives the same
/// result as one read; returns it.
fn split_invariant(rules: &Restriction, bytes: &[u8]) -> Run {
    let whole = run(rules, bytes);
    let bytewise: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
    assert_eq!(run_chunks(rules, &bytewise), whole, "bytewise: {:?}", String::from_utf8_lossy(bytes));
    let by7: Vec<Vec<u8>> = bytes.chunks(7).map(<[u8]>::to_vec).collect();
    assert_eq!(run_chunks(rules, &by7), whole, "by 7");
    for cut in 0..=bytes.len() {
        assert_eq!(run_chunks(rules, &split_at(bytes, [cut].into_iter())), whole, "cut at {cut}");
    }
    whole
}

const REFUSED_RO: &[&str] = &[
    "STORE 1 +FLAGS (\\Deleted)",
    "COPY 1:* Archive",
    "MOVE 1 Archive",
    "EXPUNGE",
    "CREATE New",
    "DELETE Old",
    "RENAME Old New",
    "SUBSCRIBE Folder",
    "UNSUBSCRIBE Folder",
    "SETACL Folder bob lrs",
    "DELETEACL Folder bob",
    "SETMETADATA INBOX (/private/comment \"x\")",
    "SETQUOTA \"\" (STORAGE 512)",
    "UID STORE 1 +FLAGS (\\Seen)",
    "UID COPY 1:* Archive",
    "UID MOVE 1 Archive",
    "UID EXPUNGE 1:5",
    "APPEND INBOX (\\Seen) {5+}\r\nhello",
];

// ---------------------------------------------------------------------------------------
// Read-only
// ---------------------------------------------------------------------------------------

#[test]
fn read_only_refuses_every_writing_command_and_its_uid_form() {
    for (i, cmd) in REFUSED_RO.iter().enumerate() {
        let input = format!("w{i} {cmd}\r\n");
        let r = split_invariant(&read_only(), input.as_bytes());
        assert_eq!(r.up(), "", "{cmd}");
        assert_eq!(r.cl(), format!("w{i} NO [NOPERM] Not allowed: this app password is read-only\r\n"), "{cmd}");
    }
}

#[test]
fn read_only_refusals_pipelined_between_passing_commands() {
    let mut input = String::new();
    let mut want_up = String::new();
    let mut want_cl = String::new();
    for (i, cmd) in REFUSED_RO.iter().enumerate() {
        let pass = format!("p{i} NOOP\r\n");
        input.push_str(&pass);
        want_up.push_str(&pass);
        input.push_str(&format!("w{i} {cmd}\r\n"));
        want_cl.push_str(&format!("w{i} NO [NOPERM] Not allowed: this app password is read-only\r\n"));
    }
    input.push_str("z FETCH 1:* (FLAGS BODY.PEEK[])\r\n");
    want_up.push_str("z FETCH 1:* (FLAGS BODY.PEEK[])\r\n");
    let r = split_invariant(&read_only(), input.as_bytes());
    assert_eq!(r.up(), want_up);
    assert_eq!(r.cl(), want_cl);
}

#[test]
fn refused_command_with_synchronizing_literal_gets_no_instead_of_continuation() {
    for cmd in ["APPEND INBOX {5}", "APPEND {5}", "COPY 1 {7}", "UID MOVE 1 {7}", "CREATE {3}", "RENAME {3}"] {
        let mut f = CommandFilter::new(read_only());
        let mut r = Run::default();
        f.feed(format!("a {cmd}\r\n").as_bytes());
        pump(&mut f, &mut r);
        assert_eq!(r.cl(), "a NO [NOPERM] Not allowed: this app password is read-only\r\n", "{cmd}");
        assert!(!f.waiting());
        // The client does not send the literal; its next command is read as one.
        f.feed(b"b NOOP\r\n");
        pump(&mut f, &mut r);
        assert_eq!(r.up(), "b NOOP\r\n", "{cmd}");
    }
}

#[test]
fn refused_append_with_literal_plus_drops_the_data_without_reading_it_as_commands() {
    // LITERAL+ APPEND (issue 20): the message arrives at once; it looks like commands.
    let msg = "x DELETE INBOX\r\ny STORE 1 +FLAGS (\\Deleted)\r\n";
    let input = format!("a APPEND INBOX {{{}+}}\r\n{msg} {{3+}}\r\nabc\r\nb NOOP\r\n", msg.len());
    let r = split_invariant(&read_only(), input.as_bytes());
    assert_eq!(r.cl(), "a NO [NOPERM] Not allowed: this app password is read-only\r\n");
    assert_eq!(r.up(), "b NOOP\r\n");
}

#[test]
fn select_becomes_examine_byte_exact() {
    for (input, want) in [
        ("a1 SELECT INBOX\r\n", "a1 EXAMINE INBOX\r\n"),
        ("a1 select \"Shared/Tickets\"\r\n", "a1 EXAMINE \"Shared/Tickets\"\r\n"),
        ("x.y SeLeCt \"a \\\"q\\\" b\"\r\n", "x.y EXAMINE \"a \\\"q\\\" b\"\r\n"),
        ("a1 SELECT {5+}\r\nINBOX\r\n", "a1 EXAMINE {5+}\r\nINBOX\r\n"),
        ("a1 SELECT {5}\r\nINBOX\r\n", "a1 EXAMINE {5}\r\nINBOX\r\n"),
        ("a1 EXAMINE INBOX\r\n", "a1 EXAMINE INBOX\r\n"),
    ] {
        let r = split_invariant(&read_only(), input.as_bytes());
        assert_eq!(r.up(), want, "{input:?}");
        assert_eq!(r.cl(), "");
    }
    // Folder-limited and read-only: rewritten after the folder check.
    let both = Restriction { read_only: true, folders: folders("INBOX").folders };
    let r = split_invariant(&both, b"s SELECT {5+}\r\ninbox\r\nt SELECT Secret\r\n");
    assert_eq!(r.up(), "s EXAMINE {5+}\r\ninbox\r\n");
    assert_eq!(r.cl(), "t NO [NONEXISTENT] Mailbox doesn't exist\r\n");
}

#[test]
fn select_with_synchronizing_literal_waits_for_upstream_continuation() {
    let mut f = CommandFilter::new(read_only());
    let mut r = Run::default();
    f.feed(b"a SELECT {5}\r\nINBOX\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "a EXAMINE {5}\r\n");
    assert!(f.waiting());
    f.upstream_continuation();
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "a EXAMINE {5}\r\nINBOX\r\n");
}

const PASSING: &[&str] = &[
    "c1 CAPABILITY\r\n",
    "c2 NOOP\r\n",
    "c3 LIST \"\" \"*\"\r\n",
    "c4 LSUB \"\" %\r\n",
    "c5 STATUS INBOX (MESSAGES UNSEEN UIDNEXT)\r\n",
    "c6 EXAMINE INBOX\r\n",
    "c7 FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER])\r\n",
    "c8 UID FETCH 1:* (UID BODY[])\r\n",
    "c9 FETCH 1 BODY[]\r\n",
    "c10 UID SEARCH UNSEEN\r\n",
    "c11 SEARCH CHARSET UTF-8 TEXT {4}\r\ntest\r\n",
    "c12 SEARCH TEXT {4+}\r\ntest SUBJECT {3}\r\nabc\r\n",
    "c13 IDLE\r\nDONE\r\n",
    "c14 CHECK\r\n",
    "c15 UNSELECT\r\n",
    "c16 ID (\"name\" \"x\")\r\n",
    "c17 GETQUOTAROOT INBOX\r\n",
    "c18 CLOSE\r\n",
    "c19 ENABLE QRESYNC\r\n",
    "c20 LOGOUT\r\n",
];

#[test]
fn passing_commands_are_forwarded_byte_exact() {
    for rules in [read_only(), folders("INBOX,Shared/*"), Restriction::default()] {
        let all: String = PASSING.concat();
        let r = split_invariant(&rules, all.as_bytes());
        assert_eq!(r.up(), all, "{rules:?}");
        assert_eq!(r.cl(), "");
    }
}

#[test]
fn compress_and_login_commands_are_refused() {
    for rules in [read_only(), folders("INBOX")] {
        let r = split_invariant(
            &rules,
            b"a COMPRESS DEFLATE\r\nb AUTHENTICATE PLAIN\r\nc LOGIN u p\r\nd STARTTLS\r\ne AUTHENTICATE PLAIN {4}\r\n",
        );
        assert_eq!(r.up(), "");
        assert_eq!(
            r.cl(),
            "a NO [CANNOT] COMPRESS is not available on this connection\r\nb BAD Already logged in\r\n\
             c BAD Already logged in\r\nd BAD Already logged in\r\ne BAD Already logged in\r\n"
        );
    }
}

#[test]
fn unparsable_commands_are_bad_and_never_forwarded() {
    let r = split_invariant(
        &read_only(),
        b"garbage\r\n\r\na FOO bar\r\nb FETCH\r\nc SEARCH TEXT {3+}\r\nabc ))) {5+}\r\nd DEL\r\ne NOOP\r\n(x NOOP\r\n",
    );
    // `c`: its first part was valid and went; the invalid rest is cut with a CRLF, and the
    // literal announced on it is dropped.
    assert_eq!(r.up(), "c SEARCH TEXT {3+}\r\nabc\r\ne NOOP\r\n");
    assert_eq!(
        r.cl(),
        "garbage BAD Invalid command\r\na BAD Invalid command\r\nb BAD Invalid command\r\n* BAD Invalid command\r\n"
    );
}

#[test]
fn unknown_command_with_literal_plus_is_dropped_whole() {
    let r = split_invariant(&folders("INBOX"), b"a XYZZY {16+}\r\nb DELETE Secret\r\n\r\nc NOOP\r\n");
    assert_eq!(r.up(), "c NOOP\r\n");
    assert_eq!(r.cl(), "a BAD Invalid command\r\n");
}

#[test]
fn idle_passes_and_done_waits_for_upstream() {
    let mut f = CommandFilter::new(read_only());
    let mut r = Run::default();
    f.feed(b"i IDLE\r\nDONE\r\nn NOOP\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "i IDLE\r\n");
    assert!(f.waiting());
    f.upstream_continuation();
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "i IDLE\r\nDONE\r\nn NOOP\r\n");
}

#[test]
fn a_command_instead_of_done_ends_idle_and_is_filtered() {
    let r = split_invariant(&read_only(), b"i IDLE\r\nx DELETE INBOX\r\ny NOOP\r\n");
    assert_eq!(r.up(), "i IDLE\r\nDONE\r\ny NOOP\r\n");
    assert_eq!(r.cl(), "x NO [NOPERM] Not allowed: this app password is read-only\r\n");
}

#[test]
fn refused_idle_means_the_next_line_is_a_command() {
    let mut f = CommandFilter::new(read_only());
    let mut r = Run::default();
    f.feed(b"i IDLE\r\n");
    pump(&mut f, &mut r);
    f.upstream_tagged(b"i");
    f.feed(b"DONE\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "i IDLE\r\n");
    // `DONE` is a valid tag: the line is an invalid command.
    assert_eq!(r.cl(), "DONE BAD Invalid command\r\n");
}

/// Upstream refuses a literal (too big) with a tagged NO: the client does not send it, and
/// what it sends next must be filtered, not passed as literal data.
#[test]
fn literal_refused_by_upstream_makes_the_next_bytes_commands() {
    let mut f = CommandFilter::new(folders("INBOX"));
    let mut r = Run::default();
    f.feed(b"a APPEND INBOX {999999999}\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "a APPEND INBOX {999999999}\r\n");
    assert!(f.waiting());
    f.upstream_tagged(b"a");
    f.feed(b"b DELETE Secret\r\nc SELECT Secret\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "a APPEND INBOX {999999999}\r\n");
    assert_eq!(r.cl(), "b NO [NONEXISTENT] Mailbox doesn't exist\r\nc NO [NONEXISTENT] Mailbox doesn't exist\r\n");
}

/// A tag still in use upstream would make upstream's reply ambiguous (which command did it
/// end?), so a second command with it is refused.
#[test]
fn a_tag_in_use_upstream_is_refused() {
    let mut f = CommandFilter::new(folders("INBOX"));
    let mut r = Run::default();
    f.feed(b"x NOOP\r\nx APPEND INBOX {10}\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "x NOOP\r\n");
    assert_eq!(r.cl(), "x BAD Tag is in use by a command in progress\r\n");
    assert!(!f.waiting());
    f.upstream_tagged(b"x");
    f.feed(b"x NOOP\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "x NOOP\r\nx NOOP\r\n");
}

#[test]
fn too_long_lines_are_refused_and_their_literal_dropped() {
    let mut input = b"a SEARCH TEXT \"".to_vec();
    input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
    input.extend_from_slice(b"\" {5+}\r\nb DEL\r\nc NOOP\r\n");
    let whole = run(&read_only(), &input);
    let by_chunks = run_chunks(&read_only(), &input.chunks(1000).map(<[u8]>::to_vec).collect::<Vec<_>>());
    assert_eq!(whole, by_chunks);
    assert_eq!(whole.up(), "c NOOP\r\n");
    assert_eq!(whole.cl(), "* BAD [TOOBIG] Command line too long\r\n");
}

#[test]
fn a_client_flooding_before_the_continuation_is_closed() {
    let mut f = CommandFilter::new(read_only());
    let mut r = Run::default();
    f.feed(b"a SEARCH TEXT {5}\r\n");
    pump(&mut f, &mut r);
    f.feed(&vec![b'x'; MAX_PENDING + 1]);
    pump(&mut f, &mut r);
    assert!(r.closed);
    assert!(r.cl().starts_with("* BYE "));
}

// ---------------------------------------------------------------------------------------
// Folders
// ---------------------------------------------------------------------------------------

#[test]
fn folder_set_matching() {
    let s = FolderSet::parse("INBOX, Shared/Tickets ,Shared/%,Archive/*", b'/').unwrap();
    for ok in ["INBOX", "inbox", "Inbox", "Shared/Tickets", "Shared/Other", "Archive/2024", "Archive/2024/01"] {
        assert!(s.allows(ok.as_bytes()), "{ok}");
    }
    for no in [
        "INBOX/Sub",
        "Shared",
        "Shared/a/b",
        "shared/Tickets",
        "Archive",
        "Secret",
        "",
        "/INBOX",
        "Shared//x",
        "Shared/Tickets/",
        "Archive/../Secret",
        "Shared/.",
        "Archive/x\ny",
    ] {
        assert!(!s.allows(no.as_bytes()), "{no:?}");
    }
    let star = FolderSet::new(["*"], b'.').unwrap();
    assert!(star.allows(b"a.b.c") && !star.allows(b"a..b"));
    let inbox_tree = FolderSet::new(["INBOX/*"], b'/').unwrap();
    assert!(inbox_tree.allows(b"inbox/Sub") && !inbox_tree.allows(b"INBOX"));
    let dot = FolderSet::new(["INBOX.%"], b'.').unwrap();
    assert!(dot.allows(b"INBOX.Sent") && !dot.allows(b"INBOX.Sent.x") && !dot.allows(b"INBOX/Sent"));
    assert_eq!(FolderSet::parse(" , ", b'/'), Err(FolderSetError::Empty));
    assert!(matches!(FolderSet::new(["a\tb"], b'/'), Err(FolderSetError::Invalid(_))));
    assert_eq!(FolderSet::new(["a"], b'*'), Err(FolderSetError::Delimiter));
}

const OUTSIDE: &[&str] = &[
    "SELECT Secret",
    "EXAMINE \"Secret\"",
    "STATUS Secret (MESSAGES)",
    "APPEND Secret {5+}\r\nhello",
    "APPEND \"Secret\" (\\Seen) {5+}\r\nhello",
    "COPY 1 Secret",
    "MOVE 1 Secret",
    "UID COPY 1 Secret",
    "UID MOVE 1 Secret",
    "CREATE Secret",
    "DELETE Secret",
    "RENAME INBOX Secret",
    "RENAME Secret INBOX",
    "SUBSCRIBE Secret",
    "UNSUBSCRIBE Secret",
    "GETQUOTAROOT Secret",
    "SELECT {6+}\r\nSecret",
    "SELECT Shared/Tickets/Sub",
    "SELECT shared/tickets",
];

#[test]
fn commands_on_folders_outside_the_set_are_nonexistent() {
    let rules = folders("INBOX,Shared/Tickets");
    for (i, cmd) in OUTSIDE.iter().enumerate() {
        let input = format!("f{i} {cmd}\r\n");
        let r = split_invariant(&rules, input.as_bytes());
        assert_eq!(r.up(), "", "{cmd}");
        assert_eq!(r.cl(), format!("f{i} NO [NONEXISTENT] Mailbox doesn't exist\r\n"), "{cmd}");
    }
}

#[test]
fn commands_on_folders_inside_the_set_pass_byte_exact() {
    let rules = folders("INBOX,Shared/Tickets");
    let inside = [
        "a SELECT \"Shared/Tickets\"\r\n",
        "b STATUS inbox (UNSEEN)\r\n",
        "c APPEND Shared/Tickets {5}\r\nhello\r\n",
        "d APPEND {5+}\r\nINBOX (\\Seen) {3}\r\nabc\r\n",
        "e UID COPY 1:* \"Shared/Tickets\"\r\n",
        "f MOVE 2 INBOX\r\n",
        "g RENAME INBOX Shared/Tickets\r\n",
        "h SUBSCRIBE {14+}\r\nShared/Tickets\r\n",
        "i LIST \"\" *\r\n",
    ]
    .concat();
    let r = split_invariant(&rules, inside.as_bytes());
    assert_eq!(r.up(), inside);
    assert_eq!(r.cl(), "");
}

/// A mailbox name in a synchronizing literal is needed before upstream may see the
/// command: the filter sends the `+` itself, and forwards the name as a quoted string.
#[test]
fn mailbox_in_synchronizing_literal_is_read_by_the_filter_and_quoted() {
    let rules = folders("INBOX,Shared/*");
    let r = split_invariant(
        &rules,
        b"a SELECT {5}\r\ninbox\r\nb RENAME {5}\r\nINBOX {8}\r\nShared/\"\r\n\
          c APPEND {5}\r\nINBOX (\\Seen) {3}\r\nabc\r\nd SELECT {6}\r\nSecret\r\ne NOOP\r\n",
    );
    assert_eq!(
        r.up(),
        "a SELECT \"inbox\"\r\nb RENAME \"INBOX\" \"Shared/\\\"\"\r\nc APPEND \"INBOX\" (\\Seen) {3}\r\nabc\r\ne NOOP\r\n"
    );
    let plus = "+ Ready for literal data\r\n";
    assert_eq!(r.cl(), format!("{plus}{plus}{plus}{plus}{plus}d NO [NONEXISTENT] Mailbox doesn't exist\r\n"));
    // Read-only too: SELECT becomes EXAMINE after the name is quoted.
    let both = Restriction { read_only: true, ..folders("INBOX") };
    assert_eq!(split_invariant(&both, b"s select {5}\r\nINBOX\r\n").up(), "s EXAMINE \"INBOX\"\r\n");
    // The filter's `+` only once the client waits for it; nothing upstream before the name.
    let mut f = CommandFilter::new(rules);
    let mut run = Run::default();
    f.feed(b"x STATUS {14}\r\n");
    pump(&mut f, &mut run);
    assert_eq!((run.up(), run.cl()), (String::new(), plus.to_string()));
    assert!(!f.waiting());
    f.feed(b"Shared/Tickets (UNSEEN)\r\n");
    pump(&mut f, &mut run);
    assert_eq!(run.up(), "x STATUS \"Shared/Tickets\" (UNSEEN)\r\n");
}

#[test]
fn a_mailbox_literal_that_cannot_be_quoted_is_refused() {
    let rules = folders("*");
    let r = split_invariant(&rules, b"a SELECT {3}\r\na\xe9b\r\nb NOOP\r\n");
    assert_eq!(r.up(), "b NOOP\r\n");
    assert_eq!(r.cl(), "+ Ready for literal data\r\na NO [CANNOT] Mailbox name not valid as a quoted string\r\n");
}

#[test]
fn notify_and_multi_mailbox_search_are_refused() {
    let rules = folders("INBOX");
    let r = split_invariant(
        &rules,
        b"a NOTIFY SET (selected MessageNew)\r\nb ESEARCH IN (mailboxes Secret) ALL\r\n\
          c SEARCH RETURN (ALL) IN (subtree Secret) ALL\r\nd GETACL Secret\r\ne MYRIGHTS Secret\r\n",
    );
    assert_eq!(r.up(), "");
    assert_eq!(
        r.cl(),
        "a NO [NOPERM] Not available for this app password\r\nb NO [NOPERM] Not available for this app password\r\n\
         c BAD Invalid command\r\nd BAD Invalid command\r\ne BAD Invalid command\r\n"
    );
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

/// What the response filter produced: bytes for the client and the events in order.
fn respond_chunks(rules: &Restriction, chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<Seen>) {
    respond_chunks_via(rules, chunks, false)
}

/// `direct`: as the relay does it, the bytes the filter says may pass untouched
/// ([`ResponseFilter::passthrough`]) go straight to the output, the rest is fed.
fn respond_chunks_via(rules: &Restriction, chunks: &[Vec<u8>], direct: bool) -> (Vec<u8>, Vec<Seen>) {
    let mut f = ResponseFilter::new(rules.clone());
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for c in chunks {
        let mut c = c.as_slice();
        if direct {
            let n = usize::try_from(f.passthrough()).unwrap_or(usize::MAX).min(c.len());
            out.extend_from_slice(&c[..n]);
            f.passed(n as u64);
            c = &c[n..];
        }
        f.feed(c);
        for _ in 0..1_000_000 {
            match f.next() {
                Next::Write(b) => {
                    assert!(!b.is_empty());
                    out.extend(b);
                }
                Next::Event(s) => seen.push(s),
                Next::NeedInput => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (out, seen)
}

fn respond_split_invariant(rules: &Restriction, bytes: &[u8]) -> (String, Vec<Seen>) {
    let whole = respond_chunks(rules, &[bytes.to_vec()]);
    let bytewise: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
    assert_eq!(respond_chunks(rules, &bytewise), whole, "bytewise");
    assert_eq!(respond_chunks_via(rules, &bytewise, true), whole, "bytewise, literal data passed directly");
    for cut in 0..=bytes.len() {
        let chunks = split_at(bytes, [cut].into_iter());
        assert_eq!(respond_chunks(rules, &chunks), whole, "cut at {cut}");
        assert_eq!(respond_chunks_via(rules, &chunks, true), whole, "cut at {cut}, literal data passed directly");
    }
    (String::from_utf8_lossy(&whole.0).into_owned(), whole.1)
}

#[test]
fn list_lsub_and_status_responses_name_only_folders_of_the_set() {
    let rules = folders("INBOX,Shared/Tickets");
    let input = "* LIST (\\HasNoChildren) \"/\" INBOX\r\n\
                 * LIST (\\HasChildren) \"/\" Secret\r\n\
                 * LIST (\\HasNoChildren) \"/\" \"Shared/Tickets\"\r\n\
                 * LIST () \"/\" {6}\r\nSecret\r\n\
                 * LIST () \"/\" {14}\r\nShared/Tickets\r\n\
                 * STATUS Secret (MESSAGES 3)\r\n\
                 * STATUS \"Shared/Tickets\" (MESSAGES 2)\r\n\
                 * LSUB () \"/\" Secret/Sub\r\n\
                 * list () \"/\" secret\r\n\
                 * LIST (\\Noselect) \"/\" \"\"\r\n\
                 * LIST (garbage\r\n\
                 a OK List completed\r\n";
    let (out, seen) = respond_split_invariant(&rules, input.as_bytes());
    assert_eq!(
        out,
        "* LIST (\\HasNoChildren) \"/\" INBOX\r\n\
         * LIST (\\HasNoChildren) \"/\" \"Shared/Tickets\"\r\n\
         * LIST () \"/\" {14}\r\nShared/Tickets\r\n\
         * STATUS \"Shared/Tickets\" (MESSAGES 2)\r\n\
         * LIST (\\Noselect) \"/\" \"\"\r\n\
         a OK List completed\r\n"
    );
    assert_eq!(seen, vec![Seen::Tagged(b"a".to_vec())]);
}

#[test]
fn other_responses_pass_byte_exact_with_literals() {
    let input = "* 1 FETCH (UID 7 BODY[] {28}\r\n* LIST () \"/\" Secret\r\na OK\r\n FLAGS (\\Seen))\r\n\
                 * SEARCH 1 2 3\r\n* 2 EXISTS\r\n* OK [UIDNEXT 9] Predicted next UID\r\n\
                 + idling\r\n* VANISHED (EARLIER) 1:3\r\nb NO [TRYCREATE] Mailbox doesn't exist\r\n";
    for rules in [folders("INBOX"), read_only()] {
        let (out, seen) = respond_split_invariant(&rules, input.as_bytes());
        assert_eq!(out, input);
        assert_eq!(seen, vec![Seen::Continuation, Seen::Tagged(b"b".to_vec())]);
    }
}

#[test]
fn injected_answers_go_between_responses() {
    let mut f = ResponseFilter::new(read_only());
    let mut out = Vec::new();
    f.feed(b"* 1 FETCH (BODY[] {10}\r\n01234");
    while let Next::Write(b) = f.next() {
        out.extend(b);
    }
    f.inject(b"x NO [NOPERM] no\r\n");
    assert!(matches!(f.next(), Next::NeedInput));
    f.feed(b"56789)\r\n* 3 EXISTS\r\n");
    while let Next::Write(b) = f.next() {
        out.extend(b);
    }
    assert_eq!(
        String::from_utf8_lossy(&out),
        "* 1 FETCH (BODY[] {10}\r\n0123456789)\r\nx NO [NOPERM] no\r\n* 3 EXISTS\r\n"
    );
}

#[test]
fn capabilities_are_filtered() {
    let caps = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES \
                THREAD=REFS MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS \
                LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH \
                LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY STATUS=SIZE SAVEDATE LITERAL+ \
                NOTIFY SPECIAL-USE COMPRESS=DEFLATE QUOTA ACL RIGHTS=texk METADATA URLAUTH";
    assert_eq!(
        filter_capabilities(caps, &read_only()),
        "IMAP4rev1 ID IDLE SORT THREAD=REFERENCES THREAD=REFS UNSELECT CHILDREN LITERAL+ SPECIAL-USE QUOTA"
    );
    assert_eq!(
        filter_capabilities(caps, &folders("INBOX")),
        "IMAP4rev1 ID IDLE SORT THREAD=REFERENCES THREAD=REFS UNSELECT CHILDREN UIDPLUS MOVE LITERAL+ SPECIAL-USE QUOTA"
    );
    let input = format!(
        "* CAPABILITY {caps}\r\n* OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] Ready\r\n\
         t OK [CAPABILITY IMAP4rev1 NOTIFY MOVE] Done\r\n* 1 FETCH (FLAGS (COMPRESS=DEFLATE))\r\n"
    );
    let (out, _) = respond_split_invariant(&read_only(), input.as_bytes());
    assert_eq!(
        out,
        "* CAPABILITY IMAP4rev1 ID IDLE SORT THREAD=REFERENCES THREAD=REFS UNSELECT CHILDREN LITERAL+ SPECIAL-USE QUOTA\r\n\
         * OK [CAPABILITY IMAP4rev1 IDLE] Ready\r\nt OK [CAPABILITY IMAP4rev1] Done\r\n\
         * 1 FETCH (FLAGS (COMPRESS=DEFLATE))\r\n"
    );
    assert!(!out.contains("COMPRESS=DEFLATE]"));
}

// ---------------------------------------------------------------------------------------
// Corpus and properties
// ---------------------------------------------------------------------------------------

/// The sessions in `fuzz/corpus/imap_filter/` under each restriction: every cut gives the
/// same result, nothing refused reaches upstream.
#[test]
fn corpus_replays() {
    let cases = crate::proto::corpus_cuts("imap_filter");
    assert!(cases.len() >= 9, "corpus missing: {}", cases.len());
    let mut reference: std::collections::HashMap<(String, usize), Run> = std::collections::HashMap::new();
    for (name, chunks) in cases {
        let file = name.rsplit_once(' ').map(|(f, _)| f.to_string()).unwrap_or_default();
        for (i, rules) in [read_only(), folders("INBOX,Shared/%"), Restriction { read_only: true, ..folders("INBOX") }]
            .iter()
            .enumerate()
        {
            let r = run_chunks(rules, &chunks);
            assert_forwarded_allowed(rules, &r.upstream);
            let key = (file.clone(), i);
            match reference.get(&key) {
                Some(first) => assert_eq!(&r, first, "{name} differs"),
                None => {
                    reference.insert(key, r);
                }
            }
        }
    }
}

/// Reads what was forwarded as IMAP commands (with the `+` given at once) and checks that
/// the filter's own verdict on each is Pass and no refused name is among them. Bytes that
/// are not a whole command (a cut command's CRLF, `DONE`) are skipped line by line.
fn assert_forwarded_allowed(rules: &Restriction, mut up: &[u8]) {
    while !up.is_empty() {
        match CommandCodec::default().decode(up) {
            Ok((rest, cmd)) => {
                let verdict = decide(&cmd.body, rules);
                assert!(matches!(verdict, Verdict::Pass { examine: false }), "forwarded {:?}: {verdict:?}", cmd.body);
                let name = cmd.body.name().to_ascii_uppercase();
                if rules.read_only {
                    assert!(!READ_ONLY_WORDS.contains(&name.as_bytes()), "forwarded {name}");
                    assert_ne!(name, "SELECT");
                }
                up = rest;
            }
            Err(_) => match find_crlf(up) {
                Some(pos) => {
                    let line = &up[..pos];
                    // What is skipped must not be a refused command that failed to parse.
                    let word = line.split(|b| *b == b' ').nth(1).unwrap_or_default().to_ascii_uppercase();
                    assert!(
                        !READ_ONLY_WORDS.contains(&word.as_slice()) || !rules.read_only,
                        "unparsed {:?}",
                        String::from_utf8_lossy(line)
                    );
                    up = &up[pos + 2..];
                }
                None => break,
            },
        }
    }
}

/// Mailbox names of the property tests: the allowed ones never contain a forbidden one.
const ALLOWED: &[&str] = &["INBOX", "inbox", "Shared/Tickets", "Shared/Sales"];
const FORBIDDEN: &[&str] = &["Secret", "Private/Secret", "Shared/Secret/Deep", "Shared", "xSecretx"];

/// `name` as an atom, quoted, or in a literal (non-synchronizing or synchronizing); and
/// how the filter forwards it (a synchronizing literal it asked for itself, quoted).
fn mailbox_arg(name: &str, form: u8) -> (String, String) {
    let arg = match form % 4 {
        0 if !name.contains('/') || form > 100 => name.to_string(),
        2 => format!("{{{}+}}\r\n{name}", name.len()),
        3 => format!("{{{}}}\r\n{name}", name.len()),
        _ => format!("\"{name}\""),
    };
    let forwarded = if form % 4 == 3 { format!("\"{name}\"") } else { arg.clone() };
    (arg, forwarded)
}

/// A generated command: its bytes, and whether it must pass (with SELECT as EXAMINE).
fn command(i: usize, kind: u8, allowed: bool, name: &str, form: u8, ro: bool) -> (String, Option<String>) {
    let tag = format!("t{i}");
    let refused_by_name = ro && matches!(kind % 12, 3..=8);
    // A client sends no synchronizing literal for a command refused before it (the NO
    // comes instead of the `+`): such commands get the non-synchronizing form.
    let form = if refused_by_name && form % 4 == 3 { 2 } else { form };
    let (mb, mb_forwarded) = mailbox_arg(name, form);
    let build = |mb: &str| match kind % 12 {
        0 => (format!("SELECT {mb}"), false),
        1 => (format!("EXAMINE {mb}"), false),
        2 => (format!("STATUS {mb} (MESSAGES)"), false),
        3 => (format!("APPEND {mb} {{3+}}\r\nabc"), true),
        4 => (format!("UID COPY 1:* {mb}"), true),
        5 => (format!("MOVE 1 {mb}"), true),
        6 => (format!("CREATE {mb}"), true),
        7 => (format!("RENAME INBOX {mb}"), true),
        8 => ("UID STORE 1 +FLAGS (\\Deleted)".to_string(), true),
        9 => ("FETCH 1:* (BODY.PEEK[])".to_string(), false),
        10 => ("LIST \"\" *".to_string(), false),
        _ => ("SEARCH TEXT {3}\r\nabc".to_string(), false),
    };
    let (body, writes) = build(&mb);
    let line = format!("{tag} {body}\r\n");
    let forwarded_line = format!("{tag} {}\r\n", build(&mb_forwarded).0);
    let names_mailbox = !matches!(kind % 12, 8..=11);
    let passes = !(ro && writes) && (!names_mailbox || allowed);
    let forwarded = passes.then(|| {
        if ro && kind.is_multiple_of(12) {
            forwarded_line.replacen(&format!("{tag} SELECT"), &format!("{tag} EXAMINE"), 1)
        } else {
            forwarded_line.clone()
        }
    });
    (line, forwarded)
}

/// One generated command: kind, allowed mailbox, which name, how it is written.
type GenCmd = (u8, bool, usize, u8);

fn session_strategy() -> impl Strategy<Value = (bool, Vec<GenCmd>, Vec<usize>)> {
    (
        any::<bool>(),
        prop::collection::vec((any::<u8>(), any::<bool>(), 0usize..5, any::<u8>()), 1..12),
        prop::collection::vec(0usize..4096, 0..6),
    )
}

/// A generated LIST/LSUB/STATUS/other response naming `name` in some form.
fn response(kind: u8, name: &str, form: u8) -> String {
    let mb = match form % 3 {
        0 if !name.contains('/') => name.to_string(),
        2 => format!("{{{}}}\r\n{name}", name.len()),
        _ => format!("\"{name}\""),
    };
    match kind % 6 {
        0 => format!("* LIST (\\HasNoChildren) \"/\" {mb}\r\n"),
        1 => format!("* LSUB () \"/\" {mb}\r\n"),
        2 => format!("* STATUS {mb} (MESSAGES 1 UNSEEN 0)\r\n"),
        3 => "* 1 FETCH (BODY[] {7}\r\nab\r\ncd\r\n FLAGS ())\r\n".to_string(),
        4 => "* 3 EXISTS\r\n".to_string(),
        _ => "x OK done\r\n".to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(256), .. ProptestConfig::default() })]

    /// Generated command sequences, pipelined and cut anywhere: exactly the allowed commands
    /// reach upstream, byte-exact (SELECT as EXAMINE when read-only), and each refused one
    /// gets one tagged answer.
    #[test]
    fn prop_only_allowed_commands_reach_upstream((ro, cmds, cuts) in session_strategy()) {
        let rules = Restriction { read_only: ro, folders: folders("INBOX,Shared/Tickets,Shared/Sales").folders };
        let mut input = String::new();
        let mut want_up = String::new();
        let mut refused = Vec::new();
        for (i, (kind, allowed, pick, form)) in cmds.iter().enumerate() {
            let name = if *allowed { ALLOWED[pick % ALLOWED.len()] } else { FORBIDDEN[pick % FORBIDDEN.len()] };
            let (line, fwd) = command(i, *kind, *allowed, name, *form, ro);
            input.push_str(&line);
            match fwd {
                Some(f) => want_up.push_str(&f),
                None => refused.push(format!("t{i} ")),
            }
        }
        let bytes = input.as_bytes();
        let cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        let r = run_chunks(&rules, &split_at(bytes, cuts.into_iter()));
        prop_assert_eq!(r.up(), want_up);
        let answers: Vec<String> = r
            .cl()
            .lines()
            .filter(|l| !l.starts_with("+ "))
            .map(|l| format!("{} ", l.split(' ').next().unwrap_or("")))
            .collect();
        prop_assert_eq!(answers, refused);
        for f in FORBIDDEN {
            let (plain, quoted) = (format!(" {}\r\n", f), format!("\"{}\"", f));
            prop_assert!(!r.up().contains(&plain) && !r.up().contains(&quoted));
        }
    }

    /// Generated response streams, cut anywhere: no LIST/LSUB/STATUS naming a forbidden
    /// folder reaches the client, the others pass byte-exact.
    #[test]
    fn prop_no_forbidden_folder_reaches_the_client(
        items in prop::collection::vec((any::<u8>(), any::<bool>(), 0usize..5, any::<u8>()), 1..16),
        cuts in prop::collection::vec(0usize..4096, 0..6),
    ) {
        let rules = folders("INBOX,Shared/Tickets,Shared/Sales");
        let mut input = String::new();
        let mut want = String::new();
        for (kind, allowed, pick, form) in &items {
            let name = if *allowed { ALLOWED[pick % ALLOWED.len()] } else { FORBIDDEN[pick % FORBIDDEN.len()] };
            let resp = response(*kind, name, *form);
            input.push_str(&resp);
            if *allowed || kind % 6 >= 3 {
                want.push_str(&resp);
            }
        }
        let bytes = input.as_bytes();
        let cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        let chunks = split_at(bytes, cuts.into_iter());
        let (out, _) = respond_chunks(&rules, &chunks);
        prop_assert_eq!(&respond_chunks_via(&rules, &chunks, true).0, &out);
        let out = String::from_utf8_lossy(&out).into_owned();
        prop_assert_eq!(&out, &want);
        for f in FORBIDDEN {
            for form in [format!(" {}\r\n", f), format!("\"{}\"", f), format!("\n{}\r\n", f), format!(" {} (", f)] {
                prop_assert!(!out.contains(&form), "{} in {}", f, out);
            }
        }
    }

    /// Fuzz target: arbitrary bytes in arbitrary reads never panic, give the same result
    /// as one read, and nothing refused reaches upstream.
    #[test]
    fn prop_command_filter_arbitrary_input(ro in any::<bool>(), chunks in chunked(prop::collection::vec(imapish_byte(), 0..96))) {
        let rules = Restriction { read_only: ro, ..folders("INBOX") };
        let all: Vec<u8> = chunks.concat();
        let r = run_chunks(&rules, &chunks);
        prop_assert_eq!(&r, &run(&rules, &all));
        assert_forwarded_allowed(&rules, &r.upstream);
    }

    /// Fuzz target for the response side: no panic, split-invariant.
    #[test]
    fn prop_response_filter_arbitrary_input(chunks in chunked(prop::collection::vec(imapish_byte(), 0..96))) {
        let rules = folders("INBOX");
        let all: Vec<u8> = chunks.concat();
        let whole = respond_chunks(&rules, &[all]);
        prop_assert_eq!(&respond_chunks(&rules, &chunks), &whole);
        prop_assert_eq!(&respond_chunks_via(&rules, &chunks, true), &whole);
    }
}

/// Bytes that IMAP's grammar turns on, more often than at random.
fn imapish_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => prop::sample::select(b"\r\n{}+~ \"\\()[]*%0123456789".to_vec()),
        2 => prop::sample::select(b"aAtSELCTOPYMVUIDNRXFHdone".to_vec()),
        1 => any::<u8>(),
    ]
}

#[test]
fn idle_ended_by_upstream_means_the_next_line_is_a_command() {
    let mut f = CommandFilter::new(read_only());
    let mut r = Run::default();
    f.feed(b"i IDLE\r\n");
    pump(&mut f, &mut r);
    f.upstream_continuation();
    f.upstream_tagged(b"i");
    f.feed(b"n NOOP\r\n");
    pump(&mut f, &mut r);
    assert_eq!(r.up(), "i IDLE\r\nn NOOP\r\n");
    assert_eq!(r.cl(), "");
}

// ---------------------------------------------------------------------------------------
// Both halves with a fake upstream
// ---------------------------------------------------------------------------------------

/// Every folder the fake upstream has: the allowed ones and the forbidden ones.
const UPSTREAM_FOLDERS: &[&str] = &["INBOX", "Shared/Tickets", "Shared/Sales", "Secret", "Private/Secret", "Shared"];

/// A fake Dovecot: reads the commands the filter forwards (as imap-codec does) and answers
/// each, naming every folder it has in LIST/LSUB (with LIST-STATUS-like STATUS lines, some
/// names as literals) and the named one in STATUS and in a failed SELECT's text.
#[derive(Default)]
struct FakeUpstream {
    input: Vec<u8>,
    /// `Some(tag)` while idling.
    idle: Option<Vec<u8>>,
    /// The synchronizing literal at the end of `input` was answered with `+`.
    acked: usize,
}

impl FakeUpstream {
    /// Takes forwarded bytes; returns upstream's responses to what is complete.
    fn take(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if let Some(tag) = &self.idle {
                let Some(pos) = find_crlf(&self.input) else { break };
                out.extend_from_slice(tag);
                out.extend_from_slice(b" OK Idle completed\r\n");
                self.input.drain(..pos + 2);
                self.idle = None;
                continue;
            }
            // A line that is only a CRLF (a cut command's end) is skipped.
            let input = self.input.clone();
            match CommandCodec::default().decode(&input) {
                Ok((rest, cmd)) => {
                    let used = self.input.len() - rest.len();
                    let tag = cmd.tag.inner().as_bytes().to_vec();
                    self.answer(&tag, &cmd.body, &mut out);
                    self.input.drain(..used);
                    self.acked = 0;
                }
                Err(CommandDecodeError::LiteralFound { .. }) => {
                    if self.acked != self.input.len() {
                        out.extend_from_slice(b"+ OK\r\n");
                        self.acked = self.input.len();
                    }
                    break;
                }
                Err(CommandDecodeError::Incomplete) => break,
                Err(_) => match find_crlf(&self.input) {
                    Some(pos) => {
                        out.extend_from_slice(b"* BAD Error in IMAP command\r\n");
                        self.input.drain(..pos + 2);
                        self.acked = 0;
                    }
                    None => break,
                },
            }
        }
        out
    }

    fn answer(&mut self, tag: &[u8], body: &CommandBody<'_>, out: &mut Vec<u8>) {
        let tag = String::from_utf8_lossy(tag).into_owned();
        let mut push = |s: String| out.extend_from_slice(s.as_bytes());
        match body {
            CommandBody::List { .. } | CommandBody::Lsub { .. } => {
                for (i, f) in UPSTREAM_FOLDERS.iter().enumerate() {
                    let word = if matches!(body, CommandBody::List { .. }) { "LIST" } else { "LSUB" };
                    if i % 2 == 0 {
                        push(format!("* {word} (\\HasNoChildren) \"/\" \"{f}\"\r\n"));
                    } else {
                        push(format!("* {word} () \"/\" {{{}}}\r\n{f}\r\n", f.len()));
                    }
                    push(format!("* STATUS \"{f}\" (MESSAGES 1)\r\n"));
                }
                push(format!("{tag} OK List completed\r\n"));
            }
            CommandBody::Status { mailbox, .. } => {
                let name = String::from_utf8_lossy(mailbox_bytes(mailbox)).into_owned();
                push(format!("* STATUS {{{}}}\r\n{name} (MESSAGES 1)\r\n{tag} OK Status completed\r\n", name.len()));
            }
            CommandBody::Select { mailbox, .. } | CommandBody::Examine { mailbox, .. } => {
                let name = String::from_utf8_lossy(mailbox_bytes(mailbox)).into_owned();
                push(format!("{tag} NO Mailbox doesn't exist: {name}\r\n"));
            }
            CommandBody::Idle => {
                push("+ idling\r\n".to_string());
                self.idle = Some(tag.into_bytes());
            }
            _ => push(format!("{tag} OK Done\r\n")),
        }
    }
}

/// Runs client reads through both filters and the fake upstream, wired as the relay will
/// wire them. Returns (bytes upstream got, bytes the client got).
fn session(rules: &Restriction, reads: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let mut cmds = CommandFilter::new(rules.clone());
    let mut resps = ResponseFilter::new(rules.clone());
    let mut upstream = FakeUpstream::default();
    let (mut to_upstream, mut to_client) = (Vec::new(), Vec::new());
    for read in reads {
        cmds.feed(read);
        loop {
            let mut progress = false;
            loop {
                match cmds.next() {
                    Next::Write(b) => resps.inject(&b),
                    Next::Event(ToUpstream(b)) => {
                        to_upstream.extend_from_slice(&b);
                        resps.feed(&upstream.take(&b));
                    }
                    Next::NeedInput | Next::Close | Next::StartTls => break,
                }
                progress = true;
            }
            loop {
                match resps.next() {
                    Next::Write(b) => to_client.extend(b),
                    Next::Event(Seen::Continuation) => cmds.upstream_continuation(),
                    Next::Event(Seen::Tagged(t)) => cmds.upstream_tagged(&t),
                    Next::NeedInput | Next::Close | Next::StartTls => break,
                }
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }
    (to_upstream, to_client)
}

#[test]
fn a_folder_limited_session_end_to_end() {
    let rules = folders("INBOX,Shared/Tickets");
    let input = b"a LIST \"\" *\r\nb STATUS {6+}\r\nSecret (MESSAGES)\r\nc STATUS \"Shared/Tickets\" (MESSAGES)\r\n\
                  d SELECT Secret\r\ne LSUB \"\" %\r\nf IDLE\r\nDONE\r\ng APPEND INBOX {3}\r\nabc\r\n";
    let (up, client) = session(&rules, &[input.to_vec()]);
    let client = String::from_utf8_lossy(&client).into_owned();
    assert!(!client.contains("Secret") && !client.contains("\"Shared\"") && !client.contains("Sales"), "{client}");
    assert!(client.contains("* LIST () \"/\" {14}\r\nShared/Tickets\r\n"), "{client}");
    for tag in ["a OK", "b NO [NONEXISTENT]", "c OK", "d NO [NONEXISTENT]", "e OK", "f OK", "g OK"] {
        assert!(client.contains(&format!("{tag} ")), "{tag} missing: {client}");
    }
    assert!(client.contains("+ idling\r\n") && client.contains("+ OK\r\n"));
    let up = String::from_utf8_lossy(&up).into_owned();
    assert!(!up.contains("Secret"), "{up}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(256), .. ProptestConfig::default() })]

    /// Generated command sequences through both filters and a fake upstream that names
    /// every folder it has: no forbidden folder ever reaches the client, nothing refused
    /// reaches upstream, and every command gets exactly one tagged answer.
    #[test]
    fn prop_no_forbidden_folder_in_a_whole_session((ro, cmds, cuts) in session_strategy()) {
        let rules = Restriction { read_only: ro, folders: folders("INBOX,Shared/Tickets,Shared/Sales").folders };
        let mut input = String::new();
        for (i, (kind, allowed, pick, form)) in cmds.iter().enumerate() {
            let name = if *allowed { ALLOWED[pick % ALLOWED.len()] } else { FORBIDDEN[pick % FORBIDDEN.len()] };
            // LIST and LSUB ask upstream for everything.
            let kind = if *kind % 5 == 0 { 10 } else { *kind };
            input.push_str(&command(i, kind, *allowed, name, *form, ro).0);
        }
        let bytes = input.as_bytes();
        let cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        let (up, client) = session(&rules, &split_at(bytes, cuts.into_iter()));
        let client = String::from_utf8_lossy(&client).into_owned();
        for f in ["Secret", "\"Shared\"", "{6}\r\nShared\r\n"] {
            prop_assert!(!client.contains(f), "{} in {}", f, client);
        }
        assert_forwarded_allowed(&rules, &up);
        for i in 0..cmds.len() {
            let tagged = client.lines().filter(|l| l.starts_with(&format!("t{i} "))).count();
            prop_assert_eq!(tagged, 1, "t{} in {}", i, client);
        }
    }
}

/// Responses over MAX_RESPONSE: a folder one is dropped whole (and only it), a status line
/// passes unchanged.
#[test]
fn oversized_responses() {
    let rules = folders("INBOX");
    let long = "x".repeat(MAX_RESPONSE + 10);
    let cases = [
        (format!("* LIST () \"/\" \"INBOX{long}\"\r\n* 1 EXISTS\r\n"), "* 1 EXISTS\r\n".to_string()),
        (format!("* LIST () \"/\" {{{}}}\r\n{long}\r\n* 2 EXISTS\r\n", long.len()), "* 2 EXISTS\r\n".to_string()),
        (format!("* LIST ({long}) \"/\" {{3}}\r\nabc\r\n* 3 EXISTS\r\n"), "* 3 EXISTS\r\n".to_string()),
        (format!("* OK {long}\r\n* 4 EXISTS\r\n"), format!("* OK {long}\r\n* 4 EXISTS\r\n")),
    ];
    for (input, want) in cases {
        let bytes = input.as_bytes();
        let whole = respond_chunks(&rules, &[bytes.to_vec()]);
        assert_eq!(String::from_utf8_lossy(&whole.0), want);
        let by_1000: Vec<Vec<u8>> = bytes.chunks(1000).map(<[u8]>::to_vec).collect();
        assert_eq!(respond_chunks(&rules, &by_1000), whole);
    }
}

/// Each refused command whose syntax allows a literal, with the literal synchronizing
/// (the client then waits for a `+` that never comes and sends no data) and with LITERAL+
/// (the data follows at once and is dropped), pipelined behind and before a passing
/// command: `(prefix, literal data, rest of the command)`.
const REFUSED_RO_LITERAL: &[(&str, &str, &str)] = &[
    ("COPY 1 ", "Archive", ""),
    ("UID COPY 1:* ", "Archive", ""),
    ("MOVE 1 ", "Archive", ""),
    ("UID MOVE 1 ", "Archive", ""),
    ("APPEND INBOX ", "hello", ""),
    ("APPEND ", "INBOX", " {5+}\r\nhello"),
    ("CREATE ", "New", ""),
    ("DELETE ", "Old", ""),
    ("RENAME Old ", "New", ""),
    ("RENAME ", "Old", " New"),
    ("SUBSCRIBE ", "Folder", ""),
    ("UNSUBSCRIBE ", "Folder", ""),
    ("SETACL Folder bob ", "lrs", ""),
    ("DELETEACL Folder ", "bob", ""),
    ("SETMETADATA INBOX (/private/comment ", "x", ")"),
    ("SETQUOTA ", "root", " (STORAGE 512)"),
];

#[test]
fn read_only_refusals_with_literals_sync_and_nonsync() {
    let no = "NO [NOPERM] Not allowed: this app password is read-only\r\n";
    for (prefix, data, rest) in REFUSED_RO_LITERAL {
        // Synchronizing: the client sends only the first line, then its next command.
        let input = format!("p NOOP\r\nw {prefix}{{{}}}\r\nq NOOP\r\n", data.len());
        let r = split_invariant(&read_only(), input.as_bytes());
        assert_eq!((r.up(), r.cl()), ("p NOOP\r\nq NOOP\r\n".to_string(), format!("w {no}")), "{prefix}");
        // LITERAL+: everything at once.
        let input = format!("p NOOP\r\nw {prefix}{{{}+}}\r\n{data}{rest}\r\nq NOOP\r\n", data.len());
        let r = split_invariant(&read_only(), input.as_bytes());
        assert_eq!((r.up(), r.cl()), ("p NOOP\r\nq NOOP\r\n".to_string(), format!("w {no}")), "{prefix}");
    }
}

/// Each folder refusal with the mailbox as a synchronizing literal (the filter asks for
/// it, then refuses) and as LITERAL+ (held, then refused), pipelined.
#[test]
fn folder_refusals_with_mailbox_literals() {
    let rules = folders("INBOX");
    let plus = "+ Ready for literal data\r\n";
    let none = "NO [NONEXISTENT] Mailbox doesn't exist\r\n";
    for (prefix, rest) in [
        ("SELECT ", ""),
        ("EXAMINE ", ""),
        ("STATUS ", " (MESSAGES)"),
        ("APPEND ", " {3+}\r\nabc"),
        ("COPY 1 ", ""),
        ("UID COPY 1 ", ""),
        ("MOVE 1 ", ""),
        ("UID MOVE 1 ", ""),
        ("CREATE ", ""),
        ("DELETE ", ""),
        ("RENAME INBOX ", ""),
        ("SUBSCRIBE ", ""),
        ("UNSUBSCRIBE ", ""),
        ("GETQUOTAROOT ", ""),
    ] {
        let input = format!("p NOOP\r\nw {prefix}{{6}}\r\nSecret{rest}\r\nq NOOP\r\n");
        let r = split_invariant(&rules, input.as_bytes());
        assert_eq!((r.up(), r.cl()), ("p NOOP\r\nq NOOP\r\n".to_string(), format!("{plus}w {none}")), "{prefix}");
        let input = format!("p NOOP\r\nw {prefix}{{6+}}\r\nSecret{rest}\r\nq NOOP\r\n");
        let r = split_invariant(&rules, input.as_bytes());
        assert_eq!((r.up(), r.cl()), ("p NOOP\r\nq NOOP\r\n".to_string(), format!("w {none}")), "{prefix}");
    }
}

/// A long line sent a byte at a time is scanned once (the test would take minutes if each
/// byte rescanned the line).
#[test]
fn a_line_trickled_byte_by_byte_is_not_rescanned() {
    let mut line = b"a SEARCH TEXT \"".to_vec();
    line.extend(std::iter::repeat_n(b'x', MAX_LINE - 40));
    line.extend_from_slice(b"\"\r\nb NOOP\r\n");
    let bytewise: Vec<Vec<u8>> = line.iter().map(|b| vec![*b]).collect();
    let r = run_chunks(&read_only(), &bytewise);
    assert_eq!(r.upstream, line);
}

/// The upstream transcripts in `fuzz/corpus/imap_filter_responses/`: every cut gives the
/// same output, no forbidden folder is named outside literal data, a literal's content
/// passes untouched, and no hidden capability is offered in a capability response.
#[test]
fn response_corpus_replays() {
    let cases = crate::proto::corpus_cuts("imap_filter_responses");
    assert!(cases.len() >= 6, "corpus missing: {}", cases.len());
    let rules = Restriction { read_only: true, ..folders("INBOX,Shared/Tickets") };
    let mut reference: std::collections::HashMap<String, (Vec<u8>, Vec<Seen>)> = std::collections::HashMap::new();
    for (name, chunks) in cases {
        let out = respond_chunks(&rules, &chunks);
        assert_eq!(respond_chunks_via(&rules, &chunks, true), out, "{name}: literal data passed directly");
        // The FETCH literal's content looks like responses and must pass as it is.
        let text = String::from_utf8_lossy(&out.0).replace("* LIST () \"/\" Secret\r\nb OK [CAPABILITY X]\r\n", "");
        for line in text.split("\r\n") {
            let folder_line = ["* LIST", "* LSUB", "* STATUS"].iter().any(|p| line.starts_with(p));
            assert!(!(folder_line && line.contains("Secret")), "{name}: {line}");
            assert!(
                line.starts_with("* 1 FETCH") || !line.contains("COMPRESS=") && !line.contains("NOTIFY"),
                "{name}: {line}"
            );
        }
        let file = name.rsplit_once(' ').map(|(f, _)| f.to_string()).unwrap_or_default();
        match reference.get(&file) {
            Some(first) => assert_eq!(&out, first, "{name} differs"),
            None => {
                reference.insert(file, out);
            }
        }
    }
    let fetch =
        &reference.iter().find(|(k, _)| k.ends_with("fetch-caps.txt")).map(|(_, v)| v.clone()).unwrap_or_default();
    let text = String::from_utf8_lossy(&fetch.0);
    assert!(text.contains("{43}\r\n* LIST () \"/\" Secret\r\nb OK [CAPABILITY X]\r\n)\r\n"), "{text}");
    assert_eq!(
        fetch.1,
        vec![Seen::Continuation, Seen::Tagged(b"b".to_vec()), Seen::Tagged(b"c".to_vec())],
        "a tagged-looking line inside a literal is no tagged reply"
    );
}

/// A FETCH literal's data may bypass the filter (the relay's one-copy path): the filter
/// offers exactly the literal's length once its announcement has been read, nothing while
/// a folder response is being collected, and takes up the line after it.
#[test]
fn literal_data_is_offered_for_passthrough() {
    let rules = Restriction { read_only: true, ..folders("INBOX") };
    let mut f = ResponseFilter::new(rules);
    f.feed(b"* 1 FETCH (BODY[] {10}\r\n");
    assert!(matches!(f.next(), Next::Write(b) if b == b"* 1 FETCH (BODY[] {10}\r\n"));
    assert!(matches!(f.next(), Next::NeedInput));
    assert_eq!(f.passthrough(), 10);
    f.passed(4);
    assert_eq!(f.passthrough(), 6);
    f.passed(6);
    f.feed(b")\r\n* LIST () \"/\" {6}\r\n");
    assert!(matches!(f.next(), Next::Write(b) if b == b")\r\n"));
    assert!(matches!(f.next(), Next::NeedInput));
    assert_eq!(f.passthrough(), 0, "a folder response's literal is collected, not passed");
}
