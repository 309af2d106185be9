//! LISTENER, FILTER_CHAIN, NETWORK_FILTER and HTTP_FILTER patches (istiod's
//! listener_patch.go), and the inbound listeners' inline route configurations.

use super::route::patch_route_config;
use super::*;
use crate::config::envoy_filter::{ApplyTo, CompiledPatch, Operation, HCM};
use crate::mesh::envoy_filters::PatchSet;

/// What a listener match looks at, kept apart so the listener's chains can be taken
/// out and patched while it is matched.
struct ListenerInfo {
    name: String,
    port: u32,
    context: PatchContext,
}

fn info(l: &DynamicMessage) -> ListenerInfo {
    let port = msg_field(l, "address")
        .and_then(|a| msg_field(&a, "socket_address"))
        .and_then(|s| s.get_field_by_name("port_value").and_then(|v| v.as_u32()))
        .unwrap_or(0);
    ListenerInfo {
        name: str_field(l, "name"),
        port,
        context: listener_context(l),
    }
}

/// A proxy's listeners with the patches of `set` applied.
pub fn patch_listeners(listeners: Vec<Arc<Resource>>, set: &PatchSet) -> Vec<Arc<Resource>> {
    let listener_patches = [
        ApplyTo::Listener,
        ApplyTo::FilterChain,
        ApplyTo::NetworkFilter,
        ApplyTo::HttpFilter,
    ]
    .into_iter()
    .any(|a| set.has(a));
    let route_patches = [
        ApplyTo::RouteConfiguration,
        ApplyTo::VirtualHost,
        ApplyTo::HttpRoute,
    ]
    .into_iter()
    .any(|a| set.has(a));
    if !listener_patches && !route_patches {
        return listeners;
    }
    let mut out = Vec::with_capacity(listeners.len());
    for r in &listeners {
        let Some(mut l) = decode(r) else {
            out.push(r.clone());
            continue;
        };
        let info = info(&l);
        // istiod patches an inbound connection manager's route configuration while
        // building it, before any listener patch sees the listener.
        if route_patches && info.context == PatchContext::SidecarInbound {
            patch_inline_routes(&mut l, set);
        }
        if patch_listener(&info, set, &mut l) {
            out.push(encode(TypeKind::Listener, Some(r), &l));
        }
    }
    // Listener ADDs without a context go to sidecars' outbound side only, as in istiod.
    for p in set.patches(ApplyTo::Listener) {
        if p.operation == Operation::Add && p.context.applies_to(PatchContext::SidecarOutbound) {
            if let Some(v) = &p.value {
                out.push(encode(TypeKind::Listener, None, v));
            }
        }
    }
    out
}

fn patch_inline_routes(l: &mut DynamicMessage, set: &PatchSet) {
    let mut chains = take_list(l, "filter_chains");
    for fc in &mut chains {
        let mut filters = take_list(fc, "filters");
        for f in &mut filters {
            if str_field(f, "name") != HCM {
                continue;
            }
            with_hcm(f, |hcm| {
                if let Some(mut rc) = msg_field(hcm, "route_config") {
                    patch_route_config(PatchContext::SidecarInbound, set, &mut rc);
                    hcm.set_field_by_name("route_config", Value::Message(rc));
                }
            });
        }
        set_list(fc, "filters", filters);
    }
    set_list(l, "filter_chains", chains);
}

/// Runs `f` on the connection manager inside `filter`'s typed config, and packs it back.
fn with_hcm(filter: &mut DynamicMessage, f: impl FnOnce(&mut DynamicMessage)) {
    let Some(mut tc) = msg_field(filter, "typed_config") else {
        return;
    };
    let url = str_field(&tc, "type_url");
    let Some(mut hcm) = unpack(&tc, &url) else {
        return;
    };
    f(&mut hcm);
    pack(&mut tc, &hcm);
    filter.set_field_by_name("typed_config", Value::Message(tc));
}

fn listener_match(l: &ListenerInfo, p: &CompiledPatch) -> bool {
    let Some(m) = &p.listener else {
        return true;
    };
    (m.name.is_empty() || m.name == l.name) && (m.port_number == 0 || m.port_number == l.port)
}

fn applies(l: &ListenerInfo, p: &CompiledPatch) -> bool {
    p.context.applies_to(l.context) && listener_match(l, p)
}

/// `false`: the listener is removed.
fn patch_listener(l: &ListenerInfo, set: &PatchSet, lis: &mut DynamicMessage) -> bool {
    for p in set.patches(ApplyTo::Listener) {
        if !applies(l, p) {
            continue;
        }
        match (p.operation, &p.value) {
            (Operation::Remove, _) => return false,
            (Operation::Merge, Some(v)) => merge(lis, v),
            _ => {}
        }
    }
    let mut chains = take_list(lis, "filter_chains");
    chains.retain_mut(|fc| !has(fc, "filters") || patch_filter_chain(l, set, fc));
    if let Some(mut fc) = msg_field(lis, "default_filter_chain") {
        if has(&fc, "filters") {
            if patch_filter_chain(l, set, &mut fc) {
                lis.set_field_by_name("default_filter_chain", Value::Message(fc));
            } else {
                lis.clear_field_by_name("default_filter_chain");
            }
        }
    }
    for p in set.patches(ApplyTo::FilterChain) {
        if p.operation == Operation::Add && applies(l, p) {
            if let Some(v) = &p.value {
                chains.push(v.clone());
            }
        }
    }
    set_list(lis, "filter_chains", chains);
    true
}

