//! Dead letters over GraphQL, for admins only ([`AdminGuard`]): the query
//! `deadLetters` lists them a page at a time, the mutation `replayDeadLetters`
//! replays those a reference-data fix can cure. The work is
//! `tickgraph_enrich::deadletter`'s; this is its GraphQL face.
//!
//! An admin whose token limits venues sees only the letters of those venues
//! ([`crate::dlq::may_see`]); a letter whose venue cannot be read from its
//! payload (malformed input, a positional record, a raw entry) could be any
//! venue's, so only an admin entitled to every venue sees it. Replay acts on
//! letters it has not shown, so it is for an admin entitled to every venue.

use async_graphql::{Context, Enum, ErrorExtensions, Guard, Object, Result, SimpleObject, ID};
use chrono::{DateTime, Utc};
use tickgraph_enrich::deadletter::{
    self, DeadLetterId, DeadLetterView, Filter, ListRequest, Order, ReplayCursor, Stage,
};

use super::types::SortOrder;
use super::{internal, page_cost, page_size, principal, Services};
use crate::auth::{Principal, Scope};
use crate::dlq::may_see;

/// Most letters one `replayDeadLetters` call names or, with `all`, looks at.
pub const MAX_REPLAY: usize = 1000;

/// Lets the field run only for an admin principal; anyone else gets an error
/// with `extensions.code: "FORBIDDEN"` and the field resolves to nothing.
pub struct AdminGuard;

impl Guard for AdminGuard {
    async fn check(&self, ctx: &Context<'_>) -> Result<()> {
        match ctx.data_opt::<Principal>() {
            Some(p) if p.is_admin() => Ok(()),
            Some(_) => Err(forbidden(
                "dead letters are for admins only, and this user is not one",
            )),
            None => Err(forbidden(
                "dead letters are for admins only, and this request is not authenticated",
            )),
        }
    }
}

fn forbidden(message: &str) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "FORBIDDEN"))
}

/// The component that refused an event.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterStage {
    /// Malformed or invalid input, refused by ingest. Never replayable.
    Ingest,
    /// Accepted, but not enrichable. Replayable when the reason is a reference
    /// gap (unknown instrument, venue or account; no USD FX rate).
    Enrich,
    /// Enriched, but not storable in history. Never replayable.
    Load,
}

impl From<DeadLetterStage> for Stage {
    fn from(s: DeadLetterStage) -> Self {
        match s {
            DeadLetterStage::Ingest => Stage::Ingest,
            DeadLetterStage::Enrich => Stage::Enrich,
            DeadLetterStage::Load => Stage::Load,
        }
    }
}

/// How `payload` shows the stored bytes.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// JSON, as stored.
    Json,
    /// MessagePack (a map or an array), converted to JSON.
    MessagePack,
    /// UTF-8 text that is not JSON (e.g. a broken NDJSON line).
    Text,
    /// Anything else, as base64 of every stored byte.
    #[graphql(name = "BASE64")]
    Base64,
}

impl From<deadletter::PayloadFormat> for PayloadFormat {
    fn from(f: deadletter::PayloadFormat) -> Self {
        match f {
            deadletter::PayloadFormat::Json => PayloadFormat::Json,
            deadletter::PayloadFormat::MessagePack => PayloadFormat::MessagePack,
            deadletter::PayloadFormat::Text => PayloadFormat::Text,
            deadletter::PayloadFormat::Base64 => PayloadFormat::Base64,
        }
    }
}

/// An event a stage refused, with why.
pub struct DeadLetter(DeadLetterView);

#[Object]
impl DeadLetter {
    /// `<stream>/<entry id>`: what `replayDeadLetters(ids:)` takes.
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    /// The dead-letter stream: `<prefix>:dlq:ingest` or `<prefix>:dlq:{<shard>}`.
    async fn stream(&self) -> &str {
        &self.0.id.stream
    }

    async fn entry_id(&self) -> String {
        self.0.id.entry.to_string()
    }

    /// `ingest`, `enrich` or `load`.
    async fn stage(&self) -> &str {
        &self.0.stage
    }

    async fn reason(&self) -> &str {
        &self.0.reason
    }

    /// When it was dead-lettered.
    async fn at(&self) -> Option<DateTime<Utc>> {
        self.0.at_ns.map(DateTime::from_timestamp_nanos)
    }

