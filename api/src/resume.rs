//! Resume cursors: where a subscription stood, so that a client that
//! reconnects with `after:` receives exactly the events it missed.
//!
//! A subscription spans every shard, and the hub delivers each shard in stream
//! order, but shards interleave. One event's own position therefore says
//! nothing about the other shards. A resume cursor holds a position per shard:
//! the event's own in its shard, and for every other shard the end of the last
//! batch the hub had finished dispatching before this event's batch. The hub
//! dispatches one batch at a time, so every event of those positions reached the
//! subscription's queue before this event, and none after them did: resuming
//! from the cursor misses nothing and repeats nothing.
//!
//! Each shard's position carries that shard's epoch: a number kept in Redis
//! beside the stream (`<prefix>:epoch:{<shard>}`). When Redis loses the stream,
//! it loses the epoch too and a new one is made, so an old cursor is known not
//! to fit the new stream.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

/// Where an event sits in its shard's stream: (entry ms, entry seq, index in
/// the entry). [`WHOLE_ENTRY`] as the index means "through the entry's end".
pub type Position = (u64, u64, u64);

/// The index of a position that covers its whole entry.
pub const WHOLE_ENTRY: u64 = u64::MAX;

/// `<ms>-<seq>` (a whole entry) or `<ms>-<seq>.<index>`.
pub fn parse_position(s: &str) -> Option<Position> {
    let (id, index) = match s.split_once('.') {
        Some((id, i)) => (id, i.parse().ok()?),
        None => (s, WHOLE_ENTRY),
    };
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?, index))
}

/// The shard and position of an event cursor, `<shard>:<ms>-<seq>[.<index>]`.
pub fn event_position(cursor: &str) -> Option<(u16, Position)> {
    let (shard, at) = cursor.split_once(':')?;
    Some((shard.parse().ok()?, parse_position(at)?))
}

/// The stream entry id of a position.
pub fn entry_id(p: Position) -> String {
    format!("{}-{}", p.0, p.1)
}

fn write_position(out: &mut String, p: Position) {
    let _ = write!(out, "{}-{}", p.0, p.1);
    if p.2 != WHOLE_ENTRY {
        let _ = write!(out, ".{}", p.2);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("`after` is not a resume cursor: {0}")]
    Malformed(String),
    #[error("`after` is a cursor of {got} shards, but the streams have {want}")]
    Shards { got: usize, want: u16 },
}

/// A parsed resume cursor: per shard, its epoch and the position after which
/// the subscription resumes. Text form: `<epoch>:<ms>-<seq>[.<index>]` per
/// shard, joined by `,`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeCursor {
    pub shards: Vec<(u64, Position)>,
}

impl ResumeCursor {
    pub fn parse(s: &str, shards: u16) -> Result<Self, CursorError> {
        let parsed = s
            .split(',')
            .map(|part| {
                let (epoch, at) = part.split_once(':')?;
                Some((epoch.parse().ok()?, parse_position(at)?))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| CursorError::Malformed(s.chars().take(64).collect()))?;
        if parsed.len() != usize::from(shards) {
            return Err(CursorError::Shards {
                got: parsed.len(),
                want: shards,
            });
        }
        Ok(Self { shards: parsed })
    }
}

impl std::fmt::Display for ResumeCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format(self.shards.iter().copied()))
    }
}

fn format(shards: impl Iterator<Item = (u64, Position)>) -> String {
    let mut out = String::with_capacity(160);
    for (i, (epoch, p)) in shards.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{epoch}:");
        write_position(&mut out, p);
    }
    out
}

/// What a resume cursor is made from, shared by every event of one dispatched
/// batch (or of one catch-up page): the shards' epochs and positions. For a
/// batch, the event's own shard is replaced by its own position.
#[derive(Debug, PartialEq, Eq)]
pub struct ResumeBase {
    epochs: Arc<[u64]>,
    /// Set once, when the hub dispatches the batch.
    positions: OnceLock<Box<[Position]>>,
    /// The shard whose position each event replaces with its own; `None`: the
    /// positions are the cursor as they are (a snapshot's start).
    own_shard: Option<u16>,
}

