//! Ingest's HTTP edge over real sockets, against a real Redis
//! (`TG_TEST_REDIS_URL`, default 127.0.0.1:6379), each test under a stream
//! prefix of its own: what a keep-alive client meets after each refusal.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use tickgraph_ingest::listener::{self, ConnMetrics};
use tickgraph_ingest::producers::{token_sha256, Producers};
use tickgraph_ingest::server::{Ingest, IngestConfig};
use tickgraph_ingest::StreamLayout;

const TOKEN: &str = "keep-alive-producer-token";

fn redis_url() -> String {
    std::env::var("TG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A running ingest with producer tokens and a 64 KiB body limit.
pub struct TestIngest {
    pub addr: std::net::SocketAddr,
    pub layout: StreamLayout,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _spool: tempfile::TempDir,
}

impl TestIngest {
    pub async fn start(tweak: impl FnOnce(&mut IngestConfig)) -> Self {
        let spool = tempfile::tempdir().expect("tempdir");
        let layout = StreamLayout::new(format!("it-http-{}", rand::random::<u64>()), 1);
        let mut cfg = IngestConfig::new(layout.clone());
        cfg.writer.spool.dir = spool.path().to_path_buf();
        cfg.max_body_bytes = 64 * 1024;
        let file = format!(
            r#"{{"producers":[{{"name":"p","token_sha256":"{}","sources":["s"]}}]}}"#,
            token_sha256(TOKEN)
        );
        cfg.producers = Producers::parse(file.as_bytes()).expect("producers");
        tweak(&mut cfg);
        let conn = cfg.conn;
        let client = redis::Client::open(redis_url()).expect("redis url");
        let shutdown = CancellationToken::new();
        let ingest = Ingest::build(cfg, client, shutdown.clone())
            .await
            .expect("ingest builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = ingest.router();
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            listener::serve(listener, router, conn, ConnMetrics::new("ingest"), s)
                .await
                .expect("serves");
            ingest.finished().await;
        });
        Self {
            addr,
            layout,
            shutdown,
            task,
            _spool: spool,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        let client = redis::Client::open(redis_url()).expect("redis url");
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.layout.prefix()))
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(&keys).query_async(&mut con).await;
            }
        }
    }
}

/// An answer: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 client as keep-alive clients behave: it sends each request on
/// the connection the last one used, unless that answer said
/// `Connection: close`.
pub struct KeepAliveClient {
    addr: std::net::SocketAddr,
    con: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub connections: usize,
}

impl KeepAliveClient {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            addr,
            con: None,
            connections: 0,
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        if self.con.is_none() {
            self.con = Some(BufReader::new(TcpStream::connect(self.addr).await?));
            self.connections += 1;
        }
        let con = self.con.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        con.get_mut().write_all(head.as_bytes()).await?;
        // A server that answers before reading the body may close before it
        // is all written; the answer is still there to read.
        let _ = con.get_mut().write_all(body).await;
        let answer = read_answer(con).await;
        let close = match &answer {
            Ok(a) => a
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            Err(_) => true,
        };
        if close {
            self.con = None;
        }
        answer
    }
}