    /// `source:seq` of the event, when the stage knew it (enrich, load).
    async fn event_id(&self) -> Option<&str> {
        self.0.event_id.as_deref()
    }

    /// The stored event (ingest: the bytes as sent, at most 2 KiB; enrich and
    /// load: the event as JSON), shown as `payloadFormat` says.
    async fn payload(&self) -> &str {
        &self.0.payload.text
    }

    async fn payload_format(&self) -> PayloadFormat {
        self.0.payload.format.into()
    }

    /// Bytes stored.
    async fn payload_bytes(&self) -> usize {
        self.0.payload.bytes
    }

    /// Whether `replayDeadLetters` can put it back into the pipeline.
    async fn replayable(&self) -> bool {
        self.0.replayable
    }

    /// Why it is not replayable.
    async fn not_replayable_reason(&self) -> Option<&str> {
        self.0.not_replayable_reason.as_deref()
    }
}

/// One page of dead letters.
#[derive(SimpleObject)]
pub struct DeadLetterPage {
    items: Vec<DeadLetter>,
    /// Pass as `after` for the next page (same arguments). A page can hold
    /// fewer items than `first` and still have a next one: one call reads at
    /// most 10,000 letters, so a filter that matches few does bounded work.
    end_cursor: Option<String>,
    has_next_page: bool,
}

/// What happened to one dead letter.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStatus {
    /// Back on its raw stream, and removed from the dead-letter stream.
    Replayed,
    /// Dry run: would be replayed.
    WouldReplay,
    /// Its event was enriched since (re-sent by its producer, or replayed from
    /// another letter): the letter was removed (dry run: would be), nothing replayed.
    AlreadyEnriched,
    /// Not in its stream: replayed already, or trimmed away.
    NotFound,
    /// Replay cannot cure it; `detail` says why.
    NotReplayable,
    /// Redis failed; nothing changed for this letter, try again.
    Failed,
}

impl From<deadletter::ReplayStatus> for ReplayStatus {
    fn from(s: deadletter::ReplayStatus) -> Self {
        use deadletter::ReplayStatus as S;
        match s {
            S::Replayed => ReplayStatus::Replayed,
            S::WouldReplay => ReplayStatus::WouldReplay,
            S::AlreadyEnriched => ReplayStatus::AlreadyEnriched,
            S::NotFound => ReplayStatus::NotFound,
            S::NotReplayable => ReplayStatus::NotReplayable,
            S::Failed => ReplayStatus::Failed,
        }
    }
}

#[derive(SimpleObject)]
pub struct ReplayOutcome {
    id: ID,
    event_id: Option<String>,
    status: ReplayStatus,
    /// Why not replayable, or failed; for a replay, the raw entry it became
    /// (`<raw stream>/<entry id>`).
    detail: Option<String>,
}

/// What a replay did, in counts and per letter.
#[derive(SimpleObject)]
pub struct ReplayReport {
    replayed: usize,
    would_replay: usize,
    already_enriched: usize,
    not_found: usize,
    not_replayable: usize,
    failed: usize,
    outcomes: Vec<ReplayOutcome>,
    /// With `all`: set when letters are left to look at; pass it as `after` to
    /// go on. It keeps the first call's horizon, so a run never replays the
    /// letters its own replays produced.
    next: Option<String>,
}

impl From<deadletter::ReplayReport> for ReplayReport {
    fn from(r: deadletter::ReplayReport) -> Self {
        Self {
            replayed: r.counts.replayed,
            would_replay: r.counts.would_replay,
            already_enriched: r.counts.already_enriched,
            not_found: r.counts.not_found,
            not_replayable: r.counts.not_replayable,
            failed: r.counts.failed,
            outcomes: r
                .outcomes
                .into_iter()
                .map(|o| ReplayOutcome {
                    id: ID(o.id.to_string()),
                    event_id: o.event_id,
                    status: o.status.into(),
                    detail: o.detail,
                })
                .collect(),
            next: r.next,
        }
    }
}

fn user_error(e: deadletter::DeadLetterError) -> async_graphql::Error {
    match e {
        deadletter::DeadLetterError::Redis(_) | deadletter::DeadLetterError::Reply(_) => {
            internal("dead letters", e)
        }
        other => async_graphql::Error::new(other.to_string()),
    }
}

#[derive(Default)]
pub struct DeadLetterQuery;

