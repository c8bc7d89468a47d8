//! Consumer-aware stream retention.
//!
//! Trimming on XADD (`MAXLEN ~ n`) deletes the oldest entries whether or not a
//! consumer group has read them: a worker stalled long enough would lose accepted
//! events without a trace. So writers never trim raw or enriched streams; the
//! worker that consumes a stream trims it instead, every second, with
//! `XTRIM MINID ~ <id>` where `<id>` is the lower of what the retention policy
//! allows and what every consumer group still needs (its oldest pending entry, or
//! else the entry after its last delivered one). A stream without any group is
//! never trimmed: nobody has consumed it yet.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::streams::{StreamInfoGroupsReply, StreamInfoStreamReply, StreamPendingReply};
use tickgraph_ingest::event::now_nanos;
use tickgraph_ingest::stream::EntryId;
use tickgraph_ingest::Trim;
use tokio_util::sync::CancellationToken;

/// How often each consuming worker trims its streams.
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

/// The oldest entry any consumer group of `key` still needs, or `None` when the
/// stream has no group (or does not exist).
pub async fn needed_from<C: ConnectionLike>(
    con: &mut C,
    key: &str,
) -> redis::RedisResult<Option<EntryId>> {
    let groups: StreamInfoGroupsReply = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(con)
        .await
    {
        Ok(g) => g,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut needed: Option<EntryId> = None;
    for g in groups.groups {
        let from = if g.pending > 0 {
            let pending: StreamPendingReply = redis::cmd("XPENDING")
                .arg(key)
                .arg(&g.name)
                .query_async(con)
                .await?;
            match pending {
                StreamPendingReply::Data(d) => d.start_id.parse::<EntryId>().ok(),
                _ => None,
            }
        } else {
            None
        };
        let from = match from {
            Some(id) => id,
            None => {
                let Ok(last) = g.last_delivered_id.parse::<EntryId>() else {
                    // An id we cannot read: keep everything rather than guess.
                    return Ok(Some(EntryId::default()));
                };
                EntryId {
                    ms: last.ms,
                    seq: last.seq.saturating_add(1),
                }
            }
        };
        needed = Some(needed.map_or(from, |n| n.min(from)));
    }
    Ok(needed)
}

/// The oldest entry the policy wants kept, or `None` when it keeps everything.
/// For `MaxLen` the id is estimated from the stream's first and last ids, which is
/// as exact as the `~` trimming it feeds.
async fn policy_from<C: ConnectionLike>(
    con: &mut C,
    key: &str,
    policy: Trim,
) -> redis::RedisResult<Option<EntryId>> {
    match policy {
        Trim::None => Ok(None),
        Trim::MaxAge(age) => {
            let now_ms = u64::try_from(now_nanos() / 1_000_000).unwrap_or(0);
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            Ok(Some(EntryId {
                ms: now_ms.saturating_sub(age_ms),
                seq: 0,
            }))
        }
        Trim::MaxLen(keep) => {
            let info: StreamInfoStreamReply = match redis::cmd("XINFO")
                .arg("STREAM")
                .arg(key)
                .query_async(con)
                .await
            {
                Ok(info) => info,
                // Nothing written yet: nothing to trim.
                Err(e) if e.to_string().contains("no such key") => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = u64::try_from(info.length).unwrap_or(0);
            if len <= keep {
                return Ok(None);
            }
            let (Ok(first), Ok(last)) = (
                info.first_entry.id.parse::<EntryId>(),
                info.last_entry.id.parse::<EntryId>(),
            ) else {
                return Ok(None);
            };
            let span = u128::from(last.ms.saturating_sub(first.ms));
            let drop_share = u128::from(len - keep);
            let ms = first.ms + u64::try_from(span * drop_share / u128::from(len)).unwrap_or(0);
            Ok(Some(EntryId { ms, seq: 0 }))
        }
    }
}

/// Trims `key` once; returns how many entries were deleted.
pub async fn trim_once<C: ConnectionLike>(
    con: &mut C,
    key: &str,
    policy: Trim,
) -> redis::RedisResult<u64> {
    let Some(wanted) = policy_from(con, key, policy).await? else {
        return Ok(0);
    };
    let Some(needed) = needed_from(con, key).await? else {
        return Ok(0);
    };
    let min_id = wanted.min(needed);
    redis::cmd("XTRIM")
        .arg(key)
        .arg("MINID")
        .arg("~")
        .arg(min_id.to_string())
        .query_async(con)
        .await
}

/// Trims `keys` every [`TRIM_EVERY`] until `shutdown`. Errors are logged and the
/// next round tries again: a missed trim only costs memory, never data.
pub fn spawn(
    client: tickgraph_ingest::redis_link::RedisTarget,
    keys: Vec<String>,
    policy: Trim,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if policy == Trim::None {
            return;
        }
        let mut con = None;
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if con.is_none() {
                match client
                    .connect(tickgraph_ingest::redis_link::ConnOpts::default())
                    .await
                {
                    Ok(c) => con = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "stream trimmer cannot connect; will retry");
                        continue;
                    }
                }
            }
            let Some(c) = con.as_mut() else { continue };
            let mut deleted = 0u64;
            for key in &keys {
                match trim_once(c, key, policy).await {
                    Ok(n) => deleted += n,
                    Err(e) => {
                        tracing::warn!(error = %e, key = %key, "stream trim failed; will retry");
                        con = None;
                        break;
                    }
                }
            }
            if deleted > 0 {
                tracing::debug!(deleted, %policy, "streams trimmed");
            }
        }
    })
}
