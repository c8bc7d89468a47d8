//! One Redis or a Redis Cluster, chosen by configuration (`--redis-cluster`).
//!
//! Every component talks to Redis through [`RedisTarget`] and [`RedisConn`], so
//! the same code runs against both. What a cluster changes:
//! - every command and every pipeline must stay within one hash slot. The stream
//!   layout puts all of a shard's keys under the hash tag `{<shard>}`, so per-shard
//!   work already does; work across shards goes through [`query_by_slot`], which
//!   on a single Redis is still one pipeline and on a cluster one per slot;
//! - a blocking read holds its node connection, so each blocking reader still
//!   gets a connection of its own ([`RedisTarget::connect`]);
//! - a primary may fail and a replica take over. Replication is asynchronous, so
//!   writes acknowledged by the primary alone can be lost then. Components that
//!   promise something on a write (ingest to its producer, the loader to history)
//!   wait for replicas with [`wait_replicas`] first; see the README.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value,
};

/// Why a Redis address could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("bad Redis URL {url:?}: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("a single Redis takes one URL, got {0}; for a cluster pass --redis-cluster")]
    ManyUrls(usize),
    #[error("no Redis URL given")]
    NoUrl,
}

/// Where Redis is: one server, or the seed nodes of a cluster.
#[derive(Clone)]
pub enum RedisTarget {
    Single(redis::Client),
    Cluster {
        client: Box<ClusterClient>,
        /// As given, for logs and reports.
        seeds: Vec<String>,
    },
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTarget({})", self.describe())
    }
}

impl From<redis::Client> for RedisTarget {
    fn from(c: redis::Client) -> Self {
        Self::Single(c)
    }
}

/// Timeouts of a connection; `None` waits as long as the server takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnOpts {
    pub connect_timeout: Option<Duration>,
    pub response_timeout: Option<Duration>,
}

impl ConnOpts {
    /// Both bounded by `t`: health checks and short requests.
    pub fn bounded(t: Duration) -> Self {
        Self {
            connect_timeout: Some(t),
            response_timeout: Some(t),
        }
    }

    /// Replies may take as long as the server needs: blocking reads.
    pub fn blocking() -> Self {
        Self::default()
    }
}

impl RedisTarget {
    /// `urls` is one URL, or with `cluster` a comma-separated list of seed nodes
    /// (any reachable node is enough; the client learns the rest).
    pub fn parse(urls: &str, cluster: bool) -> Result<Self, TargetError> {
        let list: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if cluster {
            if list.is_empty() {
                return Err(TargetError::NoUrl);
            }
            // Checked one by one so the error names the bad one.
            for url in &list {
                redis::Client::open(url.as_str()).map_err(|source| TargetError::Url {
                    url: url.clone(),
                    source,
                })?;
            }
            let client = ClusterClientBuilder::new(list.iter().map(String::as_str))
                .build()
                .map_err(|source| TargetError::Url {
                    url: urls.to_string(),
                    source,
                })?;
            return Ok(Self::Cluster {
                client: Box::new(client),
                seeds: list,
            });
        }
        match list.as_slice() {
            [] => Err(TargetError::NoUrl),
            [url] => Self::single(url),
            more => Err(TargetError::ManyUrls(more.len())),
        }
    }

    pub fn single(url: &str) -> Result<Self, TargetError> {
        redis::Client::open(url)
            .map(Self::Single)
            .map_err(|source| TargetError::Url {
                url: url.to_string(),
                source,
            })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// `host:port` of a single Redis, or `cluster(a,b,c)` of the seeds.
    pub fn describe(&self) -> String {
        match self {
            Self::Single(c) => c.get_connection_info().addr().to_string(),
            Self::Cluster { seeds, .. } => format!("cluster({})", seeds.join(",")),
        }
    }

    /// A new connection. On a cluster it holds one connection per node, follows
    /// MOVED/ASK and learns a new topology after a failover by itself.
    pub async fn connect(&self, opts: ConnOpts) -> RedisResult<RedisConn> {
        match self {
            Self::Single(c) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(opts.connect_timeout)
                    .set_response_timeout(opts.response_timeout);
                let con = c.get_multiplexed_async_connection_with_config(&config);
                within(opts, con).await.map(RedisConn::Multiplexed)
            }
            Self::Cluster { client, .. } => {
                let con = client.get_async_connection_with_config(cluster_config(opts));
                within(opts, con).await.map(RedisConn::Cluster)
            }
        }
    }

    /// A connection made on first use that reconnects by itself after a
    /// failure: for writers that must not fail to start while Redis is down.
    pub fn lazy(&self, opts: ConnOpts) -> RedisResult<RedisConn> {
        match self {
            Self::Single(c) => c
                .get_connection_manager_lazy(manager_config(opts))
                .map(RedisConn::Managed),
            Self::Cluster { client, .. } => Ok(RedisConn::Cluster(
                client.get_pending_async_connection_with_config(cluster_config(opts)),
            )),
        }
    }