#[Object]
impl DeadLetterQuery {
    /// Dead-lettered events of every dead-letter stream (or of `stream`), newest
    /// first (`order: ASC`: oldest first), optionally only of one `stage` or
    /// whose reason contains `reason` (case-insensitive). Admins only, and only
    /// the letters of the venues the admin is entitled to; a letter whose venue
    /// is unknown only to an admin entitled to every venue.
    #[allow(clippy::too_many_arguments)]
    #[graphql(
        guard = "AdminGuard",
        complexity = "page_cost(first, child_complexity)"
    )]
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
        stage: Option<DeadLetterStage>,
        reason: Option<String>,
        stream: Option<String>,
        #[graphql(default_with = "SortOrder::Desc")] order: SortOrder,
    ) -> Result<DeadLetterPage> {
        let s = ctx.data::<Services>()?;
        let who = principal(ctx)?;
        let first = page_size(first)?;
        let after = after
            .map(|a| a.parse::<DeadLetterId>())
            .transpose()
            .map_err(user_error)?;
        let req = ListRequest {
            filter: Filter {
                stream,
                stage: stage.map(Into::into),
                reason,
            },
            order: match order {
                SortOrder::Asc => Order::OldestFirst,
                SortOrder::Desc => Order::NewestFirst,
            },
            after,
            limit: first,
        };
        let page = s.dead_letters.list(&req).await.map_err(user_error)?;
        // The cursor stays where the scan stopped, so leaving letters out
        // here loses none on the next page: the page is only shorter, as one
        // narrowed by `reason` can be.
        Ok(DeadLetterPage {
            has_next_page: page.next.is_some(),
            end_cursor: page.next.map(|n| n.to_string()),
            items: page
                .items
                .into_iter()
                .filter(|d| may_see(who, d))
                .map(DeadLetter)
                .collect(),
        })
    }
}

#[derive(Default)]
pub struct DeadLetterMutation;

#[Object]
impl DeadLetterMutation {
    /// Puts dead-lettered events back on their raw stream, so that enrich takes
    /// them again once the reference data is fixed; each reaches the enriched
    /// stream and history at most once, however often or concurrently this runs.
    /// Either `ids` (at most 1000), or `all: true` with optional `stage` and
    /// `reason` filters (oldest first, 1000 letters looked at per call; go on
    /// with `after: <next>`). Letters that cannot be cured by a replay are
    /// reported `NOT_REPLAYABLE` with why. `dryRun` changes nothing. Admins
    /// entitled to every venue only.
    #[allow(clippy::too_many_arguments)]
    #[graphql(guard = "AdminGuard")]
    async fn replay_dead_letters(
        &self,
        ctx: &Context<'_>,
        ids: Option<Vec<ID>>,
        #[graphql(default)] all: bool,
        stage: Option<DeadLetterStage>,
        reason: Option<String>,
        after: Option<String>,
        #[graphql(default)] dry_run: bool,
    ) -> Result<ReplayReport> {
        let s = ctx.data::<Services>()?;
        if principal(ctx)?.entitlements().venues != Scope::All {
            return Err(forbidden(
                "replaying dead letters needs an admin entitled to every venue, \
                 and this token's `venues` claim names only some",
            ));
        }
        let report = match (ids, all) {
            (Some(_), true) => return Err("pass either `ids` or `all: true`, not both".into()),
            (None, false) => return Err("pass `ids`, or `all: true` to replay every match".into()),
            (Some(ids), false) => {
                if stage.is_some() || reason.is_some() || after.is_some() {
                    return Err("`stage`, `reason` and `after` go with `all: true`".into());
                }
                if ids.len() > MAX_REPLAY {
                    return Err(format!("at most {MAX_REPLAY} ids per call").into());
                }
                let ids = ids
                    .iter()
                    .map(|i| i.parse::<DeadLetterId>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(user_error)?;
                s.dead_letters.replay_ids(&ids, dry_run).await
            }
            (None, true) => {
                let from = after
                    .map(|a| a.parse::<ReplayCursor>())
                    .transpose()
                    .map_err(user_error)?;
                let filter = Filter {
                    stream: None,
                    stage: stage.map(Into::into),
                    reason,
                };
                s.dead_letters
                    .replay_matching(&filter, from, MAX_REPLAY, dry_run)
                    .await
            }
        }
        .map_err(user_error)?;
        Ok(report.into())
    }
}
