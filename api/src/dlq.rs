//! `tickgraph dlq list|replay`: the operator's command over the dead-letter
//! streams (`tickgraph_enrich::deadletter` does the work). [`run`] writes to any
//! `Write`, so the tests call what the binary calls. [`letter_venue`] and
//! [`may_see`] decide which letters an administrator's entitlements show
//! over GraphQL; the command needs no token, so it shows them all.

use std::io::Write;

use clap::{Args, Subcommand};
use tickgraph_enrich::deadletter::{
    DeadLetterError, DeadLetterId, DeadLetterView, DeadLetters, Filter, ListRequest, Order,
    PayloadFormat, ReplayCounts, ReplayCursor, ReplayReport, Stage,
};

use crate::auth::{Principal, Scope};

/// The venue of a dead letter's event, when its payload names one where each
/// stage writes it: an ingest letter holds the event as the producer sent it
/// (`venue` at its top, JSON or a MessagePack map), an enrich letter the
/// accepted event (`{"<kind>": {"header": {"venue": ..}}}`), a load letter the
/// enriched record (that event under `event`). A payload in any other shape
/// (not JSON or MessagePack, cut at 16 KiB, a positional record, a whole raw
/// entry) has none.
pub fn letter_venue(d: &DeadLetterView) -> Option<String> {
    if !matches!(
        d.payload.format,
        PayloadFormat::Json | PayloadFormat::MessagePack
    ) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&d.payload.text).ok()?;
    let event_venue = |e: &serde_json::Value| {
        let kinds = e.as_object().filter(|o| o.len() == 1)?;
        let (_, body) = kinds.iter().next()?;
        body.get("header")?
            .get("venue")?
            .as_str()
            .map(str::to_owned)
    };
    match d.stage.as_str() {
        "ingest" => v.get("venue")?.as_str().map(str::to_owned),
        "enrich" => event_venue(&v),
        "load" => event_venue(v.get("event")?),
        _ => None,
    }
}

/// Whether `who` may see this letter: one of a venue it is entitled to. A
/// letter whose venue is unknown (see [`letter_venue`]) is shown only to a
/// principal entitled to every venue, since it may be any venue's.
pub fn may_see(who: &Principal, d: &DeadLetterView) -> bool {
    match &who.entitlements().venues {
        Scope::All => true,
        Scope::Only(venues) => letter_venue(d).is_some_and(|v| venues.contains(&v)),
    }
}

