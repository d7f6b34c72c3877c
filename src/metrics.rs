//! Prometheus metrics (SPEC §7), rendered by the admin listener. Request outcomes are
//! counted once per request, from the same report the log line is made of.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proxy::outcome::{Outcome, Report};
use crate::server::Connections;
use crate::store::Store;

/// The `route` label of requests that matched no route.
pub const UNROUTED: &str = "unrouted";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream: Family<RouteLabel, Histogram, fn() -> Histogram>,
    inflight: Family<RouteLabel, Gauge>,
    waiting: Family<RouteLabel, Gauge>,
    /// Each route's series, found by name: `get_or_create` builds and hashes its labels
    /// on every call (measured: ~2% of a pass-through GET's instructions).
    routes: ArcSwap<Vec<Arc<RouteSeries>>>,
}

/// One route's series, each taken from its family on first use (so a series appears
/// only once it has counted something, as before).
struct RouteSeries {
    route: Box<str>,
    requests: [OnceLock<Counter>; Outcome::ALL.len()],
    upstream: OnceLock<Histogram>,
    inflight: OnceLock<Gauge>,
    waiting: OnceLock<Gauge>,
}

impl RouteSeries {
    fn new(route: &str) -> Self {
        RouteSeries {
            route: route.into(),
            requests: Default::default(),
            upstream: OnceLock::new(),
            inflight: OnceLock::new(),
            waiting: OnceLock::new(),
        }
    }

    fn label(&self) -> RouteLabel {
        RouteLabel {
            route: self.route.to_string(),
        }
    }
}

impl Metrics {
    pub fn new(store: Arc<dyn Store>, connections: Arc<Connections>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("idemgate");
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream = Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let inflight = Family::<RouteLabel, Gauge>::default();
        let waiting = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "requests",
            "Requests by route and outcome",
            requests.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream exchange duration (to the response head on pass-through routes)",
            upstream.clone(),
        );
        registry.register(
            "inflight",
            "Upstream exchanges holding a claim, by route",
            inflight.clone(),
        );
        registry.register(
            "waiting",
            "Duplicates waiting for an in-flight request, by route",
            waiting.clone(),
        );
        registry.register_collector(Box::new(StoreCollector(store)));
        registry.register_collector(Box::new(ConnectionCollector(connections)));
        Arc::new(Metrics {
            registry,
            requests,
            upstream,
            inflight,
            waiting,
            routes: ArcSwap::default(),
        })
    }

    /// Runs `f` on `route`'s series, adding them on the route's first request.
    fn with_route<R>(&self, route: &str, f: impl FnOnce(&RouteSeries) -> R) -> R {
        let route = if route.is_empty() { UNROUTED } else { route };
        let known = self.routes.load();
        if let Some(series) = known.iter().find(|s| &*s.route == route) {
            return f(series);
        }
        drop(known);
        self.routes.rcu(|all| {
            let mut all = (**all).clone();
            if !all.iter().any(|s| &*s.route == route) {
                all.push(Arc::new(RouteSeries::new(route)));
            }
            all
        });
        let known = self.routes.load();
        match known.iter().find(|s| &*s.route == route) {
            Some(series) => f(series),
            // Not reached (routes are only ever added); the families count it either way.
            None => f(&RouteSeries::new(route)),
        }
    }

    pub fn observe(&self, route: &str, report: &Report) {
        self.with_route(route, |series| {
            if let Some(outcome) = report.outcome {
                let labels = || RequestLabels {
                    route: series.route.to_string(),
                    outcome: outcome.as_str(),
                };
                // `Outcome::ALL` lists every outcome at its own index (tested there); an
                // outcome left out of it is still counted, through the family.
                let counter = match series.requests.get(outcome as usize) {
                    Some(slot) => {
                        slot.get_or_init(|| self.requests.get_or_create(&labels()).clone())
                    }
                    None => &self.requests.get_or_create(&labels()).clone(),
                };
                counter.inc();
            }
            if let Some(latency) = report.upstream_latency {
                series
                    .upstream
                    .get_or_init(|| self.upstream.get_or_create(&series.label()).clone())
                    .observe(latency.as_secs_f64());
            }
        })
    }

    /// Counts one exchange in flight on `route` until the guard drops.
    pub fn inflight(&self, route: &str) -> GaugeGuard {
        self.with_route(route, |series| {
            GaugeGuard::new(
                series
                    .inflight
                    .get_or_init(|| self.inflight.get_or_create(&series.label()).clone()),
            )
        })
    }

    /// Counts one duplicate waiting on `route` until the guard drops.
    pub fn waiting(&self, route: &str) -> GaugeGuard {
        self.with_route(route, |series| {
            GaugeGuard::new(
                series
                    .waiting
                    .get_or_init(|| self.waiting.get_or_create(&series.label()).clone()),
            )
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        out
    }
}

/// Holds a gauge one higher for as long as it lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads the store's own counters at scrape time.
struct StoreCollector(Arc<dyn Store>);

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        emit(
            &mut encoder,
            "store_records",
            "Completed records held",
            gauge(s.records),
        )?;
        emit(
            &mut encoder,
            "store_bytes",
            "Bytes of completed records held",
            gauge(s.bytes),
        )?;
        emit(
            &mut encoder,
            "evicted_before_ttl",
            "Completed records evicted for space before their ttl (a retry of one runs again)",
            ConstCounter::new(s.evicted_before_ttl),
        )?;
        emit(
            &mut encoder,
            "lease_lost",
            "In-flight leases lost while their holder was still working (shared stores only)",
            ConstCounter::new(s.lease_lost),
        )
    }
}

