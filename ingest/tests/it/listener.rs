//! The listener's connection hygiene, through real sockets: header, body and
//! idle deadlines, the cap with its eviction order, upgraded connections kept
//! counted, the open-file limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tickgraph_ingest::listener::{self, CloseReason, ConnLimits, ConnMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Far beyond any deadline a test sets: a wait this long means the server
/// did not act.
const PATIENCE: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(600);

struct Server {
    addr: SocketAddr,
    metrics: ConnMetrics,
    /// `GET /held` answers once a permit is added here.
    gate: Arc<Semaphore>,
    /// `GET /held` requests that have reached their handler.
    entered: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(limits: ConnLimits) -> Server {
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .route(
            "/held",
            get(|State((gate, entered)): State<Held>| async move {
                entered.fetch_add(1, Ordering::SeqCst);
                match gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return "closed",
                }
                "released"
            }),
        )
        .route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(
                    |mut socket| async move { while let Some(Ok(_)) = socket.recv().await {} },
                )
                .into_response()
            }),
        )
        .with_state((Arc::clone(&gate), Arc::clone(&entered)));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("local addr");
    let metrics = ConnMetrics::new("ingest");
    let shutdown = CancellationToken::new();
    tokio::spawn(listener::serve(
        tcp,
        router,
        limits,
        metrics.clone(),
        shutdown.clone(),
    ));
    Server {
        addr,
        metrics,
        gate,
        entered,
        shutdown,
    }
}

type Held = (Arc<Semaphore>, Arc<AtomicUsize>);