async fn read_answer(con: &mut BufReader<TcpStream>) -> std::io::Result<Answer> {
    let mut line = String::new();
    if con.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if con.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    con.read_exact(&mut body).await?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn one_quote(seq: u64) -> Vec<u8> {
    format!(
        r#"[{{"kind":"quote","source":"s","seq":{seq},"instrument":"AAPL","venue":"XNAS","ts":1764066667000000000,"bid":"1.5","ask":"1.6","bid_size":1,"ask_size":1}}]"#
    )
    .into_bytes()
}

const BEARER: &str = "Bearer keep-alive-producer-token";

type Headers<'a> = Vec<(&'a str, &'a str)>;

/// Every refusal ingest makes before reading the body, each followed by a
/// valid batch from the same keep-alive client: the batch is taken.
#[tokio::test]
async fn a_keep_alive_client_goes_on_after_every_early_refusal() {
    let ingest = TestIngest::start(|_| {}).await;
    let big = vec![b'x'; 200 * 1024];
    let long_type = format!("text/{}", "x".repeat(60 * 1024));
    let refusals: [(&str, Headers<'_>, u16); 4] = [
        (
            "unsupported type",
            vec![("authorization", BEARER), ("content-type", "text/plain")],
            415,
        ),
        ("no token", vec![("content-type", "application/json")], 401),
        (
            "too large",
            vec![
                ("authorization", BEARER),
                ("content-type", "application/json"),
            ],
            413,
        ),
        (
            "a 60 KB type",
            vec![("authorization", BEARER), ("content-type", &long_type)],
            415,
        ),
    ];
    let mut client = KeepAliveClient::new(ingest.addr);
    for (seq, (what, headers, status)) in (1u64..).zip(refusals) {
        let refused = client
            .request("POST", "/v1/events", &headers, &big)
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(refused.status, status, "{what}: {refused:?}");
        assert!(
            refused.body.len() < 512,
            "{what}: an answer of {} bytes",
            refused.body.len()
        );
        let next = client
            .request(
                "POST",
                "/v1/events",
                &[
                    ("authorization", BEARER),
                    ("content-type", "application/json"),
                ],
                &one_quote(seq),
            )
            .await
            .unwrap_or_else(|e| panic!("after {what}: the next request failed: {e}"));
        assert_eq!(next.status, 200, "after {what}: {next:?}");
    }
    ingest.stop().await;
}

/// A refusal made after the whole body was read keeps the connection.
#[tokio::test]
async fn a_refusal_after_the_body_keeps_the_connection() {
    let ingest = TestIngest::start(|_| {}).await;
    let mut client = KeepAliveClient::new(ingest.addr);
    let json = [
        ("authorization", BEARER),
        ("content-type", "application/json"),
    ];
    let malformed = client
        .request("POST", "/v1/events", &json, b"{\"not\": \"an array\"}")
        .await
        .expect("answer");
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_eq!(malformed.header("connection"), None);
    let next = client
        .request("POST", "/v1/events", &json, &one_quote(1))
        .await
        .expect("answer");
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(client.connections, 1, "the connection was kept");
    ingest.stop().await;
}

/// `MEMORY USAGE` of `key`, every node counted (`SAMPLES 0`).
async fn memory_usage(con: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async::<Option<u64>>(con)
        .await
        .expect("MEMORY USAGE")
        .unwrap_or(0)
}

/// What one producer's invalid events pin in Redis: 2,000 of 20 KB each (40 MB)
/// leave the ingest dead-letter stream within its byte bound, every payload
/// cut to 2 KiB, and Redis's memory for the stream near that bound.
#[tokio::test]
async fn invalid_events_pin_no_more_than_the_dead_letter_byte_bound() {
    const MAX: u64 = 256 * 1024;
    let ingest = TestIngest::start(|c| {
        c.max_body_bytes = 1 << 20;
        c.writer.dlq.max_bytes = MAX;
    })
    .await;
    let event = format!(
        r#"{{"kind":"quote","source":"s","seq":"not a number","padding":"{}"}}"#,
        "x".repeat(20_000)
    );
    let batch = format!("[{}]", vec![event; 20].join(",")).into_bytes();
    let mut client = KeepAliveClient::new(ingest.addr);
    let json = [
        ("authorization", BEARER),
        ("content-type", "application/json"),
    ];
    for _ in 0..100 {
        let answer = client
            .request("POST", "/v1/events", &json, &batch)
            .await
            .expect("answer");
        assert_eq!(answer.status, 200, "{answer:?}");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
        assert_eq!(
            body["rejected"].as_array().map(Vec::len),
            Some(20),
            "{body}"
        );
    }
    let key = ingest.layout.ingest_dlq();
    let mut con = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let memory = memory_usage(&mut con, &key).await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .expect("XRANGE");
    let sizes: Vec<u64> = reply
        .ids
        .iter()
        .map(|e| e.get::<u64>("size").expect("every letter has its size"))
        .collect();
    let counted: u64 = redis::cmd("GET")
        .arg(tickgraph_ingest::stream::dlq_bytes_key(&key))
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(sizes.iter().sum::<u64>(), counted);
    assert!(counted <= MAX, "{counted} counted bytes over {MAX}");
    for e in &reply.ids {
        let payload: Vec<u8> = e.get("payload").expect("payload");
        assert_eq!(payload.len(), 2048);
        let reason: String = e.get("reason").expect("reason");
        assert!(
            reason.ends_with("(payload cut: the first 2048 of 20063 bytes kept, 18015 cut)"),
            "{reason}"
        );
    }
    // Redis keeps each letter of this size in a stream node of its own: about
    // 1.3 times the counted bytes.
    assert!(
        memory <= MAX + MAX / 2,
        "{} letters take {memory} bytes of Redis for {counted} counted",
        sizes.len()
    );
    eprintln!(
        "{} letters: {counted} counted bytes, MEMORY USAGE {memory}",
        sizes.len()
    );
    ingest.stop().await;
}
