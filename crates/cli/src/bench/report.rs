//! What workers measure, how reports merge, and the final JSON line and summary.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::conn::Target;
use super::{scenario_json, Scenario};

/// Microseconds since the Unix epoch: comparable across the worker processes.
pub(super) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Resident memory in bytes of a process and its children (the workers of `hubbub serve
/// --workers N`), from /proc.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let one = |pid: u32| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    let own = one(pid)?;
    Some(own + children(pid).into_iter().filter_map(one).sum::<u64>())
}

/// The fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// The running children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| {
            // Field 4 of stat(5), the parent: the second after the command name.
            stat_fields(*c).is_some_and(|f| f.get(1).and_then(|p| p.parse().ok()) == Some(pid))
        })
        .collect()
}

/// User + system CPU seconds of a process and its running children, from /proc.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let one = |pid: u32| -> Option<f64> {
        let fields = stat_fields(pid)?;
        // Fields 14 and 15 of stat(5), counted after the command name.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / 100.0)
    };
    let own = one(pid)?;
    Some(own + children(pid).into_iter().filter_map(one).sum::<f64>())
}

/// A latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A histogram as `(value, count)` pairs, to travel in a report.
pub(super) fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn from_pairs(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = histogram();
    for &(v, n) in pairs {
        let _ = h.record_n(v.max(1), n);
    }
    h
}

/// One worker's measurements; the parent merges them.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Report {
    /// Connections that were opened (and, for hubbub, welcomed).
    pub(super) connected: u64,
    /// Connections that failed, by cause.
    pub(super) failures: BTreeMap<String, u64>,
    /// Sends written to the socket.
    pub(super) sent: u64,
    /// Sends answered with `ok` (hubbub).
    pub(super) acked: u64,
    /// `error` frames received.
    pub(super) errors: u64,
    /// Connections the server closed during the run.
    pub(super) closed: u64,
    /// Messages received, duplicates included.
    pub(super) delivered: u64,
    /// Messages received more than once by the same connection.
    pub(super) duplicates: u64,
    /// Fanout, per sender: messages it sent.
    pub(super) sent_per_sender: Vec<u64>,
    /// Fanout, per sender: receivers in this worker that expect its messages.
    pub(super) receivers_per_sender: Vec<u64>,
    /// Fanout, per sender: distinct (receiver, message) pairs seen.
    pub(super) unique_per_sender: Vec<u64>,
    /// Delivery latency (fanout) or ack latency (dm), µs, as histogram pairs.
    pub(super) latency: Vec<(u64, u64)>,
    /// Fanout at a fixed rate, per message: its slowest delivery so far, µs.
    pub(super) last_delivery: Vec<u64>,
    /// dm: send-to-delivery latency, µs, as histogram pairs.
    #[serde(default)]
    pub(super) delivery_latency: Vec<(u64, u64)>,
    /// Connect: time to an open (welcomed) connection, µs, as histogram pairs.
    pub(super) connect_latency: Vec<(u64, u64)>,
    /// When the worker finished its run phase (µs since the epoch).
    pub(super) end_us: u64,
}

fn add_vec(into: &mut Vec<u64>, from: &[u64], f: impl Fn(u64, u64) -> u64) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, &b) in into.iter_mut().zip(from) {
        *a = f(*a, b);
    }
}

impl Report {
    pub(super) fn fail(&mut self, cause: &str) {
        *self.failures.entry(cause.to_string()).or_default() += 1;
    }

    pub(super) fn merge(&mut self, r: Report) {
        self.connected += r.connected;
        for (k, v) in r.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.sent += r.sent;
        self.acked += r.acked;
        self.errors += r.errors;
        self.closed += r.closed;
        self.delivered += r.delivered;
        self.duplicates += r.duplicates;
        add_vec(&mut self.sent_per_sender, &r.sent_per_sender, |a, b| a + b);
        add_vec(
            &mut self.receivers_per_sender,
            &r.receivers_per_sender,
            |a, b| a + b,
        );
        add_vec(&mut self.unique_per_sender, &r.unique_per_sender, |a, b| {
            a + b
        });
        add_vec(&mut self.last_delivery, &r.last_delivery, u64::max);
        for (into, from) in [
            (&mut self.latency, &r.latency),
            (&mut self.delivery_latency, &r.delivery_latency),
            (&mut self.connect_latency, &r.connect_latency),
        ] {
            let mut h = from_pairs(into);
            let _ = h.add(from_pairs(from));
            *into = to_pairs(&h);
        }
        self.end_us = self.end_us.max(r.end_us);
    }

