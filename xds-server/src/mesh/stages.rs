//! The mesh is assembled in stages, one per kind, each from its own store of
//! [`Inputs`] and the outputs of the stages it depends on:
//!
//! ```text
//! settings (MeshConfig) ──┬─> workloads (WorkloadEntry, member clusters) ──> services (ServiceEntry)
//!                         │                                                    │ catalog (hosts, ports)
//!                         ├─> destination rules <──────────────────────────────┤
//!                         ├─> virtual services <── destination rules, catalog ─┘
//!                         ├─> peer authentication
//!                         ├─> (security: AuthorizationPolicy, RequestAuthentication)
//!                         └─> envoy filters (EnvoyFilter; the root namespace orders them)
//! inbound addresses <── workloads, services
//! ```
//!
//! A stage runs again only when one of its inputs is a different `Arc` than last time;
//! a stage whose result comes out equal keeps its old `Arc`, so the stages after it see
//! no change either. An endpoint edit therefore rebuilds workloads and services, but not
//! the routing stages, which read only the catalog of hosts and ports. Every stage
//! reports its own cross-object errors; the build fails if any stage has one. Warnings
//! (config in effect that routes nothing, such as a rule naming a missing delegate
//! VirtualService) are part of a stage's result instead, so a reused stage keeps them.

use super::inputs::{Inputs, KindStore};
use super::{
    destination_rules, envoy_filters, policies, services, settings, virtual_services, workloads,
    MeshState,
};
use crate::config::{ConfigError, ConfigWarning, Object, Source};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A cross-object error: a rule that needs more than one object to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("already defined in {previous}")]
    Duplicate { previous: String },
    #[error("only one MeshConfig is allowed; another is in {previous}")]
    SecondMeshConfig { previous: String },
    #[error("`{value}` is not an IP address")]
    NotAnIp { value: String },
    #[error(
        "`{cluster}` is the name of a member cluster whose relay reports workloads; \
         the mesh control plane's own cluster needs another name"
    )]
    OwnClusterIsMember { cluster: String },
    #[error("host `{host}` is already defined by the ServiceEntry in {previous}")]
    HostTaken { host: String, previous: String },
    #[error("`{host}` is not a service in the mesh")]
    UnknownService { host: String },
    #[error("another DestinationRule already applies to `{host}`")]
    SecondDestinationRule { host: String },
    #[error("`{host}` is already routed by VirtualService {by}")]
    HostRouted { host: String, by: String },
    #[error("service `{host}` has no port {port}")]
    NoSuchPort { host: String, port: u32 },
    #[error("subset `{subset}` of `{host}` is not defined by any DestinationRule")]
    UndefinedSubset { subset: String, host: String },
    #[error(
        "a policy with a selector in the root namespace `{root}` applies to no workload \
         (Istio ignores it); put it in the workload's namespace, or drop the selector for a \
         mesh-wide policy"
    )]
    RootNamespaceSelector { root: String },
    /// A check that needs the whole mesh found what the object's own check did not.
    #[error("{message}")]
    Invalid { message: String },
    #[error("{address}:{port} is already the inbound address of workload {other}")]
    InboundAddressTaken {
        address: std::net::IpAddr,
        port: u32,
        other: String,
    },
}

/// Config Istio accepts but that routes nothing (see [`ConfigWarning`]): reported, not
/// an error, because its owner may be another team's (a delegate's) and the missing
/// part may simply arrive with the next reload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageWarning {
    #[error(
        "delegate VirtualService {delegate} does not exist: this rule routes nothing until \
         it does (Istio drops it too)"
    )]
    MissingDelegate { delegate: String },
    #[error(
        "VirtualService {delegate} has hosts, so it is no delegate (only a VirtualService \
         without hosts is): this rule routes nothing (Istio drops it too)"
    )]
    NotADelegate { delegate: String },
    #[error(
        "delegate VirtualService {delegate} is not exported to namespace `{namespace}` (its \
         exportTo): this rule routes nothing (Istio drops it too)"
    )]
    DelegateNotExported { delegate: String, namespace: String },
    #[error(
        "not within the match of VirtualService {root} spec.http[{rule}], which delegates \
         to this one: the rule is dropped there (Istio drops it too)"
    )]
    OutsideRootMatch { root: String, rule: usize },
    #[error(
        "no VirtualService delegates to this one (without hosts it is a delegate): it \
         routes nothing"
    )]
    UnusedDelegate,
}

