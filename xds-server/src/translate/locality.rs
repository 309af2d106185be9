//! Istio's locality load balancing: what a DestinationRule's `localityLbSetting` makes of
//! a service's endpoints for one proxy, and which part of a proxy that depends on.
//!
//! The proxy's locality is its workload's (`WorkloadEntry.locality`, else its member
//! cluster's `region/zone`), with its cluster as the subzone unless the locality names
//! one, exactly as for endpoints: a sidecar and the endpoints of its own cluster share a
//! subzone. A proxy that is no known workload has its cluster's locality.
//!
//! - `failover`: priorities by how much of the proxy's locality an endpoint shares
//!   (subzone, zone, region), then the `to` region of the proxy's region's entry, then
//!   every other region; Istio's five ranks, without the ones nobody holds.
//! - `failoverPriority`: endpoints that match the proxy on more leading labels first; with
//!   `failover` as well, the locality ranks order the endpoints within each label rank
//!   (Istio's `label rank * 5 + locality rank`). An entry `key=value` compares endpoints
//!   with `value` instead of the proxy's own label.
//! - `distribute`: the first entry whose `from` matches the proxy's locality gives each
//!   locality matching a `to` pattern that share of the traffic (split between several
//!   matching localities by their endpoint weights); localities no pattern matches get
//!   nothing. Everything stays at priority 0, and the cluster is locality-weighted.
//!
//! Istio's topology labels (`topology.kubernetes.io/region` and `zone`,
//! `topology.istio.io/subzone`, `cluster` and `network`) are taken from the locality,
//! cluster and network of the workload or endpoint, the way istiod adds them to labels.

use crate::config::model::{LocalityDistribute, LocalityFailover, LocalityLbSetting};
use crate::mesh::{Endpoint as MeshEndpoint, MeshState, Workload};
use std::collections::{BTreeMap, BTreeSet};

pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// (region, zone, subzone); all empty: no locality.
pub(super) type LocalityKey<'a> = (&'a str, &'a str, &'a str);

/// The locality of a workload or endpoint: its `region/zone/subzone`, the subzone being
/// its cluster unless the locality names one.
pub(super) fn split<'a>(locality: Option<&'a str>, cluster: Option<&'a str>) -> LocalityKey<'a> {
    let mut parts = locality.unwrap_or_default().split('/');
    let region = parts.next().unwrap_or_default();
    let zone = parts.next().unwrap_or_default();
    let subzone = parts
        .next()
        .filter(|s| !s.is_empty())
        .or(cluster)
        .unwrap_or_default();
    (region, zone, subzone)
}

pub(super) fn endpoint_locality(e: &MeshEndpoint) -> LocalityKey<'_> {
    split(e.locality.as_deref(), e.cluster.as_deref())
}

/// A label as istiod sees it on a workload: the locality's parts and the cluster replace
/// what the workload's labels say, the network only fills in a missing label.
fn topology_label<'a>(
    key: &str,
    labels: &'a BTreeMap<String, String>,
    (region, zone, subzone): LocalityKey<'a>,
    cluster: Option<&'a str>,
    network: Option<&'a str>,
) -> Option<&'a str> {
    let own = labels.get(key).map(String::as_str);
    let derived = match key {
        REGION_LABEL => Some(region),
        ZONE_LABEL => Some(zone),
        SUBZONE_LABEL => Some(subzone),
        CLUSTER_LABEL => cluster,
        NETWORK_LABEL => return own.or(network.filter(|n| !n.is_empty())),
        _ => None,
    };
    derived.filter(|v| !v.is_empty()).or(own)
}

fn endpoint_label<'a>(e: &'a MeshEndpoint, key: &str) -> Option<&'a str> {
    topology_label(
        key,
        &e.labels,
        endpoint_locality(e),
        e.cluster.as_deref(),
        e.network.as_deref(),
    )
}

/// What EDS may need to know of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyLocality {
    pub cluster: String,
    pub network: String,
    /// `region/zone/subzone` as a workload's locality is split (see [`split`]).
    pub locality: [String; 3],
    /// The workload's own labels (none for a proxy that is no known workload).
    pub labels: BTreeMap<String, String>,
}