/// Open client connections and those closed at accept for want of a slot.
#[derive(Debug)]
struct ConnectionCollector(Arc<Connections>);

impl Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let open = i64::try_from(self.0.open()).unwrap_or(i64::MAX);
        emit(
            &mut encoder,
            "connections_open",
            "Client connections open on the proxy listener",
            ConstGauge::new(open),
        )?;
        emit(
            &mut encoder,
            "connections_refused",
            "Client connections closed at accept because server.max_connections was reached",
            ConstCounter::new(self.0.refused()),
        )
    }
}

fn emit(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::memory::MemoryStore;

    fn metrics() -> Arc<Metrics> {
        Metrics::new(MemoryStore::new(1 << 20), Connections::new(8))
    }

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn each_route_counts_into_its_own_series_and_only_once_used() {
        let m = metrics();
        let ms = Some(Duration::from_millis(1));
        m.observe("a", &Report::new(Outcome::Forwarded, None, ms));
        m.observe("b", &Report::new(Outcome::Replayed, None, None));
        m.observe("a", &Report::new(Outcome::Forwarded, None, ms));
        m.observe("", &Report::new(Outcome::Passthrough, None, ms));
        let held = m.inflight("b");
        let text = m.render();
        let requests = |route: &str, outcome: &str| {
            value(
                &text,
                &format!("idemgate_requests_total{{route=\"{route}\",outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(requests("a", "forwarded").as_deref(), Some("2"));
        assert_eq!(requests("b", "replayed").as_deref(), Some("1"));
        assert_eq!(requests(UNROUTED, "passthrough").as_deref(), Some("1"));
        assert_eq!(requests("a", "replayed"), None, "{text}");
        assert_eq!(requests("b", "forwarded"), None, "{text}");
        let count = |route: &str| {
            value(
                &text,
                &format!("idemgate_upstream_duration_seconds_count{{route=\"{route}\"}}"),
            )
        };
        assert_eq!(count("a").as_deref(), Some("2"));
        assert_eq!(count("b"), None, "{text}");
        assert_eq!(
            value(&text, "idemgate_inflight{route=\"b\"}").as_deref(),
            Some("1")
        );
        drop(held);
        assert_eq!(
            value(&m.render(), "idemgate_inflight{route=\"b\"}").as_deref(),
            Some("0")
        );
    }
}