fn filter_chain_match(fc: &DynamicMessage, p: &CompiledPatch) -> bool {
    let Some(m) = p.listener.as_ref().and_then(|l| l.filter_chain.as_ref()) else {
        return true;
    };
    if !m.name.is_empty() && m.name != str_field(fc, "name") {
        return false;
    }
    let fcm = msg_field(fc, "filter_chain_match");
    let strings = |name: &str| -> Vec<String> {
        fcm.as_ref()
            .and_then(|f| f.get_field_by_name(name).map(|v| v.into_owned()))
            .and_then(|v| match v {
                Value::List(items) => Some(
                    items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_string))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    };
    if !m.sni.is_empty() && !strings("server_names").contains(&m.sni) {
        return false;
    }
    if !m.transport_protocol.is_empty()
        && fcm.as_ref().map(|f| str_field(f, "transport_protocol"))
            != Some(m.transport_protocol.clone())
    {
        return false;
    }
    if !m.application_protocols.is_empty() {
        let have = strings("application_protocols");
        if fcm.is_none()
            || !m
                .application_protocols
                .split(',')
                .all(|p| have.iter().any(|h| h == p))
        {
            return false;
        }
    }
    if m.destination_port > 0 {
        let port = fcm
            .as_ref()
            .and_then(|f| msg_field(f, "destination_port"))
            .and_then(|d| d.get_field_by_name("value").and_then(|v| v.as_u32()));
        if port != Some(m.destination_port) {
            return false;
        }
    }
    true
}

/// `false`: the chain is removed.
fn patch_filter_chain(l: &ListenerInfo, set: &PatchSet, fc: &mut DynamicMessage) -> bool {
    for p in set.patches(ApplyTo::FilterChain) {
        if !applies(l, p) || !filter_chain_match(fc, p) {
            continue;
        }
        match (p.operation, &p.value) {
            (Operation::Remove, _) => return false,
            (Operation::Merge, Some(v)) if !merge_transport_socket(fc, v) => merge(fc, v),
            _ => {}
        }
    }
    patch_network_filters(l, set, fc);
    true
}

fn filter_name_match(p: &CompiledPatch) -> Option<&str> {
    p.listener
        .as_ref()?
        .filter_chain
        .as_ref()?
        .filter
        .as_ref()
        .map(|f| f.name.as_str())
}

fn sub_filter_name_match(p: &CompiledPatch) -> Option<&str> {
    p.listener
        .as_ref()?
        .filter_chain
        .as_ref()?
        .filter
        .as_ref()?
        .sub_filter
        .as_ref()
        .map(|s| s.name.as_str())
}

fn is(name: &str) -> impl Fn(&DynamicMessage) -> bool + '_ {
    move |f| str_field(f, "name") == name
}

/// ADD, INSERT_*, REPLACE and REMOVE of one list of filters, where `named` is the name a
/// patch matches filters by (`None`: the patch has no such match).
fn list_ops(items: &mut Vec<DynamicMessage>, p: &CompiledPatch, named: Option<&str>) {
    let Some(v) = &p.value else {
        if p.operation == Operation::Remove {
            if let Some(n) = named {
                items.retain(|f| !is(n)(f));
            }
        }
        return;
    };
    match (p.operation, named) {
        (Operation::Add, _) | (Operation::InsertAfter, None) => items.push(v.clone()),
        (Operation::InsertFirst, _) | (Operation::InsertBefore, None) => items.insert(0, v.clone()),
        (Operation::InsertAfter, Some(n)) => {
            insert_at(items, v, true, is(n));
        }
        (Operation::InsertBefore, Some(n)) => {
            insert_at(items, v, false, is(n));
        }
        (Operation::Replace, Some(n)) => replace_first(items, v, is(n)),
        (Operation::Remove, Some(n)) => items.retain(|f| !is(n)(f)),
        _ => {}
    }
}

fn patch_network_filters(l: &ListenerInfo, set: &PatchSet, fc: &mut DynamicMessage) {
    let mut filters = take_list(fc, "filters");
    for p in set.patches(ApplyTo::NetworkFilter) {
        if applies(l, p) && filter_chain_match(fc, p) && p.operation != Operation::Merge {
            list_ops(&mut filters, p, filter_name_match(p));
        }
    }
    for f in &mut filters {
        for p in set.patches(ApplyTo::NetworkFilter) {
            let named = filter_name_match(p).is_none_or(|n| n == str_field(f, "name"));
            if p.operation == Operation::Merge
                && applies(l, p)
                && filter_chain_match(fc, p)
                && named
            {
                if let Some(v) = &p.value {
                    merge_filter(f, v);
                }
            }
        }
        if str_field(f, "name") == HCM && set.has(ApplyTo::HttpFilter) {
            let filter_name = str_field(f, "name");
            with_hcm(f, |hcm| patch_http_filters(l, set, fc, &filter_name, hcm));
        }
    }
    set_list(fc, "filters", filters);
}

fn patch_http_filters(
    l: &ListenerInfo,
    set: &PatchSet,
    fc: &DynamicMessage,
    filter_name: &str,
    hcm: &mut DynamicMessage,
) {
    let selects = |p: &CompiledPatch| {
        applies(l, p)
            && filter_chain_match(fc, p)
            && filter_name_match(p).is_none_or(|n| n == filter_name)
    };
    let mut filters = take_list(hcm, "http_filters");
    for p in set.patches(ApplyTo::HttpFilter) {
        if selects(p) && p.operation != Operation::Merge {
            list_ops(&mut filters, p, sub_filter_name_match(p));
        }
    }
    for f in &mut filters {
        for p in set.patches(ApplyTo::HttpFilter) {
            let named = sub_filter_name_match(p).is_none_or(|n| n == str_field(f, "name"));
            if p.operation == Operation::Merge && selects(p) && named {
                if let Some(v) = &p.value {
                    merge_filter(f, v);
                }
            }
        }
    }
    set_list(hcm, "http_filters", filters);
}
