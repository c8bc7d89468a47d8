//! A private `redis-server` for tests that stop, kill or restart Redis, so the
//! shared one and the tests using it are never disturbed, and a private Redis
//! Cluster of six nodes for tests that kill a primary. Built only for tests
//! (`cfg(test)` here, the `test-support` feature for other crates' tests).

pub mod msgpack;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Cases per proptest property: `TG_FUZZ_CASES` when set (the long mode, e.g.
/// 1,000,000 in a release build), else `default`, the short mode CI runs.
pub fn fuzz_cases(default: u32) -> u32 {
    std::env::var("TG_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A `redis-server` on a free loopback port, its data in a directory of its own.
/// Dropping it kills the server.
pub struct LocalRedis {
    port: u16,
    dir: PathBuf,
    appendfsync: Option<&'static str>,
    child: Option<Child>,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct loopback ports nothing listens on right now (all held open
/// together while they are picked, so none comes twice).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

impl LocalRedis {
    /// Starts a server in `dir`. With `appendfsync` (`always`, `everysec`) it
    /// keeps an append-only file there and reloads it on restart; without, it
    /// keeps nothing on disk.
    pub fn start(dir: &Path, appendfsync: Option<&'static str>) -> std::io::Result<Self> {
        let mut r = Self {
            port: free_port()?,
            dir: dir.to_path_buf(),
            appendfsync,
            child: None,
        };
        r.spawn()?;
        Ok(r)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("");
        match self.appendfsync {
            Some(policy) => cmd
                .arg("--appendonly")
                .arg("yes")
                .arg("--appendfsync")
                .arg(policy),
            None => cmd.arg("--appendonly").arg("no"),
        };
        self.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| std::io::Error::new(e.kind(), format!("redis-server: {e}")))?,
        );
        self.wait_ready()
    }

    fn wait_ready(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pong = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            // LOADING answers an error: the server is up but not ready.
            if pong.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "redis-server on port {} did not answer PING",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9: whatever it had not written to its append-only file is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Nodes of a [`LocalCluster`]: three primaries, each with one replica.
const CLUSTER_NODES: usize = 6;
/// Every Redis Cluster has this many hash slots.
const HASH_SLOTS: u32 = 16384;
/// How long a node may be unreachable before it is taken for failed: short, so
/// that a replica takes over a killed primary within a few seconds.
const NODE_TIMEOUT_MS: u64 = 1000;
/// Bound on forming the cluster (six servers, `redis-cli --cluster create`, the
/// replicas' first sync) on a busy machine.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a failover: detection takes about `NODE_TIMEOUT_MS`, the election
/// a second or two more.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A range of hash slots and the primary serving it, as `CLUSTER SLOTS` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    /// Port of the primary.
    pub primary: u16,
}

/// A line of `CLUSTER NODES`: who a node is and whom it replicates.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    replica: bool,
    failed: bool,
    /// The id of the primary it replicates.
    primary: Option<String>,
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus[,host]> <flags> <primary id|-> ...`.
fn parse_cluster_nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || format!("CLUSTER NODES: cannot read {line:?}");
            if f.len() < 4 {
                return Err(bad());
            }
            let port = f[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?;
            let flags: Vec<&str> = f[2].split(',').collect();
            Ok(NodeLine {
                id: f[0].to_owned(),
                port,
                replica: flags.contains(&"slave") || flags.contains(&"replica"),
                failed: flags.contains(&"fail"),
                primary: (f[3] != "-").then(|| f[3].to_owned()),
            })
        })
        .collect()
}

struct ClusterNode {
    port: u16,
    bus_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A Redis Cluster of its own: six `redis-server --cluster-enabled yes` nodes on
/// free loopback ports, three primaries with one replica each, every node in a
/// directory of its own under the one given. Tests kill primaries
/// ([`LocalCluster::kill_primary_of_key`]) and wait for their replicas to take
/// over ([`LocalCluster::wait_failover`]). Dropping it kills every node.
///
/// Nodes keep an append-only file fsynced every second rather than on every
/// write: a killed primary is never restarted here, so what keeps acknowledged
/// writes is the replica (`WAIT`), and six servers fsyncing each write would
/// load a small shared machine for nothing.
pub struct LocalCluster {
    nodes: Vec<ClusterNode>,
}

fn node_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// One command to one node, on a connection of its own with short timeouts.
fn node_query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let run = || -> redis::RedisResult<T> {
        let mut con = redis::Client::open(node_url(port))?
            .get_connection_with_timeout(Duration::from_millis(500))?;
        con.set_read_timeout(Some(Duration::from_secs(2)))?;
        con.set_write_timeout(Some(Duration::from_secs(2)))?;
        cmd.query(&mut con)
    };
    run().map_err(|e| format!("node {port}: {e}"))
}

/// A field of `CLUSTER INFO` or `INFO` (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Parses a `CLUSTER SLOTS` reply into ranges sorted by their first slot.
/// (Its replica lists are no guide to the topology: Redis 7 leaves out a
/// replica until it has replicated some data; [`LocalCluster::replica_of`]
/// reads `CLUSTER NODES`.)
fn parse_cluster_slots(reply: redis::Value) -> Result<Vec<SlotRange>, String> {
    use redis::Value;
    let int = |v: &Value| -> Result<u16, String> {
        match v {
            Value::Int(n) => {
                u16::try_from(*n).map_err(|_| format!("CLUSTER SLOTS: {n} out of range"))
            }
            other => Err(format!("CLUSTER SLOTS: expected an integer, got {other:?}")),
        }
    };
    let Value::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS: expected an array, got {reply:?}"));
    };
    let mut out = ranges
        .iter()
        .map(|range| match range {
            Value::Array(items) if items.len() >= 3 => match &items[2] {
                Value::Array(node) if node.len() >= 2 => Ok(SlotRange {
                    first: int(&items[0])?,
                    last: int(&items[1])?,
                    primary: int(&node[1])?,
                }),
                other => Err(format!("CLUSTER SLOTS: expected a node, got {other:?}")),
            },
            other => Err(format!("CLUSTER SLOTS: expected a range, got {other:?}")),
        })
        .collect::<Result<Vec<_>, String>>()?;
    out.sort_by_key(|r| r.first);
    Ok(out)
}

/// Runs `cmd` to its end, its output in `log`, or kills it after `timeout`.
fn run_logged(cmd: &mut Command, log: &Path, timeout: Duration) -> std::io::Result<String> {
    let file = std::fs::File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(log).unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(output),
        Some(s) => Err(std::io::Error::other(format!("exited with {s}:\n{output}"))),
        None => Err(std::io::Error::other(format!(
            "still running after {timeout:?}, killed:\n{output}"
        ))),
    }
}

impl LocalCluster {
    /// Starts six nodes under `dir`, makes them a cluster of three primaries
    /// with one replica each (`redis-cli --cluster create`), and returns once
    /// every node says `cluster_state:ok`, all agree on who serves every slot,
    /// and every replica is in sync with its primary.
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        let ports = free_ports(2 * CLUSTER_NODES)?;
        let mut cluster = Self { nodes: Vec::new() };
        // The cluster bus listens on a port of its own: the default, port +
        // 10000, is past 65535 for most ephemeral ports.
        for pair in ports.chunks(2) {
            let node_dir = dir.join(format!("node-{}", pair[0]));
            std::fs::create_dir_all(&node_dir)?;
            let mut node = ClusterNode {
                port: pair[0],
                bus_port: pair[1],
                dir: node_dir,
                child: None,
            };
            node.spawn()?;
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            node.wait_ping()?;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        run_logged(
            Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "1", "--cluster-yes"]),
            &dir.join("cluster-create.log"),
            FORM_TIMEOUT,
        )
        .map_err(|e| std::io::Error::other(format!("redis-cli --cluster create: {e}")))?;
        cluster
            .wait_until(FORM_TIMEOUT, true)
            .map_err(|why| std::io::Error::other(format!("the cluster did not form: {why}")))?;
        Ok(cluster)
    }

    /// Every node's URL, for `--redis-url` (see [`LocalCluster::url_list`]).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| node_url(n.port)).collect()
    }

    /// The seed nodes as one comma-separated `--redis-url`.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// The URL of one node.
    pub fn node_url(&self, port: u16) -> String {
        node_url(port)
    }

    /// Ports of the nodes not killed.
    pub fn live(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Who serves every slot, as a live node sees it.
    pub fn slot_map(&self) -> Vec<SlotRange> {
        let port = self.any_live();
        node_query(port, redis::cmd("CLUSTER").arg("SLOTS"))
            .and_then(parse_cluster_slots)
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS: {e}"))
    }

    /// Ports of the primaries serving slots now, sorted.
    pub fn primaries(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self.slot_map().iter().map(|r| r.primary).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The live replica of `primary`, if it has one (`CLUSTER NODES`).
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        let port = self.any_live();
        let nodes = self
            .nodes_seen_by(port)
            .unwrap_or_else(|e| panic!("CLUSTER NODES: {e}"));
        let live = self.live();
        replica_in(&nodes, primary, &live)
    }

    fn nodes_seen_by(&self, port: u16) -> Result<Vec<NodeLine>, String> {
        let text: String = node_query(port, redis::cmd("CLUSTER").arg("NODES"))?;
        parse_cluster_nodes(&text)
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = self.any_live();
        node_query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
    }

    /// The port of the primary serving `slot`.
    pub fn primary_of_slot(&self, slot: u16) -> u16 {
        let map = self.slot_map();
        map.iter()
            .find(|r| (r.first..=r.last).contains(&slot))
            .map(|r| r.primary)
            .unwrap_or_else(|| panic!("no node serves slot {slot}: {map:?}"))
    }

    /// The port of the primary serving `key`'s slot.
    pub fn primary_of_key(&self, key: &str) -> u16 {
        self.primary_of_slot(self.keyslot(key))
    }

    fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }

    /// kill -9 of the node on `port`: whatever its replica had not received is
    /// gone with it.
    pub fn kill(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.kill();
    }

    /// kill -9 of the primary serving `key`'s slot; returns its port.
    pub fn kill_primary_of_key(&mut self, key: &str) -> u16 {
        let primary = self.primary_of_key(key);
        self.kill(primary);
        primary
    }

    /// Waits until every slot is served by a live primary again (a replica
    /// promoted in each killed primary's place), every live node says
    /// `cluster_state:ok`, and all agree on the slot map. Panics after
    /// 30 seconds, saying what was still wrong.
    pub fn wait_failover(&self) {
        if let Err(why) = self.wait_until(FAILOVER_TIMEOUT, false) {
            panic!(
                "no failover within {FAILOVER_TIMEOUT:?}: {why} (node logs: {})",
                self.log_dirs()
            );
        }
    }

    /// Starts a killed node again, on its port and with its directory. A
    /// primary whose slots a replica took over comes back as that replica's
    /// replica; [`LocalCluster::wait_replicated`] waits for it to be in sync.
    pub fn restart(&mut self, port: u16) -> std::io::Result<()> {
        let node = self.node_mut(port);
        node.kill();
        node.spawn()?;
        node.wait_ping()
    }

    /// Waits until the cluster is whole (as [`LocalCluster::wait_failover`])
    /// and every primary has a live replica in sync with it, as after
    /// [`LocalCluster::start`]. Panics after 60 seconds, saying what was still
    /// wrong.
    pub fn wait_replicated(&self) {
        if let Err(why) = self.wait_until(FORM_TIMEOUT, true) {
            panic!(
                "primaries without a replica in sync after {FORM_TIMEOUT:?}: {why} (node logs: {})",
                self.log_dirs()
            );
        }
    }

    fn any_live(&self) -> u16 {
        *self
            .live()
            .first()
            .expect("every node of the cluster was killed")
    }

    fn log_dirs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.dir.join("redis.log").display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn wait_until(&self, timeout: Duration, with_replicas: bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let why = match self.settled(with_replicas) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() > deadline {
                return Err(why);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ok once the cluster is whole, else what is not yet so. `with_replicas`:
    /// every slot also has a live replica in sync with its primary.
    fn settled(&self, with_replicas: bool) -> Result<(), String> {
        let live = self.live();
        let mut agreed: Option<(u16, Vec<SlotRange>)> = None;
        for &port in &live {
            let info: String = node_query(port, redis::cmd("CLUSTER").arg("INFO"))?;
            let state = info_field(&info, "cluster_state");
            if state != Some("ok") {
                return Err(format!("node {port}: cluster_state {state:?}"));
            }
            let ok = info_field(&info, "cluster_slots_ok");
            if ok != Some(&HASH_SLOTS.to_string()) {
                return Err(format!("node {port}: cluster_slots_ok {ok:?}"));
            }
            let map = parse_cluster_slots(node_query(port, redis::cmd("CLUSTER").arg("SLOTS"))?)?;
            let covered: u32 = map
                .iter()
                .map(|r| u32::from(r.last) - u32::from(r.first) + 1)
                .sum();
            if covered != HASH_SLOTS {
                return Err(format!("node {port}: {covered} slots covered"));
            }
            if let Some(r) = map.iter().find(|r| !live.contains(&r.primary)) {
                return Err(format!(
                    "node {port}: slots {}-{} still on killed node {}",
                    r.first, r.last, r.primary
                ));
            }
            match &agreed {
                Some((other, seen)) if *seen != map => {
                    return Err(format!(
                        "nodes {other} and {port} disagree: {seen:?} vs {map:?}"
                    ))
                }
                Some(_) => {}
                None => agreed = Some((port, map)),
            }
        }
        let Some((_, map)) = agreed else {
            return Err("every node was killed".into());
        };
        if with_replicas {
            let nodes = self.nodes_seen_by(live[0])?;
            let mut primaries: Vec<u16> = map.iter().map(|r| r.primary).collect();
            primaries.dedup();
            for primary in primaries {
                let Some(replica) = replica_in(&nodes, primary, &live) else {
                    return Err(format!("primary {primary}: no replica yet"));
                };
                let info: String = node_query(replica, redis::cmd("INFO").arg("replication"))?;
                let link = info_field(&info, "master_link_status");
                if link != Some("up") {
                    return Err(format!("replica {replica}: master_link_status {link:?}"));
                }
            }
        }
        Ok(())
    }
}

/// A live, not failed replica of the node on port `primary`.
fn replica_in(nodes: &[NodeLine], primary: u16, live: &[u16]) -> Option<u16> {
    let id = &nodes.iter().find(|n| n.port == primary)?.id;
    nodes
        .iter()
        .find(|n| {
            n.replica && !n.failed && n.primary.as_ref() == Some(id) && live.contains(&n.port)
        })
        .map(|n| n.port)
}

impl ClusterNode {
    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(["--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(self.dir.join("nodes.conf"))
            .arg("--cluster-port")
            .arg(self.bus_port.to_string())
            .arg("--cluster-node-timeout")
            .arg(NODE_TIMEOUT_MS.to_string())
            // A replica's first sync starts at once, not after the default
            // wait for more replicas to share it.
            .args(["--repl-diskless-sync-delay", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("redis-server: {e}")))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ping(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if node_query::<String>(self.port, &redis::cmd("PING")).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "cluster node on port {} did not answer PING (log: {})",
                    self.port,
                    self.dir.join("redis.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key written with `WAIT 1` survives a kill -9 of its primary: its
    /// replica takes over the slot and answers it; restarted, the old primary
    /// becomes its replica.
    #[test]
    fn a_replica_takes_over_a_killed_primary_with_its_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = LocalCluster::start(dir.path()).expect("cluster");
        assert_eq!(cluster.urls().len(), 6);
        let primaries = cluster.primaries();
        assert_eq!(primaries.len(), 3, "{:?}", cluster.slot_map());
        for &p in &primaries {
            let replica = cluster.replica_of(p).expect("every primary has a replica");
            assert!(!primaries.contains(&replica));
        }

        let key = "tg:raw:{0}";
        let primary = cluster.primary_of_key(key);
        let replica = cluster.replica_of(primary).expect("a replica");
        let mut con = redis::Client::open(cluster.node_url(primary))
            .expect("url")
            .get_connection()
            .expect("connect to the primary");
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("kept")
            .query(&mut con)
            .expect("SET");
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query(&mut con)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica has the write");

        assert_eq!(cluster.kill_primary_of_key(key), primary);
        cluster.wait_failover();
        assert_eq!(cluster.primary_of_key(key), replica);
        assert!(!cluster.primaries().contains(&primary));
        assert_eq!(cluster.primaries().len(), 3);
        let mut con = redis::Client::open(cluster.node_url(replica))
            .expect("url")
            .get_connection()
            .expect("connect to the new primary");
        let got: Option<String> = redis::cmd("GET").arg(key).query(&mut con).expect("GET");
        assert_eq!(got.as_deref(), Some("kept"));

        // The old primary comes back as the replica of its successor.
        cluster.restart(primary).expect("restart");
        cluster.wait_replicated();
        assert_eq!(cluster.primary_of_key(key), replica);
        assert_eq!(cluster.replica_of(replica), Some(primary));
    }
}
