//! Prometheus metrics: the agent's own (sync duration, network programming
//! latency, map entries, source events, errors) and the datapath's counters,
//! read from the per-CPU maps at each scrape.

use std::{path::PathBuf, sync::Mutex};

use lb_common::counters::VERDICTS;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::state::cstr;
use crate::datapath::maps::ServiceMaps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

pub struct Metrics {
    pub registry: Registry,
    /// Seconds one reconcile (diff and writes) took.
    pub sync_duration: Histogram,
    /// Seconds from a change seen in the source to its map writes done.
    pub programming_latency: Histogram,
    pub map_entries: Family<MapLabel, Gauge>,
    /// Each Service map's size (`--lb-map-max`): entries over capacity is
    /// its fill level.
    pub map_capacity: Family<MapLabel, Gauge>,
    /// Changes seen in the source, by kind (files; Service, EndpointSlice,
    /// Endpoints, Node watch events).
    pub source_events: Family<KindLabel, Counter>,
    /// Complete lists by kind: the first, then each re-list (after a 410
    /// Gone from compacted history, or a watch that could not resume).
    pub source_lists: Family<KindLabel, Counter>,
    /// Errors by kind: object (a bad object skipped), file (unreadable or
    /// unparsable manifest), source (the folder unreadable), watch (a list
    /// or watch call failed; retried with backoff), sync (a map write
    /// failed; retried).
    pub errors: Family<KindLabel, Counter>,
    /// Connected UDP sockets of pods and host processes destroyed because
    /// their backend left the Service.
    pub udp_sockets_destroyed: Counter,
}

impl Metrics {
    pub fn new(pins: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("lb");
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let map_entries = Family::<MapLabel, Gauge>::default();
        let map_capacity = Family::<MapLabel, Gauge>::default();
        let source_events = Family::<KindLabel, Counter>::default();
        let source_lists = Family::<KindLabel, Counter>::default();
        let errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "sync_duration_seconds",
            "Time of one reconcile of the maps",
            sync_duration.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "Time from a change seen in the source to its map writes",
            programming_latency.clone(),
        );
        registry.register(
            "map_entries",
            "Entries the agent keeps in each map",
            map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Entries each map can hold (its fill level: map_entries / map_capacity)",
            map_capacity.clone(),
        );
        registry.register(
            "source_events",
            "Changes seen in the agent's source",
            source_events.clone(),
        );
        registry.register(
            "source_lists",
            "Complete lists of a kind from the API (the first and every re-list)",
            source_lists.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        let udp_sockets_destroyed = Counter::default();
        registry.register(
            "udp_sockets_destroyed",
            "Connected UDP sockets destroyed because their backend left the Service",
            udp_sockets_destroyed.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector {
            pins,
            maps: Mutex::new(None),
        }));
        Self {
            registry,
            sync_duration,
            programming_latency,
            map_entries,
            map_capacity,
            source_events,
            source_lists,
            errors,
            udp_sockets_destroyed,
        }
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn listed(&self, kind: &str) {
        self.source_lists
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn event(&self, kind: &str) {
        self.source_events
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Entries per map, from the reconciler's mirror of them.
    /// Each Service map's size.
    pub fn map_capacity(&self, capacity: &super::reconcile::Capacity) {
        for (map, n) in lb_common::maps::lb_map_sizes(capacity.lb_map_max, capacity.maglev_chunks) {
            self.map_capacity
                .get_or_create(&MapLabel { map: map.into() })
                .set(n as i64);
        }
    }

    /// Entries per map, by name (`Reconciler::written_lens`).
    pub fn map_entries(&self, lens: &[(&'static str, usize)]) {
        for &(map, n) in lens {
            self.map_entries
                .get_or_create(&MapLabel { map: map.into() })
                .set(n as i64);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the datapath's counters from the pinned maps at each scrape.
#[derive(Debug)]
struct DatapathCollector {
    pins: PathBuf,
    maps: Mutex<Option<ServiceMaps>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    name: String,
    port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut guard = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = ServiceMaps::open(&self.pins).ok();
        }
        let Some(maps) = guard.as_ref() else {
            return Ok(());
        };
        let verdicts = maps.verdicts();
        let v: Vec<(VerdictLabel, u64)> = VERDICTS
            .iter()
            .map(|(n, label)| {
                (
                    VerdictLabel {
                        verdict: (*label).into(),
                    },
                    verdicts.get(*n as usize).copied().unwrap_or(0),
                )
            })
            .collect();
        counter_family(
            &mut encoder,
            "datapath_verdicts",
            "Packets and sockets by datapath verdict",
            &v,
        )?;
        let mut flows = Vec::new();
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        let mut no_backend = Vec::new();
        for (id, meta) in maps.service_meta.iter().filter_map(Result::ok) {
            let l = ServiceLabels {
                namespace: cstr(&meta.namespace).into(),
                name: cstr(&meta.name).into(),
                port: cstr(&meta.port_name).into(),
            };
            let s = maps.service_stats(id);
            flows.push((l.clone(), s.flows));
            packets.push((l.clone(), s.packets));
            bytes.push((l.clone(), s.bytes));
            no_backend.push((l, s.no_backend));
        }
        counter_family(
            &mut encoder,
            "service_flows",
            "Flows given a backend, per Service port",
            &flows,
        )?;
        counter_family(
            &mut encoder,
            "service_packets",
            "Packets translated per packet, per Service port",
            &packets,
        )?;
        counter_family(
            &mut encoder,
            "service_bytes",
            "Bytes translated per packet, per Service port",
            &bytes,
        )?;
        counter_family(
            &mut encoder,
            "service_no_backend",
            "New flows refused for want of a backend",
            &no_backend,
        )
    }
}