    /// Like [`Self::lazy`] but connected now, within `opts.connect_timeout`.
    pub async fn managed(&self, opts: ConnOpts) -> RedisResult<RedisConn> {
        match self {
            Self::Single(c) => {
                let made = ConnectionManager::new_with_config(c.clone(), manager_config(opts));
                within(opts, made).await.map(RedisConn::Managed)
            }
            Self::Cluster { .. } => self.connect(opts).await,
        }
    }
}

/// A connection made within `opts.connect_timeout`, when set: the configs bound
/// each socket connect, this the handshake and the first topology read too.
async fn within<C>(
    opts: ConnOpts,
    connecting: impl std::future::Future<Output = RedisResult<C>>,
) -> RedisResult<C> {
    match opts.connect_timeout {
        Some(t) => tokio::time::timeout(t, connecting)
            .await
            .map_err(|_| timed_out("connecting to Redis", t))?,
        None => connecting.await,
    }
}

/// One attempt per command, then the manager reconnects in the background.
fn manager_config(opts: ConnOpts) -> ConnectionManagerConfig {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(opts.response_timeout)
        .set_number_of_retries(1);
    match opts.connect_timeout {
        Some(t) => config.set_connection_timeout(Some(t)),
        None => config,
    }
}

fn cluster_config(opts: ConnOpts) -> ClusterConfig {
    let mut config = ClusterConfig::new();
    if let Some(t) = opts.connect_timeout {
        config = config.set_connection_timeout(t);
    }
    if let Some(t) = opts.response_timeout {
        config = config.set_response_timeout(t);
    }
    config
}

fn timed_out(what: &str, t: Duration) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "timed out",
        format!("{what} took longer than {t:?}"),
    ))
}