fn limits(max: usize, header: Duration, body: Duration, idle: Duration) -> ConnLimits {
    ConnLimits {
        max_connections: max,
        header_timeout: header,
        body_timeout: body,
        idle_timeout: idle,
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Reads until the server closes the connection (end of stream or reset),
/// returning what it sent; `None` if it is still open after `PATIENCE`.
async fn closed_by_server(s: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// Sends one whole request and reads its response's head and body
/// (`content-length` bodies only).
async fn exchange(s: &mut TcpStream, request: &str) -> String {
    s.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a response in time")
}

const FAST: &str = "GET /fast HTTP/1.1\r\nhost: t\r\n\r\n";
const PARTIAL: &str = "POST /v1/events HTTP/1.1\r\nHost: x\r\n";

/// Still open and served: a request on it is answered.
async fn assert_served(s: &mut TcpStream, what: &str) {
    let r = exchange(s, FAST).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{what}: {r}");
}

#[tokio::test]
async fn request_headers_must_arrive_in_time() {
    let server = start(limits(16, Duration::from_millis(200), LONG, LONG)).await;
    let mut partial = connect(server.addr).await;
    partial.write_all(PARTIAL.as_bytes()).await.expect("write");
    let mut silent = connect(server.addr).await;
    let mut prompt = connect(server.addr).await;
    assert_served(&mut prompt, "headers sent at once").await;

    assert!(
        closed_by_server(&mut partial).await.is_some(),
        "half-sent headers held open"
    );
    assert!(
        closed_by_server(&mut silent).await.is_some(),
        "a silent connection held open"
    );
    assert_eq!(server.metrics.closed(CloseReason::HeaderTimeout), 2);
}

#[tokio::test]
async fn a_slow_body_is_answered_408_and_closed() {
    let server = start(limits(16, LONG, Duration::from_millis(300), LONG)).await;
    let mut prompt = connect(server.addr).await;
    let r = exchange(
        &mut prompt,
        "POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n5"),
        "{r}"
    );

    let mut slow = connect(server.addr).await;
    slow.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n")
        .await
        .expect("write");
    let (mut rd, mut wr) = slow.into_split();
    let trickle = tokio::spawn(async move {
        // One byte every 100 ms: the whole body would take 10 s.
        for _ in 0..100 {
            if wr.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, rd.read_to_end(&mut got)).await;
    trickle.abort();
    assert!(read.is_ok(), "a slow body held the connection open");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(server.metrics.closed(CloseReason::BodyTimeout), 1);
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_a_busy_one_is_not() {
    let server = start(limits(
        16,
        Duration::from_millis(200),
        LONG,
        Duration::from_millis(200),
    ))
    .await;
    let mut idle = connect(server.addr).await;
    assert_served(&mut idle, "first request").await;
    assert!(
        closed_by_server(&mut idle).await.is_some(),
        "an idle connection held open"
    );
    assert_eq!(server.metrics.closed(CloseReason::IdleTimeout), 1);

    // A request in progress outlives every deadline.
    let mut busy = connect(server.addr).await;
    busy.write_all(b"GET /held HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.gate.add_permits(1);
    let mut got = vec![0u8; 512];
    let n = tokio::time::timeout(PATIENCE, busy.read(&mut got))
        .await
        .expect("an answer")
        .expect("read");
    let answer = String::from_utf8_lossy(&got[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("released"),
        "{answer}"
    );
}

#[tokio::test]
async fn the_first_byte_of_a_later_request_starts_its_header_deadline() {
    let server = start(limits(16, Duration::from_millis(300), LONG, LONG)).await;
    let mut s = connect(server.addr).await;
    assert_served(&mut s, "first request").await;
    s.write_all(b"GET /fast HTTP/1.1\r\n").await.expect("write");
    assert!(
        closed_by_server(&mut s).await.is_some(),
        "a kept-alive connection trickling its headers held open until the idle timeout"
    );
    assert_eq!(server.metrics.closed(CloseReason::HeaderTimeout), 1);
    assert_eq!(server.metrics.closed(CloseReason::IdleTimeout), 0);
}

#[tokio::test]
async fn at_the_cap_a_new_connection_takes_the_place_of_the_longest_waiting() {
    let server = start(limits(3, LONG, LONG, LONG)).await;
    let mut a = connect(server.addr).await;
    assert_served(&mut a, "a").await;
    let mut b = connect(server.addr).await;
    b.write_all(PARTIAL.as_bytes()).await.expect("write");
    let mut c = connect(server.addr).await;
    c.write_all(PARTIAL.as_bytes()).await.expect("write");

    // Never a whole request first, oldest first; then the longest idle.
    let mut d = connect(server.addr).await;
    assert_served(&mut d, "d, at the cap").await;
    assert!(closed_by_server(&mut b).await.is_some(), "b not evicted");
    let mut e = connect(server.addr).await;
    assert_served(&mut e, "e, at the cap").await;
    assert!(closed_by_server(&mut c).await.is_some(), "c not evicted");
    let mut f = connect(server.addr).await;
    assert_served(&mut f, "f, at the cap").await;
    assert!(closed_by_server(&mut a).await.is_some(), "a not evicted");
    assert_served(&mut d, "d, idle but newer than a").await;
    assert_served(&mut e, "e").await;
    assert_eq!(server.metrics.closed(CloseReason::Evicted), 3);
    assert!(server.metrics.open() <= 3, "{} open", server.metrics.open());
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_new_one_is_refused_at_once() {
    let server = start(limits(2, LONG, LONG, LONG)).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = connect(server.addr).await;
        s.write_all(b"GET /held HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .expect("write");
        busy.push(s);
    }
    for _ in 0..500 {
        if server.entered.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        server.entered.load(Ordering::SeqCst),
        2,
        "both requests in progress"
    );
    let mut s = connect(server.addr).await;
    let refused = closed_by_server(&mut s).await.unwrap_or_default();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert_eq!(server.metrics.closed(CloseReason::Refused), 1);
    assert_eq!(server.metrics.closed(CloseReason::Evicted), 0);

    server.gate.add_permits(2);
    for mut s in busy {
        let mut got = vec![0u8; 512];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut got))
            .await
            .expect("an answer")
            .expect("read");
        assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 200"));
    }
}

#[tokio::test]
async fn an_upgraded_connection_keeps_its_slot_until_it_closes() {
    let server = start(limits(1, LONG, LONG, LONG)).await;
    let mut ws = connect(server.addr).await;
    let r = exchange(
        &mut ws,
        "GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");

    let mut next = connect(server.addr).await;
    let answer = closed_by_server(&mut next).await.unwrap_or_default();
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "a WebSocket lost its slot: {answer:?}"
    );

    drop(ws);
    // The slot comes back once the server's side of the socket has closed.
    let mut served = false;
    for _ in 0..250 {
        let mut s = connect(server.addr).await;
        s.write_all(FAST.as_bytes()).await.expect("write");
        let answer = closed_by_server_or_answer(&mut s).await;
        if answer.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the WebSocket's slot never came back");
}

/// The first bytes of the server's answer (a refusal or a response).
async fn closed_by_server_or_answer(s: &mut TcpStream) -> String {
    let mut got = vec![0u8; 512];
    match tokio::time::timeout(PATIENCE, s.read(&mut got)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&got[..n]).into_owned(),
        _ => String::new(),
    }
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only touch the struct given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    // Lowered first, so that raising it is seen even where it starts at the hard limit.
    let lowered = libc::rlimit {
        rlim_cur: lim.rlim_cur.min(1024),
        rlim_max: lim.rlim_max,
    };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
    let limit = listener::raise_fd_limit().expect("raise");
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "Max open files <soft> <hard> files"
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, limit.to_string(), "{line}");
    if hard != "unlimited" {
        assert_eq!(soft, hard, "{line}");
    }
}
