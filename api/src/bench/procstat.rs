//! CPU time and resident memory of the system under test, sampled from /proc
//! every second: tickgraph processes (other than the bench), redis-server, every
//! postgres process summed, and the bench itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Which processes a figure sums.
pub const GROUPS: [&str; 4] = ["tickgraph", "redis-server", "postgres", "bench"];
pub const TICKGRAPH: usize = 0;
const REDIS: usize = 1;
const POSTGRES: usize = 2;
pub const BENCH: usize = 3;

/// One reading of every group.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since sampling started.
    pub at: f64,
    /// CPU clock ticks used since sampling started (processes started later
    /// count from their start; those that ended keep their last reading).
    pub cpu_ticks: [u64; 4],
    pub rss_kib: [u64; 4],
    pub procs: [u32; 4],
}

/// The use of one group over a window of samples.
#[derive(Debug, Clone, Default)]
pub struct GroupUse {
    pub name: &'static str,
    pub cpu_secs: f64,
    pub cores: f64,
    pub peak_rss_kib: u64,
    pub rss_start_kib: u64,
    pub rss_mid_kib: u64,
    pub rss_end_kib: u64,
    pub procs: u32,
}

/// The comm of a process we track, as its group; `only` narrows tickgraph
/// processes to one pid.
fn group_of(comm: &str, pid: u32, own: u32, only: Option<u32>) -> Option<usize> {
    match comm {
        _ if pid == own => Some(BENCH),
        "tickgraph" if only.is_none_or(|p| p == pid) => Some(TICKGRAPH),
        "redis-server" => Some(REDIS),
        "postgres" => Some(POSTGRES),
        _ => None,
    }
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks. The command name
/// is in parentheses and may hold spaces and parentheses itself.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // Fields 3 (state) onwards; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a `/proc/<pid>/status`, in KiB.
pub fn vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

struct Tracked {
    group: usize,
    baseline: u64,
    last: u64,
}

struct State {
    own: u32,
    only: Option<u32>,
    start: Instant,
    tracked: HashMap<u32, Tracked>,
    samples: Vec<Sample>,
}

impl State {
    fn sample(&mut self) {
        let first = self.samples.is_empty();
        let mut rss = [0u64; 4];
        let mut procs = [0u32; 4];
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
                continue;
            };
            let Some(group) = group_of(comm.trim_end(), pid, self.own, self.only) else {
                continue;
            };
            // A process may end between reads; it then keeps its last figures.
            let Some(ticks) = std::fs::read_to_string(path.join("stat"))
                .ok()
                .and_then(|s| stat_ticks(&s))
            else {
                continue;
            };
            let t = self.tracked.entry(pid).or_insert(Tracked {
                group,
                baseline: if first { ticks } else { 0 },
                last: ticks,
            });
            t.last = ticks.max(t.baseline);
            procs[group] += 1;
            rss[group] += std::fs::read_to_string(path.join("status"))
                .ok()
                .and_then(|s| vmrss_kib(&s))
                .unwrap_or(0);
        }
        let mut cpu = [0u64; 4];
        for t in self.tracked.values() {
            cpu[t.group] += t.last - t.baseline;
        }
        self.samples.push(Sample {
            at: self.start.elapsed().as_secs_f64(),
            cpu_ticks: cpu,
            rss_kib: rss,
            procs,
        });
    }
}

/// The sampler; [`ProcStat::mark`] takes a sample now and names it, so windows
/// start and end exactly where the bench's phases do.
#[derive(Clone)]
pub struct ProcStat {
    state: Arc<Mutex<State>>,
    clk_tck: f64,
}