impl ProxyLocality {
    pub fn of_workload(w: &Workload) -> ProxyLocality {
        let (r, z, s) = split(w.locality.as_deref(), Some(&w.cluster));
        ProxyLocality {
            cluster: w.cluster.clone(),
            network: w.network.clone(),
            locality: [r.to_string(), z.to_string(), s.to_string()],
            labels: w.labels.clone(),
        }
    }

    /// A proxy of `cluster` that is no known workload: the cluster's locality and network.
    pub fn of_cluster(mesh: &MeshState, cluster: &str) -> ProxyLocality {
        let (network, locality) = match mesh.members.get(cluster) {
            Some(meta) => (meta.network_of(cluster), meta.locality()),
            None => (mesh.network.clone(), None),
        };
        let (r, z, s) = split(locality.as_deref(), Some(cluster));
        ProxyLocality {
            cluster: cluster.to_string(),
            network,
            locality: [r.to_string(), z.to_string(), s.to_string()],
            labels: BTreeMap::new(),
        }
    }

    fn key(&self) -> LocalityKey<'_> {
        let [r, z, s] = &self.locality;
        (r, z, s)
    }

    /// One of its labels, topology labels included.
    pub fn label(&self, key: &str) -> Option<&str> {
        topology_label(
            key,
            &self.labels,
            self.key(),
            Some(&self.cluster),
            Some(&self.network),
        )
    }
}

/// The part of a proxy that one service's endpoints (or a whole EDS set) depend on: two
/// proxies of one class get the same assignments, so they share them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EdsClass {
    /// The proxy's cluster, where endpoints are ranked by cluster and it holds some.
    pub cluster: Option<String>,
    /// Where `failover` or `distribute` look at the proxy's locality.
    pub locality: Option<[String; 3]>,
    /// The proxy's value of each label a `failoverPriority` compares.
    pub labels: Vec<(String, Option<String>)>,
}

/// Which parts of a proxy assignments depend on (see [`EdsClass`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdsNeeds {
    /// The clusters whose proxies rank by cluster differently from the rest: those where
    /// the endpoints run, when they run in two or more.
    pub clusters: BTreeSet<String>,
    pub locality: bool,
    pub labels: BTreeSet<String>,
}

impl EdsNeeds {
    pub fn merge(&mut self, other: &EdsNeeds) {
        self.clusters.extend(other.clusters.iter().cloned());
        self.locality |= other.locality;
        self.labels.extend(other.labels.iter().cloned());
    }

    pub fn class(&self, p: &ProxyLocality) -> EdsClass {
        EdsClass {
            cluster: self
                .clusters
                .contains(&p.cluster)
                .then(|| p.cluster.clone()),
            locality: self.locality.then(|| p.locality.clone()),
            labels: self
                .labels
                .iter()
                .map(|k| (k.clone(), p.label(k).map(str::to_string)))
                .collect(),
        }
    }

    /// What a cluster ranked as `mode` adds.
    pub(super) fn add(&mut self, mode: Mode<'_>) {
        let Mode::Istio(l) = mode else { return };
        self.locality |= !l.failover.is_empty() || !l.distribute.is_empty();
        if l.distribute.is_empty() {
            let compared = l.failover_priority.iter().map(|e| priority_entry(e));
            self.labels.extend(
                compared
                    .filter(|(_, fixed)| fixed.is_none())
                    .map(|(k, _)| k.to_string()),
            );
        }
    }
}

/// How one outbound cluster ranks its endpoints.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode<'a> {
    /// `enabled: false`: every endpoint at priority 0.
    Flat,
    /// No setting, or `enabled` only: the proxy's cluster first, then the others.
    ByCluster,
    /// `failover`, `failoverPriority` or `distribute`, as Istio.
    Istio(&'a LocalityLbSetting),
}