impl ResumeBase {
    /// For a batch of `shard`, its positions set at dispatch by [`Self::set`].
    pub fn batch(epochs: Arc<[u64]>, shard: u16) -> Self {
        Self {
            epochs,
            positions: OnceLock::new(),
            own_shard: Some(shard),
        }
    }

    /// For events of `shard` read after `positions`.
    pub fn page(epochs: Arc<[u64]>, shard: u16, positions: &[Position]) -> Self {
        let base = Self::batch(epochs, shard);
        base.set(positions);
        base
    }

    /// Exactly `positions`, whatever the event.
    pub fn fixed(epochs: Arc<[u64]>, positions: &[Position]) -> Self {
        Self {
            epochs,
            positions: OnceLock::from(Box::from(positions)),
            own_shard: None,
        }
    }

    /// The position of `shard`, once set.
    pub fn position(&self, shard: u16) -> Option<Position> {
        self.positions.get()?.get(usize::from(shard)).copied()
    }

    /// Records the positions; later calls change nothing.
    pub fn set(&self, positions: &[Position]) {
        let _ = self.positions.set(Box::from(positions));
    }

    /// The resume cursor of the event at `event_cursor`; `None` before the
    /// positions are set or when they do not fit the epochs.
    pub fn cursor(&self, event_cursor: &str) -> Option<String> {
        let positions = self.positions.get()?;
        if positions.len() != self.epochs.len() {
            return None;
        }
        let own = match self.own_shard {
            Some(shard) => Some((shard, event_position(event_cursor)?.1)),
            None => None,
        };
        Some(format(
            self.epochs
                .iter()
                .zip(positions.iter())
                .enumerate()
                .map(|(s, (e, p))| match own {
                    Some((shard, at)) if usize::from(shard) == s => (*e, at),
                    _ => (*e, *p),
                }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_whole_entries_and_events() {
        assert_eq!(parse_position("5-2"), Some((5, 2, WHOLE_ENTRY)));
        assert_eq!(parse_position("5-2.7"), Some((5, 2, 7)));
        assert!(parse_position("5-2.7") < parse_position("5-2"));
        assert_eq!(parse_position("5"), None);
        assert_eq!(parse_position("x-1"), None);
        assert_eq!(event_position("3:5-2.1"), Some((3, (5, 2, 1))));
    }

    #[test]
    fn a_cursor_round_trips_and_checks_its_shards() {
        let c = ResumeCursor {
            shards: vec![(17, (5, 2, 7)), (18, (6, 0, WHOLE_ENTRY))],
        };
        let text = c.to_string();
        assert_eq!(text, "17:5-2.7,18:6-0");
        assert_eq!(ResumeCursor::parse(&text, 2), Ok(c));
        assert_eq!(
            ResumeCursor::parse(&text, 4),
            Err(CursorError::Shards { got: 2, want: 4 })
        );
        assert!(matches!(
            ResumeCursor::parse("1:2-3,junk", 2),
            Err(CursorError::Malformed(_))
        ));
    }

    #[test]
    fn a_batch_cursor_puts_the_event_in_its_own_shard() {
        let epochs: Arc<[u64]> = Arc::from([7u64, 8, 9]);
        let b = ResumeBase::batch(Arc::clone(&epochs), 1);
        assert_eq!(b.cursor("1:10-0.4"), None, "not dispatched yet");
        b.set(&[
            (1, 0, WHOLE_ENTRY),
            (2, 0, WHOLE_ENTRY),
            (3, 0, WHOLE_ENTRY),
        ]);
        assert_eq!(
            b.cursor("1:10-0.4").as_deref(),
            Some("7:1-0,8:10-0.4,9:3-0")
        );
        let f = ResumeBase::fixed(epochs, &[(1, 0, 2), (2, 0, 3), (3, 0, 4)]);
        assert_eq!(
            f.cursor("1:10-0.4").as_deref(),
            Some("7:1-0.2,8:2-0.3,9:3-0.4")
        );
    }
}