/// The warnings of one stage, each naming the object and field it is about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Warnings(pub Vec<ConfigWarning>);

impl Warnings {
    pub fn push<T>(
        &mut self,
        o: &Object<T>,
        kind: &str,
        field: impl Into<String>,
        w: StageWarning,
    ) {
        self.0.push(ConfigError::new(
            &o.source,
            Some(format!("{kind} {}", o.key())),
            Some(field.into()),
            w.to_string(),
        ));
    }
}

/// The errors of one build, each naming the object and field it is about.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<ConfigError>);

impl Errors {
    pub fn push<T>(&mut self, o: &Object<T>, kind: &str, field: impl Into<String>, e: StageError) {
        self.0.push(ConfigError::new(
            &o.source,
            Some(format!("{kind} {}", o.key())),
            Some(field.into()),
            e.to_string(),
        ));
    }
}

pub fn describe(s: &Source) -> String {
    format!("{} document {}", s.file, s.document)
}

/// Objects of a store without duplicates (a later one with the same key is an error).
pub fn unique<'a, T>(store: &'a KindStore<T>, kind: &str, errs: &mut Errors) -> Vec<&'a Object<T>> {
    let mut seen: BTreeMap<String, &Source> = BTreeMap::new();
    let mut out = Vec::with_capacity(store.len());
    for (_, o) in store.iter() {
        if let Some(prev) = seen.insert(o.key(), &o.source) {
            let previous = describe(prev);
            errs.push(o, kind, "metadata.name", StageError::Duplicate { previous });
            continue;
        }
        out.push(&**o);
    }
    out
}

type Dep = Arc<dyn Any + Send + Sync>;

/// A stage's last result and the inputs it was computed from.
#[derive(Debug)]
pub struct Memo<T> {
    deps: Vec<Dep>,
    pub value: Arc<T>,
}

impl<T> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Self {
            deps: self.deps.clone(),
            value: self.value.clone(),
        }
    }
}

/// Runs a stage unless its inputs are the very ones of `prev`. `build` sees the previous
/// result, to reuse unchanged parts of it.
fn stage<T: PartialEq + Send + Sync + 'static>(
    name: &'static str,
    prev: Option<&Memo<T>>,
    deps: Vec<Dep>,
    run: &mut Run,
    build: impl FnOnce(Option<&T>, &mut Errors) -> T,
) -> Memo<T> {
    if let Some(p) = prev {
        let same =
            p.deps.len() == deps.len() && p.deps.iter().zip(&deps).all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return p.clone();
        }
    }
    run.rebuilt.push(name);
    let value = build(prev.map(|p| &*p.value), &mut run.errors);
    let value = match prev {
        Some(p) if *p.value == value => p.value.clone(),
        _ => Arc::new(value),
    };
    Memo { deps, value }
}

fn dep<T: Send + Sync + 'static>(a: &Arc<T>) -> Dep {
    a.clone()
}

struct Run {
    errors: Errors,
    rebuilt: Vec<&'static str>,
}

/// Every stage's result of the last accepted build.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    settings: Option<Memo<settings::Settings>>,
    workloads: Option<Memo<workloads::Workloads>>,
    services: Option<Memo<services::Services>>,
    destination_rules: Option<Memo<destination_rules::DestinationRules>>,
    virtual_services: Option<Memo<virtual_services::Routing>>,
    peer_authentication: Option<Memo<crate::config::peer_authentication::PeerAuthentications>>,
    security: Option<Memo<crate::config::security::SecurityPolicies>>,
    inbound: Option<Memo<()>>,
    envoy_filters: Option<Memo<envoy_filters::EnvoyFilters>>,
    /// Stages that ran in the build that made these outputs (the rest were reused).
    pub rebuilt: Vec<&'static str>,
}

