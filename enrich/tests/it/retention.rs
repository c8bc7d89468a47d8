//! Retention trims behind the consumer groups: never an entry a group has not
//! consumed, and everything the policy allows once they have.

use tickgraph_enrich::retention::trim_once;
use tickgraph_ingest::stream::{ensure_group, ENRICH_GROUP};
use tickgraph_ingest::Trim;

use crate::helpers::TestRedis;

const N: u64 = 1000;

/// XADDs entries `1-0` .. `N-0`, so ids and positions line up.
async fn fill(r: &mut TestRedis, key: &str) {
    let mut pipe = redis::pipe();
    for i in 1..=N {
        pipe.cmd("XADD")
            .arg(key)
            .arg(format!("{i}-0"))
            .arg("e")
            .arg(i)
            .ignore();
    }
    pipe.query_async::<()>(&mut r.con).await.expect("xadd");
}

async fn xlen(r: &mut TestRedis, key: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut r.con)
        .await
        .expect("xlen")
}

async fn first_id(r: &mut TestRedis, key: &str) -> String {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut r.con)
        .await
        .expect("xrange");
    reply.ids.first().map(|e| e.id.clone()).unwrap_or_default()
}

async fn read(r: &mut TestRedis, key: &str, count: u64) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(ENRICH_GROUP)
        .arg("c")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(key)
        .arg(">")
        .query_async(&mut r.con)
        .await
        .expect("xreadgroup");
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|e| e.id)
        .collect()
}

async fn ack(r: &mut TestRedis, key: &str, ids: &[String]) {
    let _: u64 = redis::cmd("XACK")
        .arg(key)
        .arg(ENRICH_GROUP)
        .arg(ids)
        .query_async(&mut r.con)
        .await
        .expect("xack");
}

#[tokio::test]
async fn a_stream_nobody_consumes_is_never_trimmed() {
    let mut r = TestRedis::new(1).await;
    let key = r.layout.raw(0);
    fill(&mut r, &key).await;
    let deleted = trim_once(&mut r.con, &key, Trim::MaxLen(10))
        .await
        .expect("trim");
    assert_eq!(deleted, 0);
    assert_eq!(xlen(&mut r, &key).await, N);
}

#[tokio::test]
async fn trimming_stops_at_the_oldest_entry_a_group_still_needs() {
    let mut r = TestRedis::new(1).await;
    let key = r.layout.raw(0);
    ensure_group(&mut r.con, &key, ENRICH_GROUP)
        .await
        .expect("group");
    fill(&mut r, &key).await;

    // Delivered 600, acknowledged the first 300: entries from 301 on are needed
    // (300 pending, 400 never read), whatever the policy of 100 entries says.
    let delivered = read(&mut r, &key, 600).await;
    ack(&mut r, &key, &delivered[..300]).await;
    trim_once(&mut r.con, &key, Trim::MaxLen(100))
        .await
        .expect("trim");
    let first: tickgraph_ingest::stream::EntryId =
        first_id(&mut r, &key).await.parse().expect("id");
    assert!(
        first.ms <= 301,
        "an entry the group still needs was trimmed: first is now {first}"
    );
    assert!(xlen(&mut r, &key).await >= 700);

    // Once everything is consumed, the policy applies (give or take a node of the
    // approximate trim).
    ack(&mut r, &key, &delivered[300..]).await;
    let rest = read(&mut r, &key, N).await;
    assert_eq!(rest.len(), 400);
    ack(&mut r, &key, &rest).await;
    let deleted = trim_once(&mut r.con, &key, Trim::MaxLen(100))
        .await
        .expect("trim");
    assert!(deleted > 0);
    let len = xlen(&mut r, &key).await;
    assert!(
        (100..=300).contains(&len),
        "kept {len} entries for a policy of 100"
    );
}

#[tokio::test]
async fn max_age_trims_by_entry_time_behind_the_group() {
    let mut r = TestRedis::new(1).await;
    let key = r.layout.raw(0);
    ensure_group(&mut r.con, &key, ENRICH_GROUP)
        .await
        .expect("group");
    // Ids from 1970: older than any age; consumed, so all may go.
    fill(&mut r, &key).await;
    let all = read(&mut r, &key, N).await;
    ack(&mut r, &key, &all).await;
    // And one fresh entry, not yet read: it must stay.
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("e")
        .arg("new")
        .query_async(&mut r.con)
        .await
        .expect("xadd");
    trim_once(
        &mut r.con,
        &key,
        Trim::MaxAge(std::time::Duration::from_secs(60)),
    )
    .await
    .expect("trim");
    let len = xlen(&mut r, &key).await;
    assert!(len <= 101, "old consumed entries kept: {len}");
    let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut r.con)
        .await
        .expect("xrevrange");
    let newest = last.ids.first().expect("the unread fresh entry survives");
    assert!(matches!(newest.map.get("e"), Some(redis::Value::BulkString(b)) if b == b"new"));
}

/// A stream nobody has written yet is not an error: there is nothing to trim.
#[tokio::test]
async fn a_stream_not_yet_written_trims_nothing() {
    let mut r = TestRedis::new(1).await;
    let key = format!("{}:never:{{0}}", r.layout.prefix());
    for policy in [
        Trim::MaxLen(10),
        Trim::MaxAge(std::time::Duration::from_secs(60)),
    ] {
        let deleted = trim_once(&mut r.con, &key, policy)
            .await
            .expect("a missing stream trims nothing");
        assert_eq!(deleted, 0);
    }
}
