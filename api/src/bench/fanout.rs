//! The fan-out scenario (`--fanout N`): N subscribers, each on its own
//! WebSocket, with a fixed mix of filters, and what their steps add up to.
//!
//! The mix, by share of N (largest remainders, every kind at least one once N
//! reaches the number of kinds), in connecting order shuffled:
//!
//! | kind | share | operations | checked |
//! |---|---|---|---|
//! | market | 0.1% | `quotes(maxRate: 1)`: every instrument, conflated | receives; age |
//! | watch | 30% | `trades` + `quotes` of 1-5 instruments | every event |
//! | grid | 50% | `quotes(maxRate: 4)` + `trades` of 1-5 instruments | every trade; quotes receive |
//! | venue | 10% | `trades(venues: [v])`, v one of the 4 venues with the fewest instruments | every event |
//! | class | 9.9% | `trades(assetClasses: [c])`, c one of the 4 classes with the fewest instruments | every event |
//!
//! Instruments of `watch` and `grid` are drawn uniformly from the whole list
//! (1-5, uniform), so most are quiet ones: a screen watches names, not volume.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use tickgraph_enrich::refdata::AssetClass;

use super::load::BenchInstrument;
use super::report::{int, KindFigures};
use super::subscribers::{graphql_asset_class, Feed, Filter, Op, StepCounts, SubscriberSpec};

/// The kinds of fan-out subscriber; a kind's index is its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Market,
    Watch,
    Grid,
    Venue,
    Class,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Market,
        Kind::Watch,
        Kind::Grid,
        Kind::Venue,
        Kind::Class,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Market => "market",
            Kind::Watch => "watch",
            Kind::Grid => "grid",
            Kind::Venue => "venue",
            Kind::Class => "class",
        }
    }

    /// Share of the subscribers, per mille.
    pub fn per_mille(self) -> u32 {
        match self {
            Kind::Market => 1,
            Kind::Watch => 300,
            Kind::Grid => 500,
            Kind::Venue => 100,
            Kind::Class => 99,
        }
    }
}

/// Most instruments a `watch` or `grid` subscriber asks for.
const MAX_WATCHED: usize = 5;
/// Venues and asset classes the `venue` and `class` subscribers spread over.
const TAPES: usize = 4;
/// `maxRate` of the `market` and `grid` quotes.
const MARKET_MAX_RATE: f64 = 1.0;
const GRID_MAX_RATE: f64 = 4.0;

/// Splits `n` by `per_mille` shares: floors, then the largest remainders (ties
/// to the earlier share); when `n` is at least the number of shares, every
/// share with a positive weight gets at least one, taken from the largest.
pub fn apportion(n: usize, per_mille: &[u32]) -> Vec<usize> {
    let total: u64 = per_mille.iter().map(|&s| u64::from(s)).sum();
    if total == 0 {
        return vec![0; per_mille.len()];
    }
    let n64 = n as u64;
    let mut counts: Vec<usize> = per_mille
        .iter()
        .map(|&s| (n64 * u64::from(s) / total) as usize)
        .collect();
    let mut order: Vec<usize> = (0..per_mille.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(n64 * u64::from(per_mille[i]) % total));
    let mut left = n - counts.iter().sum::<usize>();
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    let wanted = per_mille.iter().filter(|&&s| s > 0).count();
    if n >= wanted {
        for i in 0..counts.len() {
            if per_mille[i] > 0 && counts[i] == 0 {
                if let Some(big) = (0..counts.len()).max_by_key(|&j| counts[j]) {
                    counts[big] -= 1;
                    counts[i] += 1;
                }
            }
        }
    }
    counts
}

/// Groups of instrument indexes by a key, fewest instruments first (ties by
/// key), the first `take` of them.
fn smallest_groups<K: Ord + Clone>(
    instruments: &[BenchInstrument],
    key: impl Fn(&BenchInstrument) -> K,
    take: usize,
) -> Vec<(K, Arc<[u32]>)> {
    let mut by: BTreeMap<K, Vec<u32>> = BTreeMap::new();
    for (i, inst) in instruments.iter().enumerate() {
        by.entry(key(inst)).or_default().push(i as u32);
    }
    let mut groups: Vec<(K, Vec<u32>)> = by.into_iter().collect();
    groups.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| a.0.cmp(&b.0)));
    groups
        .into_iter()
        .take(take)
        .map(|(k, v)| (k, Arc::from(v)))
        .collect()
}