/// A connection to a single Redis or to a cluster. Cheap to clone: clones share
/// the connection (commands are multiplexed over it).
#[derive(Clone)]
pub enum RedisConn {
    Multiplexed(redis::aio::MultiplexedConnection),
    Managed(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Multiplexed(c) => c.req_packed_command(cmd),
            Self::Managed(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Multiplexed(c) => c.get_db(),
            Self::Managed(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// The part of `key` Redis Cluster hashes: the first non-empty `{…}`, else the
/// whole key. Keys with the same tag share a slot.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// Runs `groups` of commands, each group's keys in one slot, different groups
/// perhaps in different slots. On a single Redis this is one pipeline (one round
/// trip); on a cluster one pipeline per group, sent at once. Returns each
/// group's replies in order, one per command: `ignore()` is not honoured, and
/// the groups must not be atomic. Not atomic across groups either.
pub async fn query_by_slot<T: FromRedisValue>(
    con: &mut RedisConn,
    groups: &[Pipeline],
) -> RedisResult<Vec<Vec<T>>> {
    if let [one] = groups {
        return Ok(vec![one.query_async::<Vec<T>>(con).await?]);
    }
    if con.is_cluster() {
        let sends = groups.iter().map(|g| {
            let mut c = con.clone();
            async move { g.query_async::<Vec<T>>(&mut c).await }
        });
        return futures_util::future::try_join_all(sends).await;
    }
    let mut all = redis::pipe();
    let mut sizes = Vec::with_capacity(groups.len());
    for g in groups {
        let mut n = 0;
        for cmd in g.cmd_iter() {
            all.add_command(cmd.clone());
            n += 1;
        }
        sizes.push(n);
    }
    let mut replies = all.query_async::<Vec<Value>>(con).await?.into_iter();
    let mut out = Vec::with_capacity(groups.len());
    for n in sizes {
        let values: Vec<Value> = replies.by_ref().take(n).collect();
        out.push(
            values
                .into_iter()
                .map(T::from_redis_value)
                .collect::<Result<_, _>>()?,
        );
    }
    Ok(out)
}

/// Runs `pipe`, a transaction (`atomic()`) whose keys are all in the slot of
/// `slot_key`.
///
/// On a cluster, a transaction sent to a node that no longer serves its slot
/// (the old primary after a failover, back as a replica) is answered with an
/// aborted transaction holding `MOVED`. The cluster client (redis 1.8) does not
/// follow that, nor refresh its slot map, so every retry would go to the same
/// node. A plain command on the slot is redirected and refreshes the map; the
/// transaction is then sent once more.
pub async fn query_atomic<T: FromRedisValue>(
    con: &mut RedisConn,
    pipe: &Pipeline,
    slot_key: &str,
) -> RedisResult<T> {
    match pipe.query_async(con).await {
        Err(e) if con.is_cluster() && moved_in_transaction(&e) => {
            let _: Value = redis::cmd("EXISTS").arg(slot_key).query_async(con).await?;
            pipe.query_async(con).await
        }
        other => other,
    }
}

fn moved_in_transaction(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort)
        && e.clone().into_server_errors().is_some_and(|errs| {
            errs.iter()
                .any(|(_, s)| s.kind() == Some(redis::ServerErrorKind::Moved))
        })
}

/// When `replicas > 0`, ends `pipe` with a write to a marker key in the slot of
/// `slot_key`, then `WAIT replicas timeout`; returns the commands added (0 or 2).
///
/// WAIT waits for the connection's last *propagated* write. The marker write
/// makes that cover everything the node holds at this point, including what
/// the pipeline only read (a consumer's entries) or a write an earlier attempt
/// made (a retry whose append is now refused as done). It must ride in the
/// same pipeline as what it covers: on a cluster a WAIT alone, having no key,
/// would go to any node.
pub fn add_wait(pipe: &mut Pipeline, slot_key: &str, replicas: u32, timeout: Duration) -> usize {
    if replicas == 0 {
        return 0;
    }
    pipe.cmd("SET")
        .arg(format!("tickgraph:replicated:{{{}}}", hash_tag(slot_key)))
        .arg(1);
    pipe.cmd("WAIT")
        .arg(replicas)
        .arg(timeout.as_millis().max(1) as u64);
    2
}

/// Checks a `WAIT` reply: an error unless at least `replicas` acknowledged.
pub fn wait_replicas(acked: i64, replicas: u32) -> RedisResult<()> {
    if acked >= i64::from(replicas) {
        return Ok(());
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Io,
        "too few replicas",
        format!("{acked} of {replicas} replicas acknowledged the write in time"),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_redis_rules() {
        assert_eq!(hash_tag("tg:raw:{3}"), "3");
        assert_eq!(hash_tag("tg:seen:{3}:src:17"), "3");
        assert_eq!(hash_tag("tg:dlq:ingest"), "tg:dlq:ingest");
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(hash_tag("a{}b{c}"), "a{}b{c}");
        assert_eq!(hash_tag("a{b"), "a{b");
    }

    #[test]
    fn urls_parse_by_mode() {
        assert!(!RedisTarget::parse("redis://127.0.0.1:6379", false)
            .expect("single")
            .is_cluster());
        let c = RedisTarget::parse("redis://127.0.0.1:7001, redis://127.0.0.1:7002", true)
            .expect("cluster");
        assert!(c.is_cluster());
        assert_eq!(
            c.describe(),
            "cluster(redis://127.0.0.1:7001,redis://127.0.0.1:7002)"
        );
        assert!(matches!(
            RedisTarget::parse("redis://127.0.0.1:7001,redis://127.0.0.1:7002", false),
            Err(TargetError::ManyUrls(2))
        ));
        assert!(matches!(
            RedisTarget::parse(" , ", true),
            Err(TargetError::NoUrl)
        ));
        assert!(matches!(
            RedisTarget::parse("http://x", true),
            Err(TargetError::Url { .. })
        ));
    }

    /// After a failover whose old primary is back as a replica, a transaction
    /// on the same cluster connection reaches the new primary.
    #[tokio::test]
    async fn a_transaction_follows_its_slot_to_the_new_primary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = crate::test_support::LocalCluster::start(dir.path()).expect("cluster");
        let target = RedisTarget::parse(&cluster.url_list(), true).expect("cluster target");
        let mut con = target
            .connect(ConnOpts::bounded(Duration::from_secs(5)))
            .await
            .expect("connect");
        let key = "tg:raw:{0}";
        let mut txn = redis::pipe();
        txn.atomic().cmd("INCR").arg(key).cmd("INCR").arg(key);
        let got: (i64, i64) = query_atomic(&mut con, &txn, key).await.expect("txn");
        assert_eq!(got, (1, 2));
        // On the replica before the primary dies.
        let primary = cluster.primary_of_key(key);
        let mut direct = redis::Client::open(cluster.node_url(primary))
            .expect("url")
            .get_connection()
            .expect("primary");
        let synced: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query(&mut direct)
            .expect("WAIT");
        assert_eq!(synced, 1);

        cluster.kill_primary_of_key(key);
        cluster.wait_failover();
        cluster.restart(primary).expect("restart");
        cluster.wait_replicated();
        let got: (i64, i64) = query_atomic(&mut con, &txn, key)
            .await
            .expect("the transaction reaches the new primary");
        assert_eq!(got, (3, 4));
    }

    #[test]
    fn wait_replies_below_the_count_fail() {
        assert!(wait_replicas(1, 1).is_ok());
        assert!(wait_replicas(2, 1).is_ok());
        let e = wait_replicas(0, 1).expect_err("short");
        assert!(e.to_string().contains("0 of 1 replicas"), "{e}");
        let mut p = redis::pipe();
        assert_eq!(add_wait(&mut p, "tg:raw:{3}", 0, Duration::from_secs(1)), 0);
        assert_eq!(p.cmd_iter().count(), 0);
        assert_eq!(
            add_wait(&mut p, "tg:dlq:ingest", 1, Duration::from_millis(250)),
            2
        );
        let packed: Vec<String> = p
            .cmd_iter()
            .map(|c| String::from_utf8_lossy(&c.get_packed_command()).into_owned())
            .collect();
        // The marker shares the slot of the key it stands for.
        assert!(
            packed[0].contains("tickgraph:replicated:{tg:dlq:ingest}"),
            "{packed:?}"
        );
        assert!(
            packed[1].contains("WAIT") && packed[1].contains("250"),
            "{packed:?}"
        );
    }
}
