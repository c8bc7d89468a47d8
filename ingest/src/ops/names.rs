//! The rules every tickgraph metric follows, as a check of a whole exposition,
//! so that each component's tests can hold its `/metrics` to them:
//!
//! - names are `tickgraph_<component>_<name>[_<unit>]`, lowercase snake case,
//!   with `<component>` one of [`COMPONENTS`];
//! - counters, and only counters, end in `_total`;
//! - units are base units: `_seconds`, `_bytes` (never milliseconds or
//!   kilobytes); histograms measure one of them;
//! - labels are few and bounded: only the keys in [`LABELS`] (so never an
//!   instrument, a source or an account), and values that are short codes
//!   (`[a-z0-9_]`, at most [`MAX_LABEL_VALUE`] bytes) — never free text.

/// The components a metric name may belong to.
pub const COMPONENTS: &[&str] = &["ingest", "enrich", "load", "api"];

/// Every label key in use, with what it holds.
pub const LABELS: &[&str] = &[
    // A reason code: `unknown_venue`, `malformed`.
    "reason",
    // A stream shard: `0` .. shards-1.
    "shard",
    // What a slow client was: `subscription` or `websocket`.
    "scope",
    // `ws` or `sse`.
    "transport",
    // `trades` or `quotes`.
    "kind",
    // A histogram's bucket bound (Prometheus's own).
    "le",
];

pub const MAX_LABEL_VALUE: usize = 32;

const BAD_UNITS: &[&str] = &[
    "_ms",
    "_millis",
    "_milliseconds",
    "_us",
    "_micros",
    "_microseconds",
    "_ns",
    "_nanos",
    "_nanoseconds",
    "_minutes",
    "_hours",
    "_kb",
    "_kib",
    "_kilobytes",
    "_mb",
    "_mib",
    "_megabytes",
];

fn snake(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.starts_with('_')
        && !s.ends_with('_')
        && !s.contains("__")
}

/// Problems with one metric family's name and type.
pub fn check_family(name: &str, kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    if !snake(name) {
        out.push(format!("{name}: not lowercase snake case"));
    }
    let component = name.strip_prefix("tickgraph_").and_then(|rest| {
        COMPONENTS
            .iter()
            .find(|c| rest.starts_with(&format!("{c}_")))
    });
    if component.is_none() {
        out.push(format!(
            "{name}: must start with tickgraph_<component>_, component one of {COMPONENTS:?}"
        ));
    }
    let total = name.ends_with("_total");
    match (kind, total) {
        ("counter", false) => out.push(format!("{name}: a counter must end in _total")),
        ("counter", true) => {}
        (_, true) => out.push(format!("{name}: only counters end in _total")),
        _ => {}
    }
    if kind == "histogram" && !(name.ends_with("_seconds") || name.ends_with("_bytes")) {
        out.push(format!(
            "{name}: a histogram measures seconds or bytes, in its name"
        ));
    }
    let stem = name.trim_end_matches("_total");
    for unit in BAD_UNITS {
        if stem.ends_with(unit) || stem.contains(&format!("{unit}_")) {
            out.push(format!(
                "{name}: {unit} is not a base unit (seconds, bytes)"
            ));
        }
    }
    out
}

/// Problems with one label.
pub fn check_label(metric: &str, key: &str, value: &str) -> Vec<String> {
    let mut out = Vec::new();
    if !LABELS.contains(&key) {
        out.push(format!(
            "{metric}: label {key:?} is not one of the bounded labels {LABELS:?}"
        ));
    }
    let code = key == "le"
        || (value.len() <= MAX_LABEL_VALUE
            && !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    if !code {
        out.push(format!(
            "{metric}: label {key}={value:?} is not a short code ([a-z0-9_], at most {MAX_LABEL_VALUE} bytes)"
        ));
    }
    out
}

/// Problems with a whole exposition in the Prometheus text format.
pub fn check_exposition(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            out.extend(check_family(name, kind));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
        let Some((metric, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = labels.trim_end_matches('}');
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                out.push(format!("{metric}: unreadable label {pair:?}"));
                continue;
            };
            out.extend(check_label(metric, key, value.trim_matches('"')));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for (name, kind) in [
            ("tickgraph_ingest_received_events_total", "counter"),
            ("tickgraph_api_freshness_seconds", "histogram"),
            ("tickgraph_ingest_spool_bytes", "gauge"),
            ("tickgraph_enrich_group_lag_entries", "gauge"),
        ] {
            assert_eq!(check_family(name, kind), Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn each_naming_rule_is_enforced() {
        for (name, kind, why) in [
            ("ingest_received_total", "counter", "tickgraph_<component>_"),
            (
                "tickgraph_other_x_total",
                "counter",
                "tickgraph_<component>_",
            ),
            ("tickgraph_ingest_received", "counter", "must end in _total"),
            ("tickgraph_api_connections_total", "gauge", "only counters"),
            ("tickgraph_api_Connections", "gauge", "snake case"),
            ("tickgraph_api_delay_ms", "gauge", "base unit"),
            ("tickgraph_api_delay_milliseconds", "histogram", "base unit"),
            ("tickgraph_api_delay", "histogram", "seconds or bytes"),
            ("tickgraph_api_spool_kb_total", "counter", "base unit"),
        ] {
            let problems = check_family(name, kind);
            assert!(
                problems.iter().any(|p| p.contains(why)),
                "{name}: {problems:?}"
            );
        }
    }

    #[test]
    fn labels_are_bounded_codes() {
        assert!(check_label("m", "reason", "unknown_venue").is_empty());
        assert!(check_label("m", "shard", "3").is_empty());
        assert!(check_label("m", "le", "+Inf").is_empty());
        assert!(!check_label("m", "instrument", "aapl").is_empty());
        assert!(!check_label("m", "reason", "unknown instrument \"AAPL\"").is_empty());
        assert!(!check_label("m", "reason", &"x".repeat(33)).is_empty());
    }

    #[test]
    fn an_exposition_is_checked_line_by_line() {
        let text = "# HELP tickgraph_api_delivered_events_total Events.\n\
                    # TYPE tickgraph_api_delivered_events_total counter\n\
                    tickgraph_api_delivered_events_total 3\n\
                    # TYPE tickgraph_api_x gauge\n\
                    tickgraph_api_x{instrument=\"AAPL\"} 1\n";
        let problems = check_exposition(text);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
