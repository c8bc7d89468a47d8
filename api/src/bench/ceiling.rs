//! Redis's own pipelined XADD ceiling on this machine, measured in the same run:
//! `redis-benchmark -P 64` adding 8-field entries, or an in-process pipelined
//! XADD loop when redis-benchmark is not installed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use redis::ConnectionAddr;

/// Pipeline depth, as in the reference figure.
const PIPELINE: usize = 64;
/// Entries of the in-process fallback: enough for a steady figure, short.
const FALLBACK_MAX: u64 = 200_000;

#[derive(Debug, Clone)]
pub struct Ceiling {
    /// XADD commands (one 8-field entry each) per second.
    pub xadd_per_sec: f64,
    /// How it was measured.
    pub method: String,
}

/// The `requests per second` figure of `redis-benchmark -q` output (the last
/// one, after the progress lines it rewrites with `\r`).
pub fn parse_requests_per_sec(out: &str) -> Option<f64> {
    out.split(['\r', '\n'])
        .filter_map(|line| {
            let before = &line[..line.find("requests per second")?];
            before
                .split_whitespace()
                .last()?
                .trim_end_matches(':')
                .parse()
                .ok()
        })
        .next_back()
}

fn fields() -> Vec<String> {
    (1..=8)
        .flat_map(|i| [format!("f{i}"), format!("v{i}")])
        .collect()
}

/// Measures, then deletes `key`.
pub async fn measure(client: &redis::Client, key: &str, requests: u64) -> anyhow::Result<Ceiling> {
    let info = client.get_connection_info();
    let (host, port) = match info.addr() {
        ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        other => bail!("the ceiling needs a plain TCP Redis, got {other:?}"),
    };
    let db = info.redis_settings().db();
    let mut cmd = tokio::process::Command::new("redis-benchmark");
    cmd.arg("-h")
        .arg(&host)
        .arg("-p")
        .arg(port.to_string())
        .arg("--dbnum")
        .arg(db.to_string())
        .arg("-q")
        .arg("-P")
        .arg(PIPELINE.to_string())
        .arg("-n")
        .arg(requests.to_string())
        .arg("XADD")
        .arg(key)
        .arg("*")
        .args(fields())
        .kill_on_drop(true);
    let method =
        format!("redis-benchmark -q -P {PIPELINE} -n {requests} XADD <key> '*' f1 v1 .. f8 v8");
    tracing::info!(%host, port, requests, "measuring Redis's pipelined XADD ceiling");
    let measured = match cmd.output().await {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_requests_per_sec(&text) {
                Some(rate) => Ok(Ceiling {
                    xadd_per_sec: rate,
                    method,
                }),
                None => Err(anyhow::anyhow!(
                    "no `requests per second` in redis-benchmark output: {:.300}",
                    text
                )),
            }
        }
        Ok(out) => Err(anyhow::anyhow!(
            "redis-benchmark failed ({}): {:.300}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("redis-benchmark not installed; measuring in process");
            in_process(client, key, requests.min(FALLBACK_MAX)).await
        }
        Err(e) => Err(e).context("running redis-benchmark"),
    };
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis to clean up")?;
    redis::cmd("DEL")
        .arg(key)
        .query_async::<()>(&mut con)
        .await
        .with_context(|| format!("DEL {key}"))?;
    // Hands the stream's memory back to the system, so Redis's RSS during the
    // load is the pipeline's; a Redis without jemalloc refuses, which is fine.
    let _: redis::RedisResult<()> = redis::cmd("MEMORY")
        .arg("PURGE")
        .query_async(&mut con)
        .await;
    measured
}

/// Waits until Redis runs no background save or AOF rewrite (a million XADDs
/// may have triggered one), so none runs under the load; at most `cap`.
pub async fn wait_persistence_idle(client: &redis::Client, cap: Duration) -> anyhow::Result<()> {
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let start = Instant::now();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut con)
            .await
            .context("INFO persistence")?;
        if persistence_idle(&info) {
            return Ok(());
        }
        if start.elapsed() >= cap {
            tracing::warn!("Redis still saves or rewrites its AOF; starting the load anyway");
            return Ok(());
        }
        tracing::info!("waiting for Redis's background save or AOF rewrite to finish");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether `INFO persistence` shows no save or rewrite running or scheduled.
fn persistence_idle(info: &str) -> bool {
    const BUSY: [&str; 3] = [
        "rdb_bgsave_in_progress:1",
        "aof_rewrite_in_progress:1",
        "aof_rewrite_scheduled:1",
    ];
    !info.lines().any(|l| BUSY.contains(&l.trim()))
}

/// Pipelined XADDs of 8-field entries from this process, one connection.
async fn in_process(client: &redis::Client, key: &str, requests: u64) -> anyhow::Result<Ceiling> {
    let mut con = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("connecting to Redis")?;
    let fields = fields();
    let start = Instant::now();
    let mut done = 0u64;
    while done < requests {
        let n = (requests - done).min(PIPELINE as u64);
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD").arg(key).arg("*").arg(&fields).ignore();
        }
        pipe.query_async::<()>(&mut con)
            .await
            .context("pipelined XADD")?;
        done += n;
    }
    Ok(Ceiling {
        xadd_per_sec: done as f64 / start.elapsed().as_secs_f64().max(1e-9),
        method: format!(
            "in process (redis-benchmark not installed): {done} XADDs, pipelines of {PIPELINE}"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_requests_per_sec, persistence_idle};

    #[test]
    fn persistence_is_idle_without_a_save_or_rewrite() {
        let idle = "# Persistence\r\nloading:0\r\nrdb_bgsave_in_progress:0\r\naof_rewrite_in_progress:0\r\naof_rewrite_scheduled:0\r\n";
        assert!(persistence_idle(idle));
        assert!(!persistence_idle(
            &idle.replace("aof_rewrite_scheduled:0", "aof_rewrite_scheduled:1")
        ));
        assert!(!persistence_idle(&idle.replace(
            "rdb_bgsave_in_progress:0",
            "rdb_bgsave_in_progress:1"
        )));
    }

    #[test]
    fn reads_the_figure_of_redis_benchmark_quiet_output() {
        let out = "XADD tg:ceiling * f1 v1 f2 v2: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r\
                   XADD tg:ceiling * f1 v1 f2 v2: rps=480012.0 (overall: 480012.0) avg_msec=5.9\r\
                   XADD tg:ceiling * f1 v1 f2 v2 f3 v3 f4 v4 f5 v5 f6 v6 f7 v7 f8 v8: 512820.53 requests per second, p50=5.887 msec                    \n\n";
        assert_eq!(parse_requests_per_sec(out), Some(512820.53));
        // Redis 6 prints no percentile.
        assert_eq!(
            parse_requests_per_sec("XADD k * f1 v1: 99.50 requests per second\n"),
            Some(99.5)
        );
        assert_eq!(
            parse_requests_per_sec("Could not connect to Redis at 127.0.0.1:1\n"),
            None
        );
    }
}