impl ProcStat {
    /// Takes the baseline sample and samples every second until `stop`.
    /// `tickgraph_pid`: the one tickgraph process to count (default: every one
    /// but the bench).
    pub async fn start(clk_tck: u64, tickgraph_pid: Option<u32>, stop: CancellationToken) -> Self {
        let me = Self {
            state: Arc::new(Mutex::new(State {
                own: std::process::id(),
                only: tickgraph_pid,
                start: Instant::now(),
                tracked: HashMap::new(),
                samples: Vec::new(),
            })),
            clk_tck: clk_tck.max(1) as f64,
        };
        me.mark().await;
        let sampler = me.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => { sampler.mark().await; }
                }
            }
        });
        me
    }

    /// Samples now; returns the sample's index.
    pub async fn mark(&self) -> usize {
        let state = self.state.clone();
        // Reading /proc is a few hundred small blocking reads.
        let taken = tokio::task::spawn_blocking(move || {
            let mut s = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.sample();
            s.samples.len().saturating_sub(1)
        })
        .await;
        taken.unwrap_or(0)
    }

    /// The RSS of every group (in [`GROUPS`] order, KiB) at sample `mark`.
    pub fn rss_at(&self, mark: usize) -> [u64; 4] {
        let s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.samples.get(mark).map_or([0; 4], |x| x.rss_kib)
    }

    /// The seconds between samples `from` and `to`, and every group's use.
    pub fn window(&self, from: usize, to: usize) -> (f64, Vec<GroupUse>) {
        let s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        usage(&s.samples, from, to, self.clk_tck)
    }
}

/// The seconds between samples `from` and `to`, and every group's use then.
pub fn usage(samples: &[Sample], from: usize, to: usize, clk_tck: f64) -> (f64, Vec<GroupUse>) {
    let to = to.min(samples.len().saturating_sub(1));
    let from = from.min(to);
    let Some(window) = samples.get(from..=to) else {
        return (0.0, Vec::new());
    };
    let (a, b) = (&window[0], &window[window.len() - 1]);
    let secs = (b.at - a.at).max(1e-9);
    let mid_at = (a.at + b.at) / 2.0;
    let mid = window
        .iter()
        .min_by(|x, y| (x.at - mid_at).abs().total_cmp(&(y.at - mid_at).abs()))
        .unwrap_or(a);
    let groups = GROUPS
        .iter()
        .enumerate()
        .map(|(g, name)| {
            let cpu_secs = b.cpu_ticks[g].saturating_sub(a.cpu_ticks[g]) as f64 / clk_tck;
            GroupUse {
                name,
                cpu_secs,
                cores: cpu_secs / secs,
                peak_rss_kib: window.iter().map(|s| s.rss_kib[g]).max().unwrap_or(0),
                rss_start_kib: a.rss_kib[g],
                rss_mid_kib: mid.rss_kib[g],
                rss_end_kib: b.rss_kib[g],
                procs: window.iter().map(|s| s.procs[g]).max().unwrap_or(0),
            }
        })
        .collect();
    (b.at - a.at, groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tick (graph) x) S 1 4242 4242 0 -1 4194304 1234 0 0 0 150 25 0 0 20 0 9 0 100 1000 200 18446744073709551615";
        assert_eq!(stat_ticks(stat), Some(175));
        assert_eq!(stat_ticks("4242 (short) S 1"), None);
        let status = "Name:\ttickgraph\nVmPeak:\t  90000 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(vmrss_kib(status), Some(40960));
    }

    #[test]
    fn a_window_reports_cpu_cores_and_memory_over_its_samples() {
        let s = |at: f64, ticks: u64, rss: u64| Sample {
            at,
            cpu_ticks: [ticks, 0, 0, 0],
            rss_kib: [rss, 0, 0, 0],
            procs: [1, 0, 0, 0],
        };
        let samples = [
            s(0.0, 0, 100),
            s(1.0, 50, 300),
            s(2.0, 150, 200),
            s(4.0, 300, 250),
        ];
        let (secs, u) = usage(&samples, 1, 3, 100.0);
        assert!((secs - 3.0).abs() < 1e-9);
        assert_eq!(u[0].name, "tickgraph");
        assert!((u[0].cpu_secs - 2.5).abs() < 1e-9);
        assert!((u[0].cores - 2.5 / 3.0).abs() < 1e-9);
        assert_eq!(
            (
                u[0].peak_rss_kib,
                u[0].rss_start_kib,
                u[0].rss_mid_kib,
                u[0].rss_end_kib
            ),
            (300, 300, 200, 250)
        );
    }
}