    /// Deliveries that should have happened: every message to every receiver that
    /// expects it.
    fn expected(&self) -> u64 {
        self.sent_per_sender
            .iter()
            .zip(&self.receivers_per_sender)
            .map(|(s, r)| s * r)
            .sum()
    }

    fn unique(&self) -> u64 {
        self.unique_per_sender.iter().sum()
    }
}

/// Percentiles of a histogram in milliseconds.
fn percentiles(pairs: &[(u64, u64)]) -> serde_json::Value {
    let h = from_pairs(pairs);
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let ms = |v: u64| (v as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "n": h.len(),
    })
}

fn ms_text(v: &serde_json::Value) -> String {
    if v.is_null() {
        return "n/a".into();
    }
    format!(
        "p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
        v["p50"], v["p99"], v["p999"], v["max"]
    )
}

/// The merged result of a run and what the parent measured around it.
pub(super) struct Summary<'a> {
    pub(super) scenario: &'a Scenario,
    pub(super) target: Target,
    pub(super) procs: usize,
    pub(super) start_us: u64,
    pub(super) setup_secs: f64,
    pub(super) rss_before: Option<u64>,
    pub(super) rss_loaded: Option<u64>,
    pub(super) server_cpu_secs: Option<f64>,
    pub(super) report: &'a Report,
}

impl Summary<'_> {
    /// One JSON line and a readable paragraph.
    pub(super) fn render(&self) -> (String, String) {
        let r = self.report;
        let mut out = json!({
            "scenario": self.scenario.name(),
            "target": self.target,
            "params": scenario_json(self.scenario),
            "procs": self.procs,
            "connected": r.connected,
            "failures": r.failures,
            "setup_secs": round3(self.setup_secs),
            "server_cpu_secs": self.server_cpu_secs.map(round3),
        });
        let failures = if r.failures.is_empty() {
            "no failures".to_string()
        } else {
            format!("failures {:?}", r.failures)
        };
        let text = match self.scenario {
            Scenario::Idle { .. } => {
                let per_conn = match (self.rss_before, self.rss_loaded) {
                    (Some(b), Some(a)) if r.connected > 0 => {
                        Some(a.saturating_sub(b) as f64 / r.connected as f64)
                    }
                    _ => None,
                };
                out["rss_before"] = json!(self.rss_before);
                out["rss_loaded"] = json!(self.rss_loaded);
                out["bytes_per_conn"] = json!(per_conn.map(|p| p.round()));
                format!(
                    "idle ({:?}): {} connections open ({failures}) in {:.1} s; server RSS {} -> {}: {} bytes per connection",
                    self.target,
                    r.connected,
                    self.setup_secs,
                    opt(self.rss_before),
                    opt(self.rss_loaded),
                    per_conn.map_or("?".into(), |p| format!("{p:.0}")),
                )
            }
            Scenario::Connect { .. } => {
                let secs = r.end_us.saturating_sub(self.start_us) as f64 / 1e6;
                let rate = r.connected as f64 / secs.max(1e-6);
                let lat = percentiles(&r.connect_latency);
                out["secs"] = json!(round3(secs));
                out["conns_per_sec"] = json!(rate.round());
                out["connect_ms"] = lat.clone();
                format!(
                    "connect ({:?}): {} connections in {secs:.2} s = {rate:.0}/s ({failures}); time to open: {}",
                    self.target,
                    r.connected,
                    ms_text(&lat)
                )
            }
            Scenario::Fanout {
                load,
                rate,
                members,
                senders,
                ..
            } => {
                let duration = load.duration;
                let expected = r.expected();
                let lost = expected.saturating_sub(r.unique());
                let lat = percentiles(&r.latency);
                let last = last_delivery(&r.last_delivery);
                let per_sec = r.delivered as f64 / duration;
                let cpu_per_m = self
                    .server_cpu_secs
                    .filter(|_| r.delivered > 0)
                    .map(|c| c / r.delivered as f64 * 1e6);
                out["sent"] = json!(r.sent);
                out["acked"] = json!(r.acked);
                out["errors"] = json!(r.errors);
                out["closed"] = json!(r.closed);
                out["delivered"] = json!(r.delivered);
                out["expected"] = json!(expected);
                out["lost"] = json!(lost);
                out["duplicates"] = json!(r.duplicates);
                out["deliveries_per_sec"] = json!(per_sec.round());
                out["latency_ms"] = lat.clone();
                out["last_delivery_ms"] = last.clone();
                // Per message, when there are few (sender-major order; 0: never arrived).
                let each = (r.last_delivery.len() <= MAX_EACH).then(|| {
                    r.last_delivery
                        .iter()
                        .map(|&us| (us as f64 / 100.0).round() / 10.0)
                        .collect::<Vec<f64>>()
                });
                if let Some(each) = &each {
                    out["last_delivery_each_ms"] = json!(each);
                }
                out["cpu_secs_per_million_deliveries"] = json!(cpu_per_m.map(round3));
                let clean = lost == 0
                    && r.duplicates == 0
                    && r.errors == 0
                    && lat["p99"].as_f64().is_some_and(|p| p < 100.0);
                out["clean"] = json!(clean);
                format!(
                    "fanout ({:?}): {members} members, {senders} senders at {rate}/s for {duration} s: {} sent, {} acked, {} delivered ({per_sec:.0}/s) of {expected} expected; lost {lost}, duplicates {}, errors {}, closed {}\n  delivery latency: {}\n  send to last delivery: {}\n  server CPU {} s = {} s per million deliveries; {failures}; {}",
                    self.target,
                    r.sent,
                    r.acked,
                    r.delivered,
                    r.duplicates,
                    r.errors,
                    r.closed,
                    ms_text(&lat),
                    ms_text(&last),
                    self.server_cpu_secs.map_or("?".into(), |c| format!("{c:.2}")),
                    cpu_per_m.map_or("?".into(), |c| format!("{c:.2}")),
                    if clean { "clean" } else { "NOT clean" },
                ) + &each.map_or(String::new(), |e| {
                    format!("\n  send to last delivery, each message (ms): {e:?}")
                })
            }
            Scenario::Dm { pairs, load, .. } => {
                let duration = load.duration;
                let lat = percentiles(&r.latency);
                let per_sec = r.acked as f64 / duration;
                out["sent"] = json!(r.sent);
                out["acked"] = json!(r.acked);
                out["errors"] = json!(r.errors);
                out["closed"] = json!(r.closed);
                out["delivered"] = json!(r.delivered);
                out["duplicates"] = json!(r.duplicates);
                out["acked_per_sec"] = json!(per_sec.round());
                out["ack_ms"] = lat.clone();
                let delivery = percentiles(&r.delivery_latency);
                out["delivery_ms"] = delivery.clone();
                format!(
                    "dm: {pairs} pairs for {duration} s: {} sent, {} acked ({per_sec:.0}/s), {} delivered, duplicates {}, errors {}, closed {}\n  ack latency: {}\n  delivery latency: {}\n  server CPU {} s; {failures}",
                    r.sent,
                    r.acked,
                    r.delivered,
                    r.duplicates,
                    r.errors,
                    r.closed,
                    ms_text(&lat),
                    ms_text(&delivery),
                    self.server_cpu_secs.map_or("?".into(), |c| format!("{c:.2}")),
                )
            }
            Scenario::Floor(_) | Scenario::Disk(_) => String::new(),
        };
        (out.to_string(), text)
    }
}