/// Builds the mesh of `inputs`, rerunning only the stages of `prev` whose inputs changed.
pub fn build(inputs: &Inputs, prev: &Outputs) -> Result<(MeshState, Outputs), Vec<ConfigError>> {
    let mut run = Run {
        errors: Errors::default(),
        rebuilt: Vec::new(),
    };
    let r = &mut run;
    let settings = stage(
        "settings",
        prev.settings.as_ref(),
        vec![dep(&inputs.mesh_config)],
        r,
        |_, e| settings::build(&inputs.mesh_config, e),
    );
    let s = &settings.value;
    let workloads = stage(
        "workloads",
        prev.workloads.as_ref(),
        vec![
            dep(&inputs.workload_entries),
            dep(&inputs.clusters),
            dep(&settings.value),
        ],
        r,
        |p, e| workloads::build(&inputs.workload_entries, &inputs.clusters, s, p, e),
    );
    let services = stage(
        "services",
        prev.services.as_ref(),
        vec![
            dep(&inputs.service_entries),
            dep(&workloads.value),
            dep(&settings.value),
        ],
        r,
        |p, e| services::build(&inputs.service_entries, &workloads.value, s, p, e),
    );
    let catalog = services.value.catalog.clone();
    let destination_rules = stage(
        "destination_rules",
        prev.destination_rules.as_ref(),
        vec![
            dep(&inputs.destination_rules),
            dep(&catalog),
            dep(&settings.value),
        ],
        r,
        |_, e| destination_rules::build(&inputs.destination_rules, &catalog, s, e),
    );
    let virtual_services = stage(
        "virtual_services",
        prev.virtual_services.as_ref(),
        vec![
            dep(&inputs.virtual_services),
            dep(&catalog),
            dep(&destination_rules.value),
            dep(&settings.value),
        ],
        r,
        |p, e| {
            virtual_services::build(
                &inputs.virtual_services,
                &catalog,
                &destination_rules.value,
                s,
                p,
                e,
            )
        },
    );
    let peer_authentication = stage(
        "peer_authentication",
        prev.peer_authentication.as_ref(),
        vec![dep(&inputs.peer_authentications), dep(&settings.value)],
        r,
        |_, e| policies::peer_authentication(&inputs.peer_authentications, s, e),
    );
    let security = stage(
        "security",
        prev.security.as_ref(),
        vec![
            dep(&inputs.authorization_policies),
            dep(&inputs.request_authentications),
        ],
        r,
        |_, e| {
            policies::security(
                &inputs.authorization_policies,
                &inputs.request_authentications,
                e,
            )
        },
    );
    let inbound = stage(
        "inbound",
        prev.inbound.as_ref(),
        vec![dep(&workloads.value), dep(&services.value)],
        r,
        |_, e| workloads::check_inbound(&workloads.value, &services.value, e),
    );
    let envoy_filters = stage(
        "envoy_filters",
        prev.envoy_filters.as_ref(),
        vec![dep(&inputs.envoy_filters), dep(&settings.value)],
        r,
        |_, e| envoy_filters::build(&inputs.envoy_filters, s, e),
    );
    if !run.errors.0.is_empty() {
        return Err(run.errors.0);
    }
    let w = &workloads.value;
    let sv = &services.value;
    let mesh = MeshState {
        trust_domain: s.trust_domain.clone(),
        cluster_name: s.cluster_name.clone(),
        network: s.network.clone(),
        members: w.members.clone(),
        cluster_domain: s.cluster_domain.clone(),
        connect_timeout: s.connect_timeout,
        dns_resolvers: s.dns_resolvers.clone(),
        jwks_ca_certificates: s.jwks_ca_certificates.clone(),
        root_namespace: s.root_namespace.clone(),
        peer_authentication: peer_authentication.value.clone(),
        security: security.value.clone(),
        services: sv.services.clone(),
        workloads: w.map.clone(),
        virtual_services: virtual_services.value.by_host.clone(),
        warnings: virtual_services.value.warnings.clone(),
        destination_rules: destination_rules.value.clone(),
        workload_services: sv.workload_services.clone(),
        envoy_filters: envoy_filters.value.clone(),
        credentials: inputs.credentials.clone(),
        counts: inputs.counts(),
    };
    let outputs = Outputs {
        settings: Some(settings),
        workloads: Some(workloads),
        services: Some(services),
        destination_rules: Some(destination_rules),
        virtual_services: Some(virtual_services),
        peer_authentication: Some(peer_authentication),
        security: Some(security),
        inbound: Some(inbound),
        envoy_filters: Some(envoy_filters),
        rebuilt: run.rebuilt,
    };
    Ok((mesh, outputs))
}