fn class_rank(a: AssetClass) -> usize {
    AssetClass::ALL.iter().position(|&c| c == a).unwrap_or(0)
}

/// The fan-out mix for `n` subscribers over `instruments`, and a line per kind
/// for the report.
pub fn specs(
    n: usize,
    instruments: &[BenchInstrument],
    seed: u64,
) -> (Vec<SubscriberSpec>, Vec<String>) {
    let shares: Vec<u32> = Kind::ALL.iter().map(|k| k.per_mille()).collect();
    let counts = apportion(n, &shares);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xfa40_0075);
    let venues = smallest_groups(instruments, |i| i.venue.clone(), TAPES);
    let classes: Vec<(AssetClass, Arc<[u32]>)> =
        smallest_groups(instruments, |i| class_rank(i.asset_class), TAPES)
            .into_iter()
            .map(|(r, v)| (AssetClass::ALL[r], v))
            .collect();
    let mut specs = Vec::with_capacity(n);
    let mut lines = Vec::new();
    let watched = |rng: &mut SmallRng| -> (Arc<[u32]>, Vec<String>) {
        let len = instruments.len();
        let k = rng.random_range(1..=MAX_WATCHED).min(len);
        let mut picked: Vec<u32> = rand::seq::index::sample(rng, len, k)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        picked.sort_unstable();
        let symbols = picked
            .iter()
            .map(|&i| instruments[i as usize].symbol.clone())
            .collect();
        (Arc::from(picked), symbols)
    };
    for (group, (&kind, &count)) in Kind::ALL.iter().zip(&counts).enumerate() {
        if count == 0 {
            continue;
        }
        if instruments.is_empty() && matches!(kind, Kind::Watch | Kind::Grid) {
            continue;
        }
        let (what, checked) = match kind {
            Kind::Market => (
                format!("quotes(maxRate: {MARKET_MAX_RATE}) of every instrument"),
                "conflated: must receive; latency is the age of each value on arrival",
            ),
            Kind::Watch => (
                format!("trades + quotes of 1-{MAX_WATCHED} instruments (uniform over the list)"),
                "every event counted",
            ),
            Kind::Grid => (
                format!(
                    "quotes(maxRate: {GRID_MAX_RATE}) + trades of 1-{MAX_WATCHED} instruments (uniform over the list)"
                ),
                "trades counted; quotes conflated: must receive",
            ),
            Kind::Venue => (
                format!(
                    "trades(venues: [one of {}])",
                    venues
                        .iter()
                        .map(|(v, i)| format!("{v} ({} instruments)", i.len()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "every event counted",
            ),
            Kind::Class => (
                format!(
                    "trades(assetClasses: [one of {}])",
                    classes
                        .iter()
                        .map(|(c, i)| format!("{} ({} instruments)", graphql_asset_class(*c), i.len()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "every event counted",
            ),
        };
        lines.push(format!(
            "{:<7} {:>7}  {what}; {checked}",
            kind.name(),
            int(count as u64)
        ));
        for j in 0..count {
            let ops = match kind {
                Kind::Market => vec![Op {
                    feed: Feed::Quotes,
                    filter: Filter::All,
                    selects: None,
                    max_rate: Some(MARKET_MAX_RATE),
                }],
                Kind::Watch => {
                    let (idx, symbols) = watched(&mut rng);
                    vec![
                        Op {
                            feed: Feed::Trades,
                            filter: Filter::Instruments(symbols.clone()),
                            selects: Some(idx.clone()),
                            max_rate: None,
                        },
                        Op {
                            feed: Feed::Quotes,
                            filter: Filter::Instruments(symbols),
                            selects: Some(idx),
                            max_rate: None,
                        },
                    ]
                }
                Kind::Grid => {
                    let (idx, symbols) = watched(&mut rng);
                    vec![
                        Op {
                            feed: Feed::Quotes,
                            filter: Filter::Instruments(symbols.clone()),
                            selects: Some(idx.clone()),
                            max_rate: Some(GRID_MAX_RATE),
                        },
                        Op {
                            feed: Feed::Trades,
                            filter: Filter::Instruments(symbols),
                            selects: Some(idx),
                            max_rate: None,
                        },
                    ]
                }
                Kind::Venue => match venues.get(j % venues.len().max(1)) {
                    Some((v, idx)) => vec![Op {
                        feed: Feed::Trades,
                        filter: Filter::Venues(vec![v.clone()]),
                        selects: Some(idx.clone()),
                        max_rate: None,
                    }],
                    None => continue,
                },
                Kind::Class => match classes.get(j % classes.len().max(1)) {
                    Some((c, idx)) => vec![Op {
                        feed: Feed::Trades,
                        filter: Filter::AssetClasses(vec![*c]),
                        selects: Some(idx.clone()),
                        max_rate: None,
                    }],
                    None => continue,
                },
            };
            specs.push(SubscriberSpec {
                name: format!("{}-{}", kind.name(), j + 1),
                group,
                ops,
            });
        }
    }
    // Kinds interleaved while connecting, as real clients would arrive.
    specs.shuffle(&mut rng);
    (specs, lines)
}

/// One subscriber's step, as [`summarize`] needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscriberStep {
    pub group: usize,
    /// Accepted events its unconflated operations select.
    pub expected: u64,
    /// Accepted events its conflated operations select.
    pub conflatable: u64,
    pub has_conflated: bool,
    pub counts: StepCounts,
    pub closed: bool,
    pub late: u64,
    pub foreign: u64,
}

/// Sums subscribers' steps by group (`names[g]` names group `g`); latency is
/// left for the caller, which holds the groups' histograms.
pub fn summarize(
    names: &[&str],
    steps: impl IntoIterator<Item = SubscriberStep>,
) -> Vec<KindFigures> {
    let mut kinds: Vec<KindFigures> = names
        .iter()
        .map(|n| KindFigures {
            kind: (*n).to_string(),
            ..KindFigures::default()
        })
        .collect();
    for s in steps {
        let Some(k) = kinds.get_mut(s.group) else {
            continue;
        };
        k.subscribers += 1;
        k.closed += u64::from(s.closed);
        k.expected += s.expected;
        k.delivered += s.counts.counted;
        let lost = s.expected.saturating_sub(s.counts.counted);
        k.lost += lost;
        k.extra += s.counts.counted.saturating_sub(s.expected);
        k.short += u64::from(lost > 0);
        k.conflatable += s.conflatable;
        k.conflated += s.counts.conflated;
        k.conflated_extra += s.counts.conflated.saturating_sub(s.conflatable);
        k.silent += u64::from(s.has_conflated && s.conflatable > 0 && s.counts.conflated == 0);
        k.measured += s.counts.measured;
        k.late += s.late;
        k.foreign += s.foreign;
    }
    kinds.retain(|k| k.subscribers > 0);
    kinds
}

/// The soft "Max open files" of a `/proc/<pid>/limits`.
pub fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    }
}

/// The soft open-file limit of process `pid` (`self` for the bench).
pub fn open_files_limit(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|s| max_open_files(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares() -> Vec<u32> {
        Kind::ALL.iter().map(|k| k.per_mille()).collect()
    }

    #[test]
    fn the_mix_adds_up_to_n_and_keeps_every_kind_from_five_subscribers() {
        assert_eq!(shares().iter().sum::<u32>(), 1000);
        assert_eq!(
            apportion(10_000, &shares()),
            vec![10, 3000, 5000, 1000, 990]
        );
        assert_eq!(apportion(1_000, &shares()), vec![1, 300, 500, 100, 99]);
        let small = apportion(200, &shares());
        assert_eq!(small.iter().sum::<usize>(), 200);
        assert_eq!(
            small,
            vec![1, 60, 99, 20, 20],
            "market's one comes from grid"
        );
        assert_eq!(apportion(5, &shares()), vec![1, 1, 1, 1, 1]);
        assert_eq!(apportion(3, &shares()).iter().sum::<usize>(), 3);
        assert_eq!(apportion(0, &shares()), vec![0; 5]);
        for n in [1, 7, 33, 999, 1001, 12_345] {
            assert_eq!(apportion(n, &shares()).iter().sum::<usize>(), n, "n = {n}");
        }
    }

    fn universe() -> Vec<BenchInstrument> {
        let i = |s: &str, v: &str, c: AssetClass| {
            BenchInstrument::new(
                s.into(),
                v.into(),
                c,
                "10".parse().expect("p"),
                "0.01".parse().expect("t"),
            )
            .expect("instrument")
        };
        let mut list = Vec::new();
        for k in 0..40 {
            list.push(i(&format!("EQ{k:02}"), "XNAS", AssetClass::Equity));
        }
        for k in 0..6 {
            list.push(i(&format!("LN{k}"), "XLON", AssetClass::Equity));
        }
        list.push(i("BTCUSD", "XOFF", AssetClass::Crypto));
        list.push(i("EURUSD", "XOFF", AssetClass::Fx));
        list.push(i("GBPUSD", "XOFF", AssetClass::Fx));
        list.push(i("SPY", "ARCX", AssetClass::Etf));
        list.push(i("ESZ5", "XCME", AssetClass::Future));
        list
    }

    #[test]
    fn the_specs_follow_the_mix_with_valid_filters() {
        let list = universe();
        let (specs, lines) = specs(1000, &list, 1);
        assert_eq!(specs.len(), 1000);
        assert_eq!(lines.len(), 5);
        let count = |k: Kind| specs.iter().filter(|s| s.group == k as usize).count();
        assert_eq!(
            Kind::ALL.map(count),
            [1, 300, 500, 100, 99],
            "group = kind index"
        );
        for s in &specs {
            let kind = Kind::ALL[s.group];
            assert!(s.name.starts_with(kind.name()));
            for op in &s.ops {
                match (&op.filter, &op.selects) {
                    (Filter::All, None) => assert_eq!(kind, Kind::Market),
                    (Filter::Instruments(sym), Some(idx)) => {
                        assert!((1..=MAX_WATCHED).contains(&idx.len()));
                        assert!(idx.windows(2).all(|w| w[0] < w[1]), "distinct, sorted");
                        let named: Vec<&str> = idx
                            .iter()
                            .map(|&i| list[i as usize].symbol.as_str())
                            .collect();
                        assert_eq!(named, sym.iter().map(String::as_str).collect::<Vec<_>>());
                    }
                    (Filter::Venues(v), Some(idx)) => {
                        assert!(idx.iter().all(|&i| list[i as usize].venue == v[0]));
                        assert!(
                            ["ARCX", "XCME", "XOFF", "XLON"].contains(&v[0].as_str()),
                            "{v:?}"
                        );
                    }
                    (Filter::AssetClasses(c), Some(idx)) => {
                        assert!(idx.iter().all(|&i| list[i as usize].asset_class == c[0]));
                        assert_ne!(c[0], AssetClass::Equity, "the four smallest classes");
                    }
                    other => panic!("unexpected op {other:?}"),
                }
                assert_eq!(
                    op.max_rate.is_some(),
                    kind == Kind::Market || (kind == Kind::Grid && op.feed == Feed::Quotes)
                );
            }
        }
        let (again, _) = super::specs(1000, &list, 1);
        assert!(
            again.iter().zip(&specs).all(|(a, b)| a.name == b.name),
            "seeded"
        );
    }

    #[test]
    fn steps_sum_by_kind_with_losses_per_subscriber() {
        let step =
            |group, expected, counted, conflatable, conflated, has_conflated| SubscriberStep {
                group,
                expected,
                conflatable,
                has_conflated,
                counts: StepCounts {
                    counted,
                    conflated,
                    measured: counted + conflated,
                },
                ..SubscriberStep::default()
            };
        let kinds = summarize(
            &["market", "watch", "grid"],
            [
                step(1, 10, 10, 0, 0, false),
                step(1, 10, 7, 0, 0, false),
                step(1, 5, 6, 0, 0, false),
                step(2, 4, 4, 100, 0, true),
                step(2, 4, 4, 100, 30, true),
                step(2, 0, 0, 0, 0, true),
            ],
        );
        assert_eq!(kinds.len(), 2, "a kind without subscribers is left out");
        let w = &kinds[0];
        assert_eq!(
            (
                w.kind.as_str(),
                w.subscribers,
                w.expected,
                w.delivered,
                w.lost,
                w.extra,
                w.short
            ),
            ("watch", 3, 25, 23, 3, 1, 1)
        );
        let g = &kinds[1];
        assert_eq!(
            (
                g.subscribers,
                g.conflatable,
                g.conflated,
                g.silent,
                g.measured
            ),
            (3, 200, 30, 1, 8 + 30)
        );
    }

    #[test]
    fn reads_the_soft_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(max_open_files(limits), Some(20000));
        assert_eq!(
            max_open_files(
                "Max open files            unlimited            unlimited            files"
            ),
            Some(u64::MAX)
        );
        assert_eq!(max_open_files("Max processes 10 10"), None);
    }
}