impl<'a> Mode<'a> {
    pub fn of(setting: Option<&'a LocalityLbSetting>) -> Mode<'a> {
        match setting {
            Some(l) if l.enabled == Some(false) => Mode::Flat,
            Some(l)
                if !l.failover.is_empty()
                    || !l.failover_priority.is_empty()
                    || !l.distribute.is_empty() =>
            {
                Mode::Istio(l)
            }
            _ => Mode::ByCluster,
        }
    }

    /// The cluster must be locality-weighted (every proxy gets locality weights).
    pub fn weighted(self) -> bool {
        matches!(self, Mode::Istio(l) if !l.distribute.is_empty())
    }
}

/// A `failoverPriority` entry: the label, and the value it fixes (`key=value`).
pub(super) fn priority_entry(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (entry, None),
    }
}

/// Ranks endpoints for one proxy: a lower rank is a better priority. Ranks are compared
/// as pairs (label rank, locality rank) and numbered densely afterwards.
pub(super) struct Ranker<'a> {
    mode: Mode<'a>,
    proxy: Option<&'a ProxyLocality>,
    priority: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Ranker<'a> {
    pub fn new(mode: Mode<'a>, proxy: Option<&'a ProxyLocality>) -> Ranker<'a> {
        let priority = match mode {
            Mode::Istio(l) if l.distribute.is_empty() => l
                .failover_priority
                .iter()
                .map(|e| priority_entry(e))
                .collect(),
            _ => Vec::new(),
        };
        Ranker {
            mode,
            proxy,
            priority,
        }
    }

    pub fn rank(&self, e: &MeshEndpoint) -> (u32, u32) {
        let proxy = self.proxy;
        match self.mode {
            Mode::Flat => (0, 0),
            Mode::ByCluster => match (proxy.map(|p| p.cluster.as_str()), e.cluster.as_deref()) {
                // An inline endpoint is in no cluster: local to every proxy.
                (Some(pc), Some(c)) => (0, u32::from(pc != c)),
                _ => (0, 0),
            },
            Mode::Istio(l) if !l.distribute.is_empty() => (0, 0),
            Mode::Istio(l) => {
                let nobody = ProxyLocality::default();
                let p = proxy.unwrap_or(&nobody);
                let labels = self.label_rank(p, e);
                let by_locality = l.failover_priority.is_empty() || !l.failover.is_empty();
                let locality = if by_locality {
                    locality_rank(p.key(), endpoint_locality(e), &l.failover)
                } else {
                    0
                };
                (labels, locality)
            }
        }
    }

    /// How many of the leading `failoverPriority` labels differ, counted from the end:
    /// 0 when all match, the number of labels when the first does not.
    fn label_rank(&self, p: &ProxyLocality, e: &MeshEndpoint) -> u32 {
        let n = self.priority.len();
        for (j, (key, fixed)) in self.priority.iter().enumerate() {
            let want = fixed.or_else(|| p.label(key)).unwrap_or_default();
            if endpoint_label(e, key).unwrap_or_default() != want {
                return u32::try_from(n - j).unwrap_or(u32::MAX);
            }
        }
        0
    }

    /// The weight of each locality (in order), `None` for one that gets no traffic; no
    /// weights at all unless the cluster is locality-weighted. `groups` holds each
    /// locality with the sum of its endpoint weights.
    pub fn weights(&self, groups: &[(LocalityKey<'_>, u32)]) -> Option<Vec<Option<u32>>> {
        let Mode::Istio(l) = self.mode else {
            return None;
        };
        if l.distribute.is_empty() {
            return None;
        }
        let nobody = ProxyLocality::default();
        let p = self.proxy.unwrap_or(&nobody);
        Some(distribute(&l.distribute, p.key(), groups))
    }
}

/// Istio's locality ranks: 0 same subzone, 1 same zone, 2 same region, 3 another region
/// (the `to` of the proxy region's `failover` entry, when it has one), 4 any other.
fn locality_rank(
    proxy: LocalityKey<'_>,
    ep: LocalityKey<'_>,
    failover: &[LocalityFailover],
) -> u32 {
    let ((pr, pz, ps), (er, ez, es)) = (proxy, ep);
    if pr == er {
        return match (pz == ez, ps == es) {
            (true, true) => 0,
            (true, false) => 1,
            _ => 2,
        };
    }
    match failover.iter().find(|f| f.from == pr) {
        Some(f) if f.to != er => 4,
        _ => 3,
    }
}

/// Whether a `distribute` pattern (`region[/zone[/subzone]]`, a part `*` for any)
/// matches a locality; parts it leaves out match anything.
fn pattern_matches(pattern: &str, (region, zone, subzone): LocalityKey<'_>) -> bool {
    let mut parts = pattern.split('/');
    let part = |p: Option<&str>, v: &str, required: bool| match p {
        Some("*") => true,
        Some(p) => p == v,
        None => !required,
    };
    part(parts.next(), region, true)
        && part(parts.next(), zone, false)
        && part(parts.next(), subzone, false)
}

fn distribute(
    rules: &[LocalityDistribute],
    proxy: LocalityKey<'_>,
    groups: &[(LocalityKey<'_>, u32)],
) -> Vec<Option<u32>> {
    let Some(rule) = rules.iter().find(|d| pattern_matches(&d.from, proxy)) else {
        return groups.iter().map(|(_, w)| Some(*w)).collect();
    };
    let mut out = vec![None; groups.len()];
    let mut taken = vec![false; groups.len()];
    // Patterns of one entry never overlap (validation), so their order does not matter.
    for (pattern, share) in &rule.to {
        let matching: Vec<usize> = (0..groups.len())
            .filter(|&i| !taken[i] && pattern_matches(pattern, groups[i].0))
            .collect();
        let total: u64 = matching.iter().map(|&i| u64::from(groups[i].1)).sum();
        for &i in &matching {
            taken[i] = true;
            let w = u64::from(groups[i].1) * u64::from(*share);
            // Rounded up, as istiod does, so a matching locality never gets weight 0.
            let w = w.div_ceil(total.max(1));
            out[i] = u32::try_from(w).ok().filter(|w| *w > 0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let loc = ("us-west", "zone1", "a");
        assert!(pattern_matches("*", loc));
        assert!(pattern_matches("us-west", loc));
        assert!(pattern_matches("us-west/*", loc));
        assert!(pattern_matches("us-west/zone1/*", loc));
        assert!(pattern_matches("us-west/zone1/a", loc));
        assert!(!pattern_matches("us-west/zone2", loc));
        assert!(!pattern_matches("us-east/*", loc));
    }

    #[test]
    fn istio_locality_ranks() {
        let failover = [LocalityFailover {
            from: "r1".into(),
            to: "r2".into(),
        }];
        let p = ("r1", "z1", "s1");
        assert_eq!(locality_rank(p, ("r1", "z1", "s1"), &failover), 0);
        assert_eq!(locality_rank(p, ("r1", "z1", "s2"), &failover), 1);
        assert_eq!(locality_rank(p, ("r1", "z2", "s1"), &failover), 2);
        assert_eq!(locality_rank(p, ("r2", "z1", "s1"), &failover), 3);
        assert_eq!(locality_rank(p, ("r3", "z1", "s1"), &failover), 4);
        // No entry for the proxy's region: every other region alike.
        assert_eq!(locality_rank(("r9", "", ""), ("r3", "", ""), &failover), 3);
    }

    #[test]
    fn distribute_splits_a_share_by_endpoint_weight() {
        let rules = [LocalityDistribute {
            from: "r1/*".into(),
            to: [("r1/z1/*".to_string(), 80), ("r2".to_string(), 20)].into(),
        }];
        let groups = [
            (("r1", "z1", "a"), 3),
            (("r1", "z1", "b"), 1),
            (("r2", "z9", "c"), 2),
            (("r3", "z1", "d"), 5),
        ];
        assert_eq!(
            distribute(&rules, ("r1", "z1", "a"), &groups),
            [Some(60), Some(20), Some(20), None]
        );
        // A proxy no `from` matches: the natural weights.
        assert_eq!(
            distribute(&rules, ("r2", "z1", "a"), &groups),
            [Some(3), Some(1), Some(2), Some(5)]
        );
    }
}
