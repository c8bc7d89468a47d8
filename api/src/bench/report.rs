//! The figures of a bench run, the judgement of each step, and the plain-text
//! report. Pure: everything here is computed from values, never measured.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::ceiling::Ceiling;
use super::procstat::GroupUse;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    /// None for an empty histogram.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }

    /// `p50 1.234  p90 ...` in milliseconds.
    pub fn line(&self) -> String {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (ms)",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

/// An integer with thousands separators.
pub fn int(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `a - b` as a signed figure.
fn diff(a: u64, b: u64) -> i128 {
    i128::from(a) - i128::from(b)
}

/// What one subscriber got in a step.
#[derive(Debug, Clone, Default)]
pub struct SubscriberFigures {
    pub name: String,
    pub expected: u64,
    pub delivered: u64,
    /// Errors the subscriber saw (server errors, closes).
    pub errors: Vec<String>,
}

/// One kind of fan-out subscriber in a step, summed over its subscribers.
#[derive(Debug, Clone, Default)]
pub struct KindFigures {
    pub kind: String,
    pub subscribers: u64,
    /// Subscribers whose socket had closed by the end of the step.
    pub closed: u64,
    /// Unconflated operations: accepted events they select, and what came.
    pub expected: u64,
    pub delivered: u64,
    /// Summed per subscriber: a surplus of one never hides a loss of another.
    pub lost: u64,
    pub extra: u64,
    /// Subscribers that lost at least one event.
    pub short: u64,
    /// Conflated operations: accepted events they select, and what came.
    pub conflatable: u64,
    pub conflated: u64,
    /// Conflated deliveries beyond what their selection held (impossible
    /// unless an event came twice).
    pub conflated_extra: u64,
    /// Subscribers with conflated operations whose selection had events but
    /// that received none of them.
    pub silent: u64,
    /// Deliveries of events sent after the warm-up.
    pub measured: u64,
    pub late: u64,
    pub foreign: u64,
    pub every: Option<Percentiles>,
    pub conflated_age: Option<Percentiles>,
}

/// What the fan-out subscribers got in a step.
#[derive(Debug, Clone, Default)]
pub struct FanoutFigures {
    /// Per kind; every-event latency of all kinds is the step's `latency`.
    pub kinds: Vec<KindFigures>,
    /// Conflated operations: the age of each value on arrival.
    pub conflated_age: Option<Percentiles>,
    /// How sockets and operations ended, since connecting (cumulative).
    pub outcomes: Vec<(String, u64)>,
}

/// How the fan-out subscribers connected, and what idle connections cost.
#[derive(Debug, Clone, Default)]
pub struct FanoutSetup {
    pub requested: u64,
    pub connected: u64,
    pub failed: u64,
    pub subscriptions: u64,
    pub concurrency: usize,
    /// From the first connect to the last `connection_ack`.
    pub connect_secs: f64,
    /// From the signal to subscribe to the last `subscribe` sent.
    pub subscribe_secs: f64,
    /// Connect + init + ack, per connection.
    pub connect: Option<Percentiles>,
    pub idle_secs: f64,
    /// RSS of the system under test (tickgraph) and of the bench, KiB: before
    /// connecting, with the connections open and idle, and with their
    /// subscriptions too, idle.
    pub system_rss_kib: (u64, u64, u64),
    pub bench_rss_kib: (u64, u64, u64),
    /// Cores used by tickgraph and the bench over the idle windows: before
    /// connecting, with the connections open, with their subscriptions too.
    pub idle_cores: [(f64, f64); 3],
    /// Soft open-file limits of the bench and the system under test.
    pub bench_nofile: Option<u64>,
    pub system_nofile: Option<u64>,
}

/// Memory of idle fan-out subscribers in the system under test, KiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleMemory {
    /// An open connection without subscriptions.
    pub connection: f64,
    /// One subscription on an open connection.
    pub subscription: f64,
    /// A connection with its subscriptions (both steps over connections).
    pub subscriber: f64,
}

impl FanoutSetup {
    pub fn idle_memory(&self) -> IdleMemory {
        let (before, open, subscribed) = self.system_rss_kib;
        let d = |a: u64, b: u64| b as f64 - a as f64;
        let conns = self.connected.max(1) as f64;
        IdleMemory {
            connection: d(before, open) / conns,
            subscription: d(open, subscribed) / self.subscriptions.max(1) as f64,
            subscriber: d(before, subscribed) / conns,
        }
    }
}

/// Every count of one step.
#[derive(Debug, Clone, Default)]
pub struct StepFigures {
    pub index: u32,
    pub target_rate: f64,
    pub warmup_secs: f64,
    pub measure_secs: f64,
    /// From the first batch to the last one sent.
    pub send_secs: f64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Events in requests that failed whole.
    pub failed: u64,
    pub requests: u64,
    pub failed_requests: u64,
    pub max_in_flight: u64,
    pub late_batches: u64,
    pub max_lag_ms: f64,
    pub enriched: u64,
    pub enriched_entries: u64,
    pub loaded: u64,
    pub subscribers: Vec<SubscriberFigures>,
    /// Instead of `subscribers` with `--fanout`.
    pub fanout: Option<FanoutFigures>,
    /// Send to arrival of every subscriber's events (with `--fanout`: of the
    /// every-event operations only).
    pub latency: Option<Percentiles>,
    /// From the last answer to the end of the drain.
    pub drain_secs: f64,
    /// Whether every count reached what was accepted before the drain ended.
    pub drained: bool,
    pub resources: Vec<GroupUse>,
    pub resources_secs: f64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub sustained: bool,
    pub reasons: Vec<String>,
}

/// A step is sustained when no event was lost (or duplicated) at any stage, p99
/// stayed under the limit, and the generator really offered the rate (at least
/// 98% of it over the sending time).
pub fn judge(s: &StepFigures, p99_limit_ms: f64) -> Verdict {
    let mut reasons = Vec::new();
    if s.sent == 0 {
        reasons.push("nothing was sent".to_string());
    }
    let mut mismatch = |what: &str, lost: i128| {
        if lost > 0 {
            reasons.push(format!("{lost} lost {what}"));
        } else if lost < 0 {
            reasons.push(format!("{} extra {what}", -lost));
        }
    };
    mismatch("at ingest (sent - accepted)", diff(s.sent, s.accepted));
    mismatch(
        "between ingest and the enriched streams",
        diff(s.accepted, s.enriched),
    );
    mismatch("between ingest and history", diff(s.accepted, s.loaded));
    for sub in &s.subscribers {
        mismatch(
            &format!("to subscriber {}", sub.name),
            diff(sub.expected, sub.delivered),
        );
    }
    if let Some(f) = &s.fanout {
        for k in &f.kinds {
            if k.lost > 0 {
                reasons.push(format!(
                    "{} lost to {} of {} {} subscribers",
                    k.lost, k.short, k.subscribers, k.kind
                ));
            }
            if k.extra + k.conflated_extra > 0 {
                reasons.push(format!(
                    "{} extra to {} subscribers",
                    k.extra + k.conflated_extra,
                    k.kind
                ));
            }
            if k.silent > 0 {
                reasons.push(format!(
                    "{} conflated {} subscribers received nothing",
                    k.silent, k.kind
                ));
            }
        }
    }
    match &s.latency {
        None => reasons.push("no latency measured".into()),
        Some(p) if p.p99 as f64 >= p99_limit_ms * 1000.0 => reasons.push(format!(
            "p99 {} ms is not under {p99_limit_ms} ms",
            ms(p.p99)
        )),
        Some(_) => {}
    }
    // Late batches alone do not fail a step: they are sent as soon as the bench
    // gets the CPU, so the load is burstier, never lighter. Falling short of
    // the rate does: the system was not offered it.
    let achieved = s.sent as f64 / s.send_secs.max(1e-9);
    if s.sent > 0 && achieved < 0.98 * s.target_rate {
        reasons.push(format!(
            "the generator offered only {} of {} events/s",
            int(achieved.round() as u64),
            int(s.target_rate.round() as u64)
        ));
    }
    Verdict {
        sustained: reasons.is_empty(),
        reasons,
    }
}

/// Everything the report prints.
#[derive(Debug, Clone)]
pub struct Report {
    pub command: String,
    pub run_id: String,
    pub cores: usize,
    pub system: String,
    pub load: String,
    pub subscribers: Vec<String>,
    pub fanout: Option<FanoutSetup>,
    pub ceiling: Result<Ceiling, String>,
    pub ramp: bool,
    pub p99_limit_ms: f64,
    pub steps: Vec<(StepFigures, Verdict)>,
    pub history: (u64, u64),
    pub whole: Vec<GroupUse>,
    pub whole_secs: f64,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn resources(out: &mut String, title: &str, groups: &[GroupUse], secs: f64) {
    let _ = writeln!(
        out,
        "  {title:<12} over {secs:.1} s      CPU s    cores   peak RSS MiB   RSS MiB start / middle / end"
    );
    for g in groups {
        let name = if g.procs > 1 {
            format!("{} ({} procs, summed)", g.name, g.procs)
        } else {
            g.name.to_string()
        };
        let _ = writeln!(
            out,
            "    {name:<28} {:>8.1} {:>8.2} {:>14} {:>10} / {} / {}",
            g.cpu_secs,
            g.cores,
            mib(g.peak_rss_kib),
            mib(g.rss_start_kib),
            mib(g.rss_mid_kib),
            mib(g.rss_end_kib),
        );
    }
    if groups.iter().any(|g| g.procs > 1) {
        let _ = writeln!(
            out,
            "    (RSS summed over processes counts shared memory once per process that touched it)"
        );
    }
}

fn lost(a: u64, b: u64) -> String {
    match diff(a, b) {
        d if d >= 0 => format!("lost {d}"),
        d => format!("EXTRA {}", -d),
    }
}

fn step(out: &mut String, s: &StepFigures, v: &Verdict, p99_limit_ms: f64) {
    let verdict = if v.sustained {
        "SUSTAINED".to_string()
    } else {
        format!("NOT SUSTAINED: {}", v.reasons.join("; "))
    };
    let warmup = if s.warmup_secs > 0.0 {
        format!("{:.0} s warm-up + ", s.warmup_secs)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "\nstep {}: {} events/s for {warmup}{:.0} s  ->  {verdict}",
        s.index + 1,
        int(s.target_rate.round() as u64),
        s.measure_secs
    );
    let achieved = s.sent as f64 / s.send_secs.max(1e-9);
    let _ = writeln!(
        out,
        "  sent         {:>12}   in {:.1} s = {}/s; {} requests, at most {} in flight, {} batches late by more than one interval (max lag {:.1} ms)",
        int(s.sent),
        s.send_secs,
        int(achieved.round() as u64),
        int(s.requests),
        s.max_in_flight,
        s.late_batches,
        s.max_lag_ms
    );
    if s.late_batches * 100 > s.requests {
        let _ = writeln!(
            out,
            "  note         the generator fell behind its schedule at times ({:.1}% of batches late): the load was burstier than planned",
            100.0 * s.late_batches as f64 / s.requests.max(1) as f64
        );
    }
    let _ = writeln!(
        out,
        "  accepted     {:>12}   {}   (sent - accepted: {} rejected, {} in {} failed requests)",
        int(s.accepted),
        lost(s.sent, s.accepted),
        s.rejected,
        s.failed,
        s.failed_requests
    );
    let _ = writeln!(
        out,
        "  enriched     {:>12}   {}   (accepted - enriched; {} stream entries)",
        int(s.enriched),
        lost(s.accepted, s.enriched),
        int(s.enriched_entries)
    );
    let _ = writeln!(
        out,
        "  loaded       {:>12}   {}   (accepted - history rows)",
        int(s.loaded),
        lost(s.accepted, s.loaded)
    );
    match &s.fanout {
        Some(f) => fanout_step(out, s, f),
        None => subscriber_rows(out, s),
    }
    match &s.latency {
        Some(p) => {
            let _ = writeln!(
                out,
                "  latency      send -> subscriber, {} deliveries{} (warm-up excluded), limit p99 < {p99_limit_ms} ms",
                int(p.count),
                if s.fanout.is_some() { " of every-event operations" } else { "" }
            );
            let _ = writeln!(out, "               {}", p.line());
        }
        None => {
            let _ = writeln!(out, "  latency      none measured");
        }
    }
    if let Some(p) = s.fanout.as_ref().and_then(|f| f.conflated_age) {
        let _ = writeln!(
            out,
            "  age          send -> subscriber of conflated deliveries, {} (the age of the value on arrival: up to 1/maxRate by design, plus latency)",
            int(p.count)
        );
        let _ = writeln!(out, "               {}", p.line());
    }
    let _ = writeln!(
        out,
        "  drain        {:.1} s after the last answer ({})",
        s.drain_secs,
        if s.drained {
            "every count reached what was accepted"
        } else {
            "stopped moving or timed out before reaching it"
        }
    );
    if let Some(e) = &s.first_error {
        let _ = writeln!(out, "  first error  {e}");
        if e.contains("os error 24") {
            let _ = writeln!(
                out,
                "  note         the bench ran out of open files (one per subscriber, one per request in flight): those requests never reached ingest"
            );
        }
    }
    resources(out, "resources", &s.resources, s.resources_secs);
}

/// The fan-out summary of a step: a row per kind, then the totals.
fn fanout_step(out: &mut String, s: &StepFigures, f: &FanoutFigures) {
    let measured: u64 = f.kinds.iter().map(|k| k.measured).sum();
    let all: u64 = f.kinds.iter().map(|k| k.delivered + k.conflated).sum();
    let subscribers: u64 = f.kinds.iter().map(|k| k.subscribers).sum();
    let _ = writeln!(
        out,
        "  fan-out      {} messages to {} subscribers ({} of events sent after the warm-up = {}/s over the {:.0} s measured)",
        int(all),
        int(subscribers),
        int(measured),
        int((measured as f64 / s.measure_secs.max(1e-9)).round() as u64),
        s.measure_secs
    );
    let per_sec = |n: u64| int((n as f64 / s.measure_secs.max(1e-9)).round() as u64);
    let _ = writeln!(
        out,
        "    kind    subscribers  closed   msgs/s   every-event: delivered / expected  lost (subscribers)   conflated: delivered / selected  silent"
    );
    for k in &f.kinds {
        let lost = if k.extra > 0 {
            format!("{} +{} extra", int(k.lost), int(k.extra))
        } else {
            int(k.lost)
        };
        let _ = writeln!(
            out,
            "    {:<7} {:>11} {:>7} {:>8}   {:>21} / {:<11} {:>9} ({:>6})   {:>19} / {:<11} {:>6}",
            k.kind,
            int(k.subscribers),
            int(k.closed),
            per_sec(k.measured),
            int(k.delivered),
            int(k.expected),
            lost,
            int(k.short),
            int(k.conflated),
            int(k.conflatable),
            int(k.silent),
        );
    }
    let _ = writeln!(
        out,
        "    kind    latency ms, every-event: p50 / p90 / p99 / p99.9 / max       age ms, conflated: p50 / p90 / p99 / p99.9 / max"
    );
    let five = |p: Option<Percentiles>| match p {
        Some(p) => format!(
            "{} / {} / {} / {} / {}",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.p999),
            ms(p.max)
        ),
        None => "-".into(),
    };
    for k in &f.kinds {
        let _ = writeln!(
            out,
            "    {:<7} {:>58}       {:>48}",
            k.kind,
            five(k.every),
            five(k.conflated_age)
        );
    }
    let late: u64 = f.kinds.iter().map(|k| k.late).sum();
    let foreign: u64 = f.kinds.iter().map(|k| k.foreign).sum();
    if late + foreign > 0 {
        let _ = writeln!(
            out,
            "    ({} events of earlier steps, {} events this run did not send)",
            int(late),
            int(foreign)
        );
    }
    if f.outcomes.is_empty() {
        let _ = writeln!(
            out,
            "  closes       none: every socket open, no operation refused, completed or cut off"
        );
    } else {
        let _ = writeln!(
            out,
            "  closes       since connecting (sockets, refusals, errors):"
        );
        for (label, n) in &f.outcomes {
            let _ = writeln!(out, "    {:>7}  {label}", int(*n));
        }
    }
}

fn subscriber_rows(out: &mut String, s: &StepFigures) {
    let _ = writeln!(
        out,
        "  delivered    {:>12}   {:>12}   (per subscriber: delivered / expected = accepted events its filter selects)",
        "delivered", "expected"
    );
    for sub in &s.subscribers {
        let _ = writeln!(
            out,
            "    {:<10} {:>12}   {:>12}   {}{}",
            sub.name,
            int(sub.delivered),
            int(sub.expected),
            lost(sub.expected, sub.delivered),
            if sub.errors.is_empty() {
                String::new()
            } else {
                format!("   errors: {}", sub.errors.join(" | "))
            }
        );
    }
}

fn limit(v: Option<u64>) -> String {
    match v {
        Some(u64::MAX) => "unlimited".into(),
        Some(v) => int(v),
        None => "unknown".into(),
    }
}

fn fanout_setup(out: &mut String, f: &FanoutSetup) {
    let _ = writeln!(
        out,
        "  fan-out      {} of {} connections open{} in {:.1} s ({} connecting at a time), then {} subscriptions sent in {:.1} s",
        int(f.connected),
        int(f.requested),
        if f.failed > 0 {
            format!(" ({} failed)", int(f.failed))
        } else {
            String::new()
        },
        f.connect_secs,
        f.concurrency,
        int(f.subscriptions),
        f.subscribe_secs,
    );
    if let Some(p) = &f.connect {
        let _ = writeln!(
            out,
            "               per connection (TCP connect, upgrade, init, ack): {}",
            p.line()
        );
    }
    let m = f.idle_memory();
    let (before, open, subscribed) = f.system_rss_kib;
    let _ = writeln!(
        out,
        "  memory       tickgraph RSS {} MiB before connecting, {} MiB with the connections open, {} MiB with their subscriptions (each after {:.0} s idle):",
        mib(before),
        mib(open),
        mib(subscribed),
        f.idle_secs,
    );
    let _ = writeln!(
        out,
        "               {:.1} KiB per idle connection, {:.1} KiB per idle subscription; {:.1} KiB per subscriber with its {:.2} subscriptions",
        m.connection,
        m.subscription,
        m.subscriber,
        f.subscriptions as f64 / f.connected.max(1) as f64
    );
    let (b0, _, b2) = f.bench_rss_kib;
    let _ = writeln!(
        out,
        "               bench RSS {} -> {} MiB ({:.1} KiB per subscriber); RSS moves by MiBs as the allocators take and return memory, so these figures mean something only for thousands of connections",
        mib(b0),
        mib(b2),
        (b2 as f64 - b0 as f64) / f.connected.max(1) as f64
    );
    let [(t0, b0), (t1, b1), (t2, b2)] = f.idle_cores;
    let _ = writeln!(
        out,
        "  idle CPU     cores of tickgraph / bench over {:.0} s idle: {t0:.2} / {b0:.2} before connecting, {t1:.2} / {b1:.2} with the connections open, {t2:.2} / {b2:.2} with their subscriptions",
        f.idle_secs
    );
    let _ = writeln!(
        out,
        "  open files   soft limit: bench {}, tickgraph {}",
        limit(f.bench_nofile),
        limit(f.system_nofile)
    );
}

/// The whole report as plain text.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tickgraph bench, run {} on {} cores",
        r.run_id, r.cores
    );
    let _ = writeln!(out, "  command      {}", r.command);
    let _ = writeln!(out, "  system       {}", r.system);
    let _ = writeln!(out, "  load         {}", r.load);
    for (i, s) in r.subscribers.iter().enumerate() {
        let label = if i == 0 { "subscribers" } else { "" };
        let _ = writeln!(out, "  {label:<12} {s}");
    }
    if let Some(f) = &r.fanout {
        fanout_setup(&mut out, f);
    }
    match &r.ceiling {
        Ok(c) => {
            let _ = writeln!(
                out,
                "  Redis ceiling {} XADD/s of 8-field entries, measured before the load ({})",
                int(c.xadd_per_sec.round() as u64),
                c.method
            );
        }
        Err(why) => {
            let _ = writeln!(out, "  Redis ceiling not measured: {why}");
        }
    }
    for (s, v) in &r.steps {
        step(&mut out, s, v, r.p99_limit_ms);
    }
    let _ = writeln!(out, "\nresult");
    if r.ramp {
        let _ = writeln!(out, "  ramp         rate         p99 ms   verdict");
        for (s, v) in &r.steps {
            let _ = writeln!(
                out,
                "               {:>10}   {:>9}   {}",
                int(s.target_rate.round() as u64),
                s.latency.map_or_else(|| "-".into(), |p| ms(p.p99)),
                if v.sustained {
                    "sustained"
                } else {
                    "not sustained"
                }
            );
        }
    }
    let best = r
        .steps
        .iter()
        .filter(|(_, v)| v.sustained)
        .map(|(s, _)| s.target_rate)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    match best {
        Some(rate) => {
            let ratio = match &r.ceiling {
                Ok(c) if c.xadd_per_sec > 0.0 => format!(
                    " = {:.1}% of Redis's pipelined XADD ceiling",
                    100.0 * rate / c.xadd_per_sec
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  highest sustained rate   {} events/s{ratio}",
                int(rate.round() as u64)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  highest sustained rate   none: no step was sustained"
            );
        }
    }
    let _ = writeln!(
        out,
        "  history rows of the run  {} trades + {} quotes = {}",
        int(r.history.0),
        int(r.history.1),
        int(r.history.0 + r.history.1)
    );
    if r.steps.len() > 1 {
        resources(&mut out, "whole run", &r.whole, r.whole_secs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean_step() -> StepFigures {
        StepFigures {
            target_rate: 1000.0,
            send_secs: 1.0,
            sent: 1000,
            accepted: 1000,
            enriched: 1000,
            loaded: 1000,
            requests: 200,
            subscribers: vec![SubscriberFigures {
                name: "all-1".into(),
                expected: 1000,
                delivered: 1000,
                errors: Vec::new(),
            }],
            latency: Some(Percentiles {
                count: 1000,
                p50: 1_000,
                p90: 2_000,
                p99: 99_999,
                p999: 150_000,
                max: 200_000,
            }),
            ..StepFigures::default()
        }
    }

    #[test]
    fn percentiles_come_from_the_histogram_and_print_in_ms() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        for us in 1..=1000u64 {
            h.record(us * 1000).expect("in range");
        }
        let p = Percentiles::of(&h).expect("not empty");
        assert_eq!(p.count, 1000);
        // Three significant digits: values are within 0.1% of the exact ones.
        assert!((499_000..=501_000).contains(&p.p50), "{}", p.p50);
        assert!((989_000..=991_000).contains(&p.p99), "{}", p.p99);
        assert!((999_000..=1_001_000).contains(&p.max), "{}", p.max);
        assert_eq!(ms(1_234_567), "1234.567");
        assert_eq!(ms(5), "0.005");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(int(999), "999");
        assert!(Percentiles::of(&Histogram::<u64>::new(3).expect("h")).is_none());
    }

    #[test]
    fn a_step_is_sustained_only_without_loss_and_under_the_p99_limit() {
        let s = clean_step();
        assert_eq!(
            judge(&s, 100.0),
            Verdict {
                sustained: true,
                reasons: vec![]
            }
        );

        let mut slow = clean_step();
        slow.latency = slow.latency.map(|p| Percentiles { p99: 100_000, ..p });
        let v = judge(&slow, 100.0);
        assert!(!v.sustained);
        assert!(v.reasons[0].contains("p99 100.000 ms"), "{:?}", v.reasons);

        let mut lossy = clean_step();
        lossy.loaded = 998;
        lossy.subscribers[0].delivered = 1001;
        let v = judge(&lossy, 100.0);
        assert!(!v.sustained);
        assert_eq!(
            v.reasons,
            vec![
                "2 lost between ingest and history".to_string(),
                "1 extra to subscriber all-1".to_string()
            ]
        );

        let mut late = clean_step();
        late.late_batches = 30;
        assert!(judge(&late, 100.0).sustained, "late but caught up");
        let mut behind = clean_step();
        behind.send_secs = 1.1;
        assert_eq!(
            judge(&behind, 100.0).reasons,
            vec!["the generator offered only 909 of 1,000 events/s".to_string()]
        );
    }

    #[test]
    fn the_report_names_the_highest_sustained_rate_against_the_ceiling() {
        let ok = clean_step();
        let mut failed = clean_step();
        failed.target_rate = 2000.0;
        failed.enriched = 10;
        let r = Report {
            command: "tickgraph bench --ramp 1000:1000:2000".into(),
            run_id: "t".into(),
            cores: 2,
            system: String::new(),
            load: String::new(),
            subscribers: Vec::new(),
            fanout: None,
            history: (0, 0),
            whole: Vec::new(),
            whole_secs: 0.0,
            ramp: true,
            p99_limit_ms: 100.0,
            ceiling: Ok(Ceiling {
                xadd_per_sec: 10_000.0,
                method: "test".into(),
            }),
            steps: vec![
                (ok.clone(), judge(&ok, 100.0)),
                (failed.clone(), judge(&failed, 100.0)),
            ],
        };
        let text = render(&r);
        assert!(
            text.contains("highest sustained rate   1,000 events/s = 10.0% of Redis"),
            "{text}"
        );
        assert!(text.contains("NOT SUSTAINED: 990 lost between ingest and the enriched streams"));
    }

    #[test]
    fn a_fan_out_step_is_judged_by_kind_and_reports_idle_memory() {
        let mut s = clean_step();
        s.subscribers.clear();
        s.measure_secs = 10.0;
        s.first_error = Some("POST x: tcp open error: Too many open files (os error 24)".into());
        s.fanout = Some(FanoutFigures {
            kinds: vec![
                KindFigures {
                    kind: "watch".into(),
                    subscribers: 300,
                    expected: 9_000,
                    delivered: 8_990,
                    lost: 12,
                    extra: 2,
                    short: 3,
                    measured: 8_000,
                    ..KindFigures::default()
                },
                KindFigures {
                    kind: "grid".into(),
                    subscribers: 500,
                    conflatable: 50_000,
                    conflated: 20_000,
                    silent: 4,
                    measured: 18_000,
                    ..KindFigures::default()
                },
            ],
            conflated_age: None,
            outcomes: vec![("closed by the server: 4008 slow consumer".into(), 3)],
        });
        let v = judge(&s, 100.0);
        assert_eq!(
            v.reasons,
            vec![
                "12 lost to 3 of 300 watch subscribers".to_string(),
                "2 extra to watch subscribers".to_string(),
                "4 conflated grid subscribers received nothing".to_string(),
            ]
        );
        let setup = FanoutSetup {
            requested: 1000,
            connected: 1000,
            subscriptions: 1600,
            system_rss_kib: (40_000, 44_000, 52_000),
            bench_rss_kib: (20_000, 25_000, 30_000),
            ..FanoutSetup::default()
        };
        assert_eq!(
            setup.idle_memory(),
            IdleMemory {
                connection: 4.0,
                subscription: 5.0,
                subscriber: 12.0
            }
        );
        let r = Report {
            command: "tickgraph bench --fanout 1000".into(),
            run_id: "t".into(),
            cores: 2,
            system: String::new(),
            load: String::new(),
            subscribers: Vec::new(),
            fanout: Some(setup),
            history: (0, 0),
            whole: Vec::new(),
            whole_secs: 0.0,
            ramp: false,
            p99_limit_ms: 100.0,
            ceiling: Err("skipped".into()),
            steps: vec![(s.clone(), v)],
        };
        let text = render(&r);
        for want in [
            "4.0 KiB per idle connection, 5.0 KiB per idle subscription; 12.0 KiB per subscriber with its 1.60 subscriptions",
            "28,990 messages to 800 subscribers (26,000 of events sent after the warm-up = 2,600/s",
            "      3  closed by the server: 4008 slow consumer",
            "deliveries of every-event operations",
            "the bench ran out of open files",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }
}