#[derive(Args, Debug, Clone)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DlqCommand {
    /// List dead-lettered events with their reasons, newest first.
    List(ListArgs),
    /// Put dead-lettered events back on their raw stream, for enrich to take
    /// again once the reference data is fixed. Each reaches history at most once,
    /// however often or concurrently this runs.
    Replay(ReplayArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Only letters of this stage: ingest, enrich or load.
    #[arg(long)]
    pub stage: Option<Stage>,
    /// Only letters whose reason contains this (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this dead-letter stream (e.g. `tg:dlq:{2}`).
    #[arg(long)]
    pub stream: Option<String>,
    /// Letters per page.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Start after this letter (the cursor the previous page printed).
    #[arg(long)]
    pub after: Option<String>,
    /// Oldest first.
    #[arg(long)]
    pub oldest_first: bool,
    /// One JSON object: `items` (payloads as JSON when they are JSON or
    /// MessagePack) and `next`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
pub struct ReplayArgs {
    /// A letter to replay, `<stream>/<entry id>` as `list` shows it; repeatable.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Every letter there now (narrowed by --stage and --reason), oldest first;
    /// the ones a replay cannot cure are reported, not replayed.
    #[arg(long)]
    pub all: bool,
    /// With --all: only letters of this stage.
    #[arg(long, conflicts_with = "ids")]
    pub stage: Option<Stage>,
    /// With --all: only letters whose reason contains this (case-insensitive).
    #[arg(long, conflicts_with = "ids")]
    pub reason: Option<String>,
    /// Say what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object: counts and every outcome.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding JSON output: {0}")]
    Json(#[from] serde_json::Error),
}

/// Letters looked at per replay call of `--all`.
const REPLAY_CHUNK: usize = 1000;

/// Runs one `dlq` subcommand, printing to `out`; returns the replay counts
/// (zero for `list`), so the binary can fail when some replays failed.
pub async fn run(
    args: &DlqArgs,
    dead: &DeadLetters,
    out: &mut (dyn Write + Send),
) -> Result<ReplayCounts, DlqError> {
    match &args.command {
        DlqCommand::List(a) => {
            list(a, dead, out).await?;
            Ok(ReplayCounts::default())
        }
        DlqCommand::Replay(a) => replay(a, dead, out).await,
    }
}

async fn list(
    a: &ListArgs,
    dead: &DeadLetters,
    out: &mut (dyn Write + Send),
) -> Result<(), DlqError> {
    let req = ListRequest {
        filter: Filter {
            stream: a.stream.clone(),
            stage: a.stage,
            reason: a.reason.clone(),
        },
        order: if a.oldest_first {
            Order::OldestFirst
        } else {
            Order::NewestFirst
        },
        after: a.after.as_deref().map(str::parse).transpose()?,
        limit: a.limit,
    };
    let page = dead.list(&req).await?;
    if a.json {
        let items: Vec<serde_json::Value> = page.items.iter().map(json_item).collect();
        let doc = serde_json::json!({
            "items": items,
            "next": page.next.as_ref().map(ToString::to_string),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    if page.items.is_empty() {
        writeln!(out, "no dead letters match")?;
    }
    for d in &page.items {
        let at = d
            .at_ns
            .map(|ns| chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339())
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{}  {}  {}  event {}  {}",
            d.id,
            d.stage,
            at,
            d.event_id.as_deref().unwrap_or("-"),
            if d.replayable {
                "replayable"
            } else {
                "not replayable"
            },
        )?;
        writeln!(out, "    reason: {}", d.reason)?;
        if let Some(why) = &d.not_replayable_reason {
            writeln!(out, "    not replayable: {why}")?;
        }
        writeln!(
            out,
            "    payload ({}, {} bytes): {}",
            serde_json::to_value(d.payload.format)?
                .as_str()
                .unwrap_or_default(),
            d.payload.bytes,
            preview(&d.payload.text, 300),
        )?;
    }
    match &page.next {
        Some(next) => writeln!(
            out,
            "{} shown; next page: --after '{next}'",
            page.items.len()
        )?,
        None => writeln!(out, "{} shown; no more", page.items.len())?,
    }
    Ok(())
}

/// A listed letter as JSON, with a JSON or MessagePack payload inlined as JSON.
fn json_item(d: &DeadLetterView) -> serde_json::Value {
    let mut v = serde_json::to_value(d).unwrap_or_default();
    use tickgraph_enrich::deadletter::PayloadFormat as F;
    if matches!(d.payload.format, F::Json | F::MessagePack) {
        if let Ok(inline) = serde_json::from_str::<serde_json::Value>(&d.payload.text) {
            v["payload"]["json"] = inline;
        }
    }
    v
}

fn preview(text: &str, max_chars: usize) -> String {
    let one_line = text.replace('\n', "\\n");
    match one_line.char_indices().nth(max_chars) {
        Some((cut, _)) => format!(
            "{}... ({} more chars; --json for all)",
            &one_line[..cut],
            one_line[cut..].chars().count()
        ),
        None => one_line,
    }
}

async fn replay(
    a: &ReplayArgs,
    dead: &DeadLetters,
    out: &mut (dyn Write + Send),
) -> Result<ReplayCounts, DlqError> {
    let mut all = ReplayReport::default();
    if a.all {
        let filter = Filter {
            stream: None,
            stage: a.stage,
            reason: a.reason.clone(),
        };
        let mut from: Option<ReplayCursor> = None;
        loop {
            let r = dead
                .replay_matching(&filter, from.take(), REPLAY_CHUNK, a.dry_run)
                .await?;
            let next = r.next.clone();
            merge(&mut all, r);
            if !a.json {
                flush_outcomes(&mut all, out)?;
            }
            match next {
                Some(n) => from = Some(n.parse()?),
                None => break,
            }
        }
    } else {
        let ids = a
            .ids
            .iter()
            .map(|i| i.parse::<DeadLetterId>())
            .collect::<Result<Vec<_>, _>>()?;
        merge(&mut all, dead.replay_ids(&ids, a.dry_run).await?);
        if !a.json {
            flush_outcomes(&mut all, out)?;
        }
    }
    let c = all.counts;
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
    } else {
        writeln!(
            out,
            "{}{} replayed, {} would replay, {} already enriched, {} not found, {} not replayable, {} failed",
            if a.dry_run { "dry run: " } else { "" },
            c.replayed,
            c.would_replay,
            c.already_enriched,
            c.not_found,
            c.not_replayable,
            c.failed,
        )?;
    }
    Ok(c)
}

fn merge(all: &mut ReplayReport, r: ReplayReport) {
    let c = &mut all.counts;
    c.replayed += r.counts.replayed;
    c.would_replay += r.counts.would_replay;
    c.already_enriched += r.counts.already_enriched;
    c.not_found += r.counts.not_found;
    c.not_replayable += r.counts.not_replayable;
    c.failed += r.counts.failed;
    all.outcomes.extend(r.outcomes);
}

/// Prints the outcomes gathered so far and forgets them, so a long `--all`
/// run shows progress and holds little.
fn flush_outcomes(all: &mut ReplayReport, out: &mut (dyn Write + Send)) -> Result<(), DlqError> {
    for o in all.outcomes.drain(..) {
        let status = serde_json::to_value(o.status)?;
        writeln!(
            out,
            "{}  {}  event {}  {}",
            o.id,
            status.as_str().unwrap_or_default(),
            o.event_id.as_deref().unwrap_or("-"),
            o.detail.as_deref().unwrap_or(""),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DlqCommand,
    }

    #[test]
    fn replay_takes_ids_or_all_and_filters_only_with_all() {
        let ok = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("dlq").chain(args.iter().copied())).is_ok()
        };
        assert!(ok(&[
            "replay",
            "--id",
            "tg:dlq:{0}/1-0",
            "--id",
            "tg:dlq:{1}/2-0"
        ]));
        assert!(ok(&[
            "replay",
            "--all",
            "--stage",
            "ENRICH",
            "--reason",
            "unknown",
            "--dry-run"
        ]));
        assert!(!ok(&["replay"]));
        assert!(!ok(&["replay", "--all", "--id", "tg:dlq:{0}/1-0"]));
        assert!(!ok(&["replay", "--id", "tg:dlq:{0}/1-0", "--reason", "x"]));
        assert!(!ok(&["list", "--stage", "transform"]));
        assert!(ok(&["list", "--stage", "ingest", "--limit", "5", "--json"]));
    }

    fn letter(stage: &str, payload: &[u8]) -> DeadLetterView {
        DeadLetterView {
            id: "tg:dlq:{0}/1-0".parse().expect("id"),
            stage: stage.into(),
            reason: "test".into(),
            at_ns: None,
            event_id: None,
            payload: tickgraph_enrich::deadletter::Payload::render(payload),
            replayable: false,
            not_replayable_reason: None,
        }
    }

    /// The event enrich and load write into their letters.
    fn record() -> tickgraph_enrich::record::EnrichedRecord {
        use tickgraph_ingest::event::{Header, Mic, Source, Symbol};
        let d = |s: &str| s.parse::<rust_decimal::Decimal>().expect("decimal");
        tickgraph_enrich::record::EnrichedRecord {
            event: tickgraph_ingest::Event::Quote(tickgraph_ingest::Quote {
                header: Header {
                    source: Source::parse("feed").expect("source"),
                    seq: 1,
                    instrument: Symbol::parse("VOD.L").expect("symbol"),
                    venue: Mic::parse("XLON").expect("mic"),
                    ts: tickgraph_ingest::Timestamp::from_nanos(1_732_550_000_000_000_000)
                        .expect("ts"),
                },
                bid: d("1"),
                ask: d("2"),
                bid_size: d("1"),
                ask_size: d("1"),
            }),
            ingest_ns: 1,
            enriched_ns: 2,
            asset_class: tickgraph_enrich::refdata::AssetClass::Equity,
            currency: "GBP".into(),
            derived: tickgraph_enrich::record::Derived::Quote {
                mid: d("1.5"),
                spread: d("1"),
            },
        }
    }

    #[test]
    fn a_letter_has_the_venue_its_stage_wrote_or_none() {
        let rec = record();
        let enrich = serde_json::to_vec(&rec.event).expect("event JSON");
        let load = serde_json::to_vec(&rec).expect("record JSON");
        let ingest_json = br#"{"kind":"quote","venue":"XNAS","bid":true}"#;
        let ingest_msgpack =
            rmp_serde::to_vec_named(&serde_json::json!({"kind": "quote", "venue": "XNAS"}))
                .expect("MessagePack");
        for (stage, payload, want) in [
            ("enrich", enrich.as_slice(), Some("XLON")),
            ("load", load.as_slice(), Some("XLON")),
            ("ingest", ingest_json.as_slice(), Some("XNAS")),
            ("ingest", ingest_msgpack.as_slice(), Some("XNAS")),
            // Another stage's shape, a batch, text, binary, a cut payload.
            ("ingest", enrich.as_slice(), None),
            ("enrich", ingest_json.as_slice(), None),
            ("ingest", br#"[{"venue":"XNAS"}]"#.as_slice(), None),
            ("ingest", br#"{"venue": 7}"#.as_slice(), None),
            ("ingest", b"venue=XNAS".as_slice(), None),
            ("ingest", b"\xff\x00".as_slice(), None),
            ("ingest", br#"{"venue":"XNAS","bid":"#.as_slice(), None),
        ] {
            let got = letter_venue(&letter(stage, payload));
            assert_eq!(
                got.as_deref(),
                want,
                "{stage}: {}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn an_admin_sees_the_letters_of_its_venues_and_unknown_ones_only_with_all() {
        use crate::auth::Entitlements;
        let rec = record();
        let xlon = letter("enrich", &serde_json::to_vec(&rec.event).expect("JSON"));
        let unknown = letter("ingest", b"not an event");
        let with = |venues: Scope<String>| {
            Principal::new(
                "ops",
                Entitlements {
                    venues,
                    asset_classes: Scope::All,
                },
                true,
                None,
            )
        };
        let all = with(Scope::All);
        let london = with(Scope::Only(vec!["XLON".into()]));
        let nasdaq = with(Scope::Only(vec!["XNAS".into()]));
        assert!(may_see(&all, &xlon) && may_see(&all, &unknown));
        assert!(may_see(&london, &xlon) && !may_see(&london, &unknown));
        assert!(!may_see(&nasdaq, &xlon) && !may_see(&nasdaq, &unknown));
        assert!(may_see(&Principal::dev(), &unknown));
    }

    #[test]
    fn previews_cut_long_payloads_on_a_char_boundary() {
        assert_eq!(preview("a\nb", 10), "a\\nb");
        let cut = preview("ééééé", 2);
        assert!(cut.starts_with("éé... (3 more chars"), "{cut}");
    }
}
