//! The node's metrics, through `prometheus-client`: API requests by route, method and status;
//! job durations by operation and outcome; agent commands by kind and outcome; and, read at each
//! scrape, the bus, the queues, the callbacks awaited, the hosts tracked and state sync's
//! repairs. `GET /metrics` answers [`Metrics::encode`].

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    command: String,
    outcome: String,
}

type Durations = Family<JobLabels, Histogram, fn() -> Histogram>;

fn job_histogram() -> Histogram {
    // 10 ms to about 3 hours.
    Histogram::new(exponential_buckets(0.01, 2.5, 14))
}

/// The metrics of one node.
pub struct Metrics {
    registry: Mutex<Registry>,
    api: Family<ApiLabels, Counter>,
    jobs: Durations,
    agent: Family<AgentLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let api = Family::<ApiLabels, Counter>::default();
        let jobs = Durations::new_with_constructor(job_histogram);
        let agent = Family::<AgentLabels, Counter>::default();
        r.register(
            "stratus_api_requests",
            "API requests answered, by route, method and status",
            api.clone(),
        );
        r.register(
            "stratus_job_seconds",
            "How long jobs took, by operation and outcome (ok or the error code)",
            jobs.clone(),
        );
        r.register(
            "stratus_agent_commands",
            "Commands sent to agents, by kind and outcome (ok or the error code)",
            agent.clone(),
        );
        Metrics {
            registry: Mutex::new(r),
            api,
            jobs,
            agent,
        }
    }
}

impl Metrics {
    pub fn api_request(&self, route: &str, method: &str, status: u16) {
        let l = ApiLabels {
            route: route.to_string(),
            method: method.to_string(),
            status,
        };
        self.api.get_or_create(&l).inc();
    }

    pub fn job_ended(&self, operation: &str, outcome: &str, seconds: f64) {
        let l = JobLabels {
            operation: operation.to_string(),
            outcome: outcome.to_string(),
        };
        self.jobs.get_or_create(&l).observe(seconds);
    }

    pub fn agent_command(&self, command: &str, outcome: &str) {
        let l = AgentLabels {
            command: command.to_string(),
            outcome: outcome.to_string(),
        };
        self.agent.get_or_create(&l).inc();
    }

    /// Add metrics read at each scrape.
    pub fn register_collector(&self, c: impl Collector) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(c));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// A value read at a scrape, for a [`Collector`].
pub enum Reading<'a> {
    Counter(&'a str, &'a str, u64),
    Gauge(&'a str, &'a str, i64),
    /// A counter per value of one label.
    Counters(&'a str, &'a str, &'a str, Vec<(String, u64)>),
}

/// Encode `readings` into a scrape.
pub fn encode_readings(
    mut enc: DescriptorEncoder<'_>,
    readings: &[Reading<'_>],
) -> Result<(), std::fmt::Error> {
    for r in readings {
        match r {
            Reading::Counter(name, help, v) => {
                let c = ConstCounter::new(*v);
                c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
            Reading::Gauge(name, help, v) => {
                let g = ConstGauge::new(*v);
                g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
            Reading::Counters(name, help, label, values) => {
                let ty = ConstCounter::new(0u64).metric_type();
                let mut m = enc.encode_descriptor(name, help, None, ty)?;
                for (value, n) in values {
                    let labels = [(*label, value.as_str())];
                    ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;
    impl Collector for Fixed {
        fn encode(&self, enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode_readings(
                enc,
                &[
                    Reading::Gauge("stratus_queue_waiting", "waiting", 3),
                    Reading::Counters(
                        "stratus_sync_repairs",
                        "repairs",
                        "repair",
                        vec![("vm.running".into(), 2)],
                    ),
                ],
            )
        }
    }

    #[test]
    fn metrics_encode_as_prometheus_text() {
        let m = Metrics::default();
        m.api_request("/v1/{res}", "POST", 202);
        m.api_request("/v1/{res}", "POST", 202);
        m.job_ended("vm.create", "ok", 0.5);
        m.agent_command("vm_start", "timeout");
        m.register_collector(Fixed);
        let text = m.encode();
        for line in [
            "stratus_api_requests_total{route=\"/v1/{res}\",method=\"POST\",status=\"202\"} 2",
            "stratus_job_seconds_count{operation=\"vm.create\",outcome=\"ok\"} 1",
            "stratus_agent_commands_total{command=\"vm_start\",outcome=\"timeout\"} 1",
            "stratus_queue_waiting 3",
            "stratus_sync_repairs_total{repair=\"vm.running\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
