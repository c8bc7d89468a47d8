//! Dead letters listed and replayed, through the real enrich worker and loader:
//! an event for an unknown instrument is dead-lettered, the instrument is added,
//! the letter is replayed, and the event reaches the enriched stream and history
//! exactly once, however many replays run, concurrently or again.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use tickgraph_enrich::deadletter::{
    DeadLetterId, DeadLetters, Filter, ListRequest, Order, PayloadFormat, ReplayStatus, Stage,
};
use tickgraph_enrich::loader::{self, LoadConfig};
use tickgraph_enrich::worker::{self, EnrichConfig};
use tickgraph_enrich::{EnrichedRecord, RefCache};
use tickgraph_ingest::stream::{
    decode_entry, dlq_bytes_key, shard_of, DeadLetter, DlqBounds, RawRecord, ENRICH_GROUP,
    LOAD_GROUP,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{quote, seed_refdata, wait_until, TestRedis};

/// Enrich and load running on a test's streams and database, with the
/// reference data kept fresh by the real listener.
struct Rig {
    r: TestRedis,
    pool: PgPool,
    refs: RefCache,
    dead: DeadLetters,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Rig {
    async fn start(pool: PgPool, shards: u16, dedupe: Duration) -> Self {
        Self::start_with(pool, shards, dedupe, |_| {}).await
    }

    /// [`Rig::start`], with enrich's configuration changed by `tweak`.
    async fn start_with(
        pool: PgPool,
        shards: u16,
        dedupe: Duration,
        tweak: impl FnOnce(&mut EnrichConfig),
    ) -> Self {
        seed_refdata(&pool).await;
        let r = TestRedis::new(shards).await;
        let refs = RefCache::load(&pool).await.expect("refdata");
        let shutdown = CancellationToken::new();
        let listener = refs.spawn_listener(pool.clone(), shutdown.clone());
        let mut ecfg = EnrichConfig::new(r.layout.clone(), "e1");
        ecfg.block = Duration::from_millis(50);
        ecfg.dedupe_window = dedupe;
        tweak(&mut ecfg);
        let mut lcfg = LoadConfig::new(r.layout.clone(), "l1");
        lcfg.block = Duration::from_millis(50);
        lcfg.linger = Duration::ZERO;
        let (c, rf, s) = (r.client.clone(), refs.clone(), shutdown.clone());
        let enrich = tokio::spawn(async move {
            worker::run(ecfg, c, rf, s).await.expect("enrich runs");
        });
        let (c, p, s) = (r.client.clone(), pool.clone(), shutdown.clone());
        let load = tokio::spawn(async move {
            loader::run(lcfg, c, p, s).await.expect("load runs");
        });
        let listener = tokio::spawn(async move {
            let _ = listener.await;
        });
        let dead =
            DeadLetters::new(&r.client.clone().into(), r.layout.clone()).expect("dead letters");
        Self {
            r,
            pool,
            refs,
            dead,
            shutdown,
            tasks: vec![enrich, load, listener],
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("stops after shutdown")
                .expect("task");
        }
    }

    /// Waits until enrich and load have taken everything now in their streams.
    async fn settle(&mut self) {
        let raw: Vec<String> = self
            .r
            .layout
            .shard_ids()
            .map(|s| self.r.layout.raw(s))
            .collect();
        self.r.wait_drained(&raw, ENRICH_GROUP).await;
        let enriched: Vec<String> = self
            .r
            .layout
            .shard_ids()
            .map(|s| self.r.layout.enriched(s))
            .collect();
        self.r.wait_drained(&enriched, LOAD_GROUP).await;
    }

    /// How many times each event id is in the enriched streams.
    async fn enriched_counts(&mut self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for s in self.r.layout.shard_ids().collect::<Vec<_>>() {
            for e in self.r.range(&self.r.layout.enriched(s)).await {
                let bytes = e.record.expect("enriched entry has its record");
                for rec in decode_entry::<EnrichedRecord>(&bytes).expect("decodes") {
                    *out.entry(rec.event.id()).or_default() += 1;
                }
            }
        }
        out
    }

    /// How many rows each event id has in history.
    async fn history_counts(&self) -> HashMap<String, usize> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT source || ':' || seq, count(*) FROM \
             (SELECT source, seq FROM quotes UNION ALL SELECT source, seq FROM trades) h \
             GROUP BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .expect("history counts");
        rows.into_iter()
            .map(|(id, n)| (id, usize::try_from(n).unwrap_or(0)))
            .collect()
    }

    async fn dlq_len(&mut self) -> usize {
        let mut n = 0;
        for key in self.r.layout.all_dlqs() {
            n += self.r.range_fields(&key).await.len();
        }
        n
    }

    async fn add_instrument(&self, symbol: &str) {
        sqlx::query(
            "INSERT INTO instruments (symbol, name, asset_class, currency, venue, tick_size, lot_size) \
             VALUES ($1, 'New Company', 'equity', 'USD', 'XNAS', 0.01, 1)",
        )
        .bind(symbol)
        .execute(&self.pool)
        .await
        .expect("insert instrument");
        let refs = self.refs.clone();
        let symbol = symbol.to_owned();
        wait_until("enrich's reference data has the new instrument", || {
            let has = refs.read().instruments.contains_key(symbol.as_str());
            async move { has }
        })
        .await;
    }

    /// Every letter, oldest first.
    async fn all_letters(&self) -> Vec<tickgraph_enrich::deadletter::DeadLetterView> {
        let page = self
            .dead
            .list(&ListRequest {
                order: Order::OldestFirst,
                limit: 10_000,
                ..ListRequest::default()
            })
            .await
            .expect("list");
        assert!(page.next.is_none());
        page.items
    }
}

/// `n` quotes of instrument `NEWCO` (unknown until added), seqs from `first`.
fn newco(first: u64, n: u64) -> Vec<RawRecord> {
    (first..first + n)
        .map(|seq| quote(seq, "NEWCO", "XNAS", "10.00", "10.02"))
        .collect()
}

async fn dead_letter_newco(rig: &mut Rig, n: u64) {
    rig.r.add_raw(&newco(1, n)).await;
    // A good event goes through meanwhile.
    rig.r
        .add_raw(&[quote(999, "AAPL", "XNAS", "187.25", "187.26")])
        .await;
    rig.settle().await;
    assert_eq!(rig.dlq_len().await, usize::try_from(n).unwrap_or(0));
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unknown_instruments_event_is_listed_then_replayed_once_after_the_fix(pool: PgPool) {
    let mut rig = Rig::start(pool, 2, Duration::from_secs(600)).await;
    dead_letter_newco(&mut rig, 1).await;

    let letters = rig.all_letters().await;
    assert_eq!(letters.len(), 1);
    let d = &letters[0];
    assert_eq!(d.stage, "enrich");
    assert_eq!(d.reason, "unknown instrument \"NEWCO\"");
    assert_eq!(d.event_id.as_deref(), Some("it:1"));
    assert!(d.replayable, "{:?}", d.not_replayable_reason);
    assert_eq!(d.payload.format, PayloadFormat::Json);
    assert!(d.payload.text.contains("\"NEWCO\""), "{}", d.payload.text);
    let shard = shard_of("NEWCO", rig.r.layout.shards());
    assert_eq!(d.id.stream, rig.r.layout.dlq(shard));

    rig.add_instrument("NEWCO").await;
    let report = rig
        .dead
        .replay_ids(std::slice::from_ref(&d.id), false)
        .await
        .expect("replay");
    assert_eq!(report.counts.replayed, 1, "{report:?}");
    let raw_entry = report.outcomes[0].detail.clone().expect("raw entry");
    assert!(
        raw_entry.starts_with(&rig.r.layout.raw(shard)),
        "{raw_entry}"
    );
    rig.settle().await;

    assert_eq!(rig.dlq_len().await, 0);
    assert_eq!(rig.enriched_counts().await.get("it:1"), Some(&1));
    assert_eq!(rig.history_counts().await.get("it:1"), Some(&1));
    // The replayed event keeps the time ingest first accepted it.
    let ingest_ns: i64 = sqlx::query_scalar("SELECT ingest_ns FROM quotes WHERE seq = 1")
        .fetch_one(&rig.pool)
        .await
        .expect("row");
    assert_eq!(ingest_ns, newco(1, 1)[0].ingest_ns);

    // Again, as after a lost reply: nothing more.
    let again = rig
        .dead
        .replay_ids(std::slice::from_ref(&d.id), false)
        .await
        .expect("replay");
    assert_eq!(again.outcomes[0].status, ReplayStatus::NotFound);
    rig.settle().await;
    assert_eq!(rig.enriched_counts().await.get("it:1"), Some(&1));
    assert_eq!(rig.history_counts().await.get("it:1"), Some(&1));
    rig.stop().await;
}

/// Three replays of the same twenty letters at once: by id, and two of
/// `replay_matching`. Each event must be replayed by exactly one of them.
async fn concurrent_replays_reach_history_once(pool: PgPool, dedupe: Duration) {
    let mut rig = Rig::start(pool, 2, dedupe).await;
    dead_letter_newco(&mut rig, 20).await;
    rig.add_instrument("NEWCO").await;
    let ids: Vec<DeadLetterId> = rig.all_letters().await.into_iter().map(|d| d.id).collect();
    assert_eq!(ids.len(), 20);

    // Each on a connection of its own, as separate processes would be.
    let other = || {
        DeadLetters::new(&rig.r.client.clone().into(), rig.r.layout.clone()).expect("dead letters")
    };
    let (second, third) = (other(), other());
    let all = Filter::default();
    let (a, b, c) = tokio::join!(
        rig.dead.replay_ids(&ids, false),
        second.replay_matching(&all, None, 1000, false),
        third.replay_matching(&all, None, 1000, false),
    );
    let reports = [a.expect("by id"), b.expect("all"), c.expect("all")];
    let replayed: usize = reports.iter().map(|r| r.counts.replayed).sum();
    let failed: usize = reports.iter().map(|r| r.counts.failed).sum();
    let counts: Vec<_> = reports.iter().map(|r| r.counts).collect();
    assert_eq!((replayed, failed), (20, 0), "{counts:?}");
    rig.settle().await;

    let enriched = rig.enriched_counts().await;
    let history = rig.history_counts().await;
    for seq in 1..=20 {
        let id = format!("it:{seq}");
        assert_eq!(enriched.get(&id), Some(&1), "{id} in the enriched streams");
        assert_eq!(history.get(&id), Some(&1), "{id} in history");
    }
    assert_eq!(rig.dlq_len().await, 0);
    rig.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_replays_reach_history_once_with_dedupe(pool: PgPool) {
    concurrent_replays_reach_history_once(pool, Duration::from_secs(600)).await;
}

/// Without enrich's dedupe window, the replay script's XDEL gate is the only
/// guard: this is the test that fails if it goes.
#[sqlx::test(migrations = "../migrations")]
async fn concurrent_replays_reach_history_once_without_dedupe(pool: PgPool) {
    concurrent_replays_reach_history_once(pool, Duration::ZERO).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replay_before_the_fix_dead_letters_again_and_a_run_does_not_chase_it(pool: PgPool) {
    let mut rig = Rig::start(pool, 2, Duration::from_secs(600)).await;
    dead_letter_newco(&mut rig, 12).await;
    let before: Vec<DeadLetterId> = rig.all_letters().await.into_iter().map(|d| d.id).collect();

    // Ten letters a call, following `next` while enrich dead-letters the
    // replayed events again behind it: the run ends after the twelve.
    let mut replayed = 0;
    let mut from = None;
    for call in 0.. {
        assert!(
            call < 10,
            "the run keeps finding letters: it chases its own"
        );
        let r = rig
            .dead
            .replay_matching(&Filter::default(), from.take(), 10, false)
            .await
            .expect("replay");
        replayed += r.counts.replayed;
        rig.settle().await;
        match r.next {
            Some(n) => from = Some(n.parse().expect("cursor")),
            None => break,
        }
    }
    assert_eq!(replayed, 12);

    let after = rig.all_letters().await;
    assert_eq!(after.len(), 12, "each dead-lettered again, once");
    for d in &after {
        assert!(!before.contains(&d.id), "a new letter, not the old one");
        assert_eq!(d.reason, "unknown instrument \"NEWCO\"");
    }
    assert!(rig.enriched_counts().await.keys().all(|k| k == "it:999"));

    // Fixed now: one more replay brings them in, once each.
    rig.add_instrument("NEWCO").await;
    let r = rig
        .dead
        .replay_matching(&Filter::default(), None, 1000, false)
        .await
        .expect("replay");
    assert_eq!(r.counts.replayed, 12);
    rig.settle().await;
    let history = rig.history_counts().await;
    assert!(
        (1..=12).all(|s| history.get(&format!("it:{s}")) == Some(&1)),
        "{history:?}"
    );
    rig.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_letter_whose_event_was_re_sent_and_enriched_is_removed_not_replayed(pool: PgPool) {
    let mut rig = Rig::start(pool, 1, Duration::from_secs(600)).await;
    dead_letter_newco(&mut rig, 1).await;
    rig.add_instrument("NEWCO").await;
    // The producer re-sends the event after the fix; it is enriched.
    rig.r.add_raw(&newco(1, 1)).await;
    rig.settle().await;
    assert_eq!(rig.enriched_counts().await.get("it:1"), Some(&1));

    let ids: Vec<DeadLetterId> = rig.all_letters().await.into_iter().map(|d| d.id).collect();
    let dry = rig.dead.replay_ids(&ids, true).await.expect("dry run");
    assert_eq!(dry.outcomes[0].status, ReplayStatus::AlreadyEnriched);
    assert_eq!(rig.dlq_len().await, 1, "a dry run changes nothing");
    let r = rig.dead.replay_ids(&ids, false).await.expect("replay");
    assert_eq!(r.outcomes[0].status, ReplayStatus::AlreadyEnriched);
    rig.settle().await;
    assert_eq!(rig.dlq_len().await, 0);
    assert_eq!(rig.enriched_counts().await.get("it:1"), Some(&1));
    assert_eq!(rig.history_counts().await.get("it:1"), Some(&1));
    rig.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn ingest_and_other_letters_are_reported_not_replayable_and_kept(pool: PgPool) {
    let mut rig = Rig::start(pool, 2, Duration::from_secs(600)).await;
    let ingest_dlq = rig.r.layout.ingest_dlq();
    let malformed = DeadLetter::new(
        "ingest",
        "`price`: invalid type: boolean `true`".into(),
        br#"{"kind":"trade","price":true}"#.to_vec(),
    );
    let binary = DeadLetter::new("ingest", "not an event".into(), vec![0xc1, 0x00, 0xff]);
    for d in [&malformed, &binary] {
        let _: i64 = d
            .append(&ingest_dlq, DlqBounds::DEFAULT)
            .query_async(&mut rig.r.con)
            .await
            .expect("xadd");
    }
    // An event whose own values overflow: no reference fix cures it.
    rig.r
        .add_raw(&[quote(
            5,
            "AAPL",
            "XNAS",
            "79228162514264337593543950335",
            "79228162514264337593543950335",
        )])
        .await;
    rig.settle().await;

    let letters = rig.all_letters().await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    let by_stage = |s: &str| letters.iter().filter(|d| d.stage == s).collect::<Vec<_>>();
    let ingest = by_stage("ingest");
    assert_eq!(ingest.len(), 2);
    assert!(ingest.iter().all(|d| !d.replayable));
    assert!(ingest.iter().all(|d| d
        .not_replayable_reason
        .as_deref()
        .unwrap_or("")
        .contains("malformed or invalid")));
    assert_eq!(ingest[0].payload.format, PayloadFormat::Json);
    assert_eq!(ingest[1].payload.format, PayloadFormat::Base64);
    assert_eq!(ingest[1].payload.text, "wQD/");
    let overflow = by_stage("enrich");
    assert_eq!(overflow.len(), 1);
    assert!(!overflow[0].replayable, "{:?}", overflow[0]);

    let r = rig
        .dead
        .replay_matching(&Filter::default(), None, 1000, false)
        .await
        .expect("replay");
    assert_eq!(r.counts.not_replayable, 3, "{r:?}");
    assert_eq!(r.outcomes.len(), 3, "an outcome per letter, none skipped");
    let by_id = rig
        .dead
        .replay_ids(std::slice::from_ref(&ingest[0].id), false)
        .await
        .expect("replay");
    assert_eq!(by_id.outcomes[0].status, ReplayStatus::NotReplayable);
    assert_eq!(rig.dlq_len().await, 3, "nothing removed");
    rig.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn lists_page_by_page_with_filters_in_either_order(pool: PgPool) {
    let mut rig = Rig::start(pool, 3, Duration::from_secs(600)).await;
    // Letters on several shards (instruments spread) and in ingest's stream.
    for (seq, sym) in ["ZA", "ZB", "ZC", "ZD", "ZE", "ZF"].iter().enumerate() {
        rig.r
            .add_raw(&[quote(seq as u64 + 1, sym, "XNAS", "1", "2")])
            .await;
    }
    rig.r.add_raw(&[quote(50, "AAPL", "XXXX", "1", "2")]).await;
    rig.settle().await;
    let ingest = DeadLetter::new("ingest", "bad json".into(), b"{".to_vec());
    let _: i64 = ingest
        .append(&rig.r.layout.ingest_dlq(), DlqBounds::DEFAULT)
        .query_async(&mut rig.r.con)
        .await
        .expect("xadd");

    let everything = rig.all_letters().await;
    assert_eq!(everything.len(), 8);
    let oldest: Vec<String> = everything.iter().map(|d| d.id.to_string()).collect();
    for (order, want) in [
        (Order::OldestFirst, oldest.clone()),
        (Order::NewestFirst, oldest.iter().rev().cloned().collect()),
    ] {
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let page = rig
                .dead
                .list(&ListRequest {
                    order,
                    after: after.take(),
                    limit: 3,
                    ..ListRequest::default()
                })
                .await
                .expect("list");
            assert!(page.items.len() <= 3);
            got.extend(page.items.iter().map(|d| d.id.to_string()));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, want, "{order:?}");
    }

    let only = |filter: Filter| {
        let dead = rig.dead.clone();
        async move {
            dead.list(&ListRequest {
                filter,
                limit: 100,
                ..ListRequest::default()
            })
            .await
            .expect("list")
            .items
        }
    };
    let ingest_only = only(Filter {
        stage: Some(Stage::Ingest),
        ..Filter::default()
    })
    .await;
    assert_eq!(ingest_only.len(), 1);
    assert_eq!(ingest_only[0].payload.format, PayloadFormat::Text);
    let venue = only(Filter {
        reason: Some("UNKNOWN VENUE".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(venue.len(), 1);
    assert_eq!(venue[0].event_id.as_deref(), Some("it:50"));
    assert!(venue[0].replayable);
    let one_stream = rig.r.layout.dlq(1);
    let stream = only(Filter {
        stream: Some(one_stream.clone()),
        ..Filter::default()
    })
    .await;
    assert!(stream.iter().all(|d| d.id.stream == one_stream));
    let bad = rig
        .dead
        .list(&ListRequest {
            filter: Filter {
                stream: Some(rig.r.layout.raw(0)),
                ..Filter::default()
            },
            limit: 1,
            ..ListRequest::default()
        })
        .await;
    assert!(bad.is_err(), "a raw stream is not a dead-letter stream");
    let raw_id: DeadLetterId = format!("{}/1-0", rig.r.layout.raw(0)).parse().expect("id");
    let r = rig.dead.replay_ids(&[raw_id], false).await.expect("report");
    assert_eq!(r.outcomes[0].status, ReplayStatus::NotFound);
    rig.stop().await;
}

/// The `size` of each letter of `key`, oldest first, and the stream's count.
async fn sizes_and_count(rig: &mut Rig, key: &str) -> (Vec<u64>, u64) {
    let sizes = rig
        .r
        .range_fields(key)
        .await
        .iter()
        .map(|f| {
            f.get("size")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse().ok())
                .expect("every letter has its size")
        })
        .collect();
    let count: Option<u64> = redis::cmd("GET")
        .arg(dlq_bytes_key(key))
        .query_async(&mut rig.r.con)
        .await
        .expect("GET");
    (sizes, count.unwrap_or(0))
}

/// A shard's dead letters are bounded in bytes, not only in letters: 400
/// letters of some 400 bytes into a 16 KiB bound leave the newest that fit,
/// and the count follows letters added, trimmed and replayed.
#[sqlx::test(migrations = "../migrations")]
async fn a_shards_dead_letters_are_bounded_in_bytes_and_replays_keep_the_count(pool: PgPool) {
    const MAX: u64 = 16 * 1024;
    let mut rig = Rig::start_with(pool, 1, Duration::from_secs(600), |c| {
        c.dlq.max_bytes = MAX;
    })
    .await;
    rig.r.add_raw(&newco(1, 400)).await;
    rig.settle().await;
    let key = rig.r.layout.dlq(0);
    let (sizes, count) = sizes_and_count(&mut rig, &key).await;
    assert!(
        sizes.len() < 400 && sizes.len() > 10,
        "{} letters kept",
        sizes.len()
    );
    assert_eq!(sizes.iter().sum::<u64>(), count);
    assert!(count <= MAX, "{count} bytes over the bound of {MAX}");
    let letters = rig.all_letters().await;
    assert_eq!(
        letters.last().and_then(|d| d.event_id.as_deref()),
        Some("it:400"),
        "the newest letters are kept"
    );

    rig.add_instrument("NEWCO").await;
    let newest = letters.last().map(|d| d.id.clone()).expect("a letter");
    let r = rig.dead.replay_ids(&[newest], false).await.expect("replay");
    assert_eq!(r.outcomes[0].status, ReplayStatus::Replayed);
    let (after, count_after) = sizes_and_count(&mut rig, &key).await;
    assert_eq!(after.len(), sizes.len() - 1);
    assert_eq!(after.iter().sum::<u64>(), count_after);
    assert_eq!(count_after, count - sizes[sizes.len() - 1]);
    rig.settle().await;
    rig.stop().await;
}
