//! The route side of a DestinationRule `consistentHash`: the cluster gets RING_HASH or
//! MAGLEV (`traffic_policy.rs`), the route that sends to it says what to hash, as istiod
//! does (the key is a property of the request, so Envoy computes it in the router).

use crate::config::model::HashKey;
use crate::config::parse_duration;
use crate::mesh::MeshState;
use envoy_types::pb::envoy::config::route::v3::route_action::{
    hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter},
    HashPolicy,
};

/// One destination of a route: host FQDN, subset, the destination's port if it names
/// one, and the port of the route configuration it is reached through.
pub struct Target<'a> {
    pub host: &'a str,
    pub subset: Option<&'a str>,
    pub port: Option<u32>,
    pub route_port: u32,
}

fn hash_policy(key: &HashKey<'_>) -> HashPolicy {
    let spec = match key {
        HashKey::Header(h) => PolicySpecifier::Header(Header {
            header_name: h.to_string(),
            ..Default::default()
        }),
        HashKey::Cookie(c) => PolicySpecifier::Cookie(Cookie {
            name: c.name.clone(),
            // With a ttl Envoy sets the cookie on the first response when the request
            // had none; without one it only hashes a cookie the client already sends.
            ttl: c
                .ttl
                .as_deref()
                .and_then(|t| parse_duration(t).ok())
                .map(super::duration),
            path: c.path.clone().unwrap_or_default(),
            ..Default::default()
        }),
        HashKey::SourceIp => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
        HashKey::QueryParameter(q) => PolicySpecifier::QueryParameter(QueryParameter {
            name: q.to_string(),
        }),
    };
    HashPolicy {
        policy_specifier: Some(spec),
        terminal: false,
    }
}

/// The hash policies of a route's destinations, in destination order, each once (a
/// weighted route to two subsets hashing on the same header needs it once).
pub fn for_targets<'a>(
    mesh: &MeshState,
    targets: impl IntoIterator<Item = Target<'a>>,
) -> Vec<HashPolicy> {
    let mut out: Vec<HashPolicy> = Vec::new();
    for t in targets {
        let Some(svc) = mesh.services.get(t.host) else {
            continue;
        };
        // The port `routes.rs` picks the cluster by: the explicit one, else the route's
        // port, else the service's only port.
        let port = t.port.unwrap_or(match svc.ports.as_slice() {
            [only] if svc.port(t.route_port).is_none() => only.number,
            _ => t.route_port,
        });
        let policy = mesh.cluster_policy(svc, t.subset, port);
        let ch = policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.consistent_hash.as_ref());
        let Some((_, key)) = ch.and_then(|ch| ch.keys().into_iter().next()) else {
            continue;
        };
        let hp = hash_policy(&key);
        if !out.contains(&hp) {
            out.push(hp);
        }
    }
    out
}