/// Runs with at most this many messages also report each message's last delivery.
const MAX_EACH: usize = 100;

/// Percentiles over messages of the time from a message's due time to its last
/// delivery.
fn last_delivery(per_message: &[u64]) -> serde_json::Value {
    let mut h = histogram();
    for &v in per_message.iter().filter(|v| **v > 0) {
        let _ = h.record(v);
    }
    percentiles(&to_pairs(&h))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn opt(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_merge_counts_vectors_and_histograms() {
        let mut h = histogram();
        h.record(1000).unwrap();
        let a = Report {
            connected: 2,
            sent_per_sender: vec![10, 0],
            receivers_per_sender: vec![1, 1],
            unique_per_sender: vec![10, 7],
            latency: to_pairs(&h),
            last_delivery: vec![5, 9],
            ..Report::default()
        };
        let b = Report {
            connected: 3,
            sent_per_sender: vec![0, 8],
            receivers_per_sender: vec![2, 1],
            unique_per_sender: vec![20, 8],
            latency: to_pairs(&h),
            last_delivery: vec![7, 3],
            ..Report::default()
        };
        let mut t = Report::default();
        t.fail("refused");
        t.merge(a);
        t.merge(b);
        assert_eq!(t.connected, 5);
        assert_eq!(t.expected(), 10 * 3 + 8 * 2);
        assert_eq!(t.unique(), 45);
        assert_eq!(t.last_delivery, vec![7, 9]);
        assert_eq!(from_pairs(&t.latency).len(), 2);
        assert_eq!(t.failures["refused"], 1);
    }

    #[test]
    fn proc_stat_is_read_for_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
    }
}
