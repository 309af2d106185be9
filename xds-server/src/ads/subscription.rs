//! What one stream subscribed to for one type, the same for SotW and Delta: the names it
//! asked for and whether it wants everything (wildcard), with the xDS rules for legacy
//! wildcard and `*` (xds_protocol.rst, "How the client specifies what resources to
//! return").
//!
//! The names are interned, so streams with the same subscription share one set and one
//! key, and with it one cached response body per snapshot.

use super::interner::{Interner, Names};
use crate::cache::{subscription_key, SubscriptionKey, TypeKind};
use std::collections::BTreeSet;

/// The reserved name that subscribes to everything of a type.
pub(crate) const WILDCARD: &str = "*";

static NO_NAMES: BTreeSet<String> = BTreeSet::new();

#[derive(Debug, Clone)]
pub(crate) struct Subscription {
    /// Everything of the type, whether asked for with `*` or by legacy wildcard.
    wildcard: bool,
    /// No name has been sent yet on a type that is wildcard by default: an empty request
    /// still means everything. The first name (`*` included) ends it for the stream.
    legacy: bool,
    /// Names subscribed explicitly, `*` excluded. May be non-empty while wildcard: they
    /// stay subscribed when `*` goes.
    names: Option<Names>,
    /// Key of `names` (of the empty set while `names` is `None`) for the shared caches.
    names_key: SubscriptionKey,
}

/// What a Delta request changed that the next response must answer beyond the diff.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DeltaChange {
    /// Names subscribed that were not before, in request order: a missing one is named
    /// removed, so the proxy does not wait for its initial fetch timeout.
    pub added: Vec<String>,
    /// Names unsubscribed while the stream stays wildcard: the proxy cannot know whether
    /// `*` still covers them, so the server must say (resend the resource if it exists,
    /// name it removed if not).
    pub force: Vec<String>,
}

impl Subscription {
    /// The state before the type's first request.
    pub fn new(kind: TypeKind) -> Subscription {
        Subscription {
            wildcard: false,
            legacy: kind.wildcard_by_default(),
            names: None,
            names_key: subscription_key(std::iter::empty()),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Wildcard only because no name was ever sent.
    #[cfg(test)]
    pub fn is_legacy_wildcard(&self) -> bool {
        self.wildcard && self.legacy
    }

    /// The names subscribed explicitly (`*` excluded), wildcard or not.
    pub fn names(&self) -> &BTreeSet<String> {
        self.names.as_deref().unwrap_or(&NO_NAMES)
    }

    /// What a response holds: `None` for everything, else the named resources.
    pub fn wanted(&self) -> Option<&BTreeSet<String>> {
        (!self.wildcard).then(|| self.names())
    }

    /// The shared caches' key for [`Self::wanted`]: `None` is wildcard. Explicit names
    /// next to `*` change nothing, everything already holds them.
    pub fn key(&self) -> SubscriptionKey {
        if self.wildcard {
            None
        } else {
            self.names_key
        }
    }

    /// SotW: `requested` is the whole subscription. True when it differs from the
    /// previous one, so the response must be sent again even if the content is not new.
    pub fn set_names(&mut self, requested: &[String], interner: &Interner) -> bool {
        if self.legacy {
            if requested.is_empty() {
                return !std::mem::replace(&mut self.wildcard, true);
            }
            self.legacy = false;
        }
        let wildcard = requested.iter().any(|n| n == WILDCARD);
        let same_names = self.same_names(requested);
        if wildcard == self.wildcard && same_names && self.names.is_some() {
            return false;
        }
        self.wildcard = wildcard;
        if !same_names || self.names.is_none() {
            // Envoy repeats its whole subscription in every ACK: interning (a lock and a
            // hash) happens only when it changed.
            let explicit: Vec<String> = requested
                .iter()
                .filter(|n| *n != WILDCARD)
                .cloned()
                .collect();
            self.set(interner.intern(&explicit));
        }
        true
    }

    /// Delta: applies one request's subscribes, then its unsubscribes (a name in both
    /// ends unsubscribed, as `*` does).
    pub fn update(
        &mut self,
        subscribe: &[String],
        unsubscribe: &[String],
        interner: &Interner,
    ) -> DeltaChange {
        if self.legacy {
            if subscribe.is_empty() && unsubscribe.is_empty() {
                self.wildcard = true;
                return DeltaChange::default();
            }
            // Legacy wildcard stays on if it was on (the spec's example: subscribing to
            // "A" adds to the existing "*"), but an empty request no longer turns it on.
            self.legacy = false;
        }
        // Most requests are bare ACKs: no copy of the names for them.
        if subscribe.is_empty() && unsubscribe.is_empty() {
            return DeltaChange::default();
        }
        let mut names = self.names().clone();
        let mut added = Vec::new();
        for n in subscribe {
            if n == WILDCARD {
                self.wildcard = true;
            } else if names.insert(n.clone()) {
                added.push(n.clone());
            }
        }
        let mut unsubscribed = Vec::new();
        for n in unsubscribe {
            if n == WILDCARD {
                self.wildcard = false;
            } else {
                names.remove(n);
                unsubscribed.push(n);
            }
        }
        added.retain(|n| names.contains(n));
        // Every name unsubscribed under `*` is answered, not only ones subscribed on this
        // stream: the answer is the truth about the resource, so it cannot mislead, and a
        // client whose idea of its subscription differs from the server's gets it settled.
        let mut force = Vec::new();
        if self.wildcard {
            let mut seen = BTreeSet::new();
            for n in unsubscribed {
                if !names.contains(n) && seen.insert(n) {
                    force.push(n.clone());
                }
            }
        }
        if self.names.is_none() || names != *self.names() {
            self.set(interner.intern_set(names));
        }
        DeltaChange { added, force }
    }

    fn set(&mut self, (names, key): (Names, SubscriptionKey)) {
        self.names = Some(names);
        self.names_key = key;
    }

    fn same_names(&self, requested: &[String]) -> bool {
        let cur = self.names();
        let explicit = requested.iter().filter(|n| *n != WILDCARD);
        // Sorted requests (the usual case) compare in one pass.
        if cur.iter().eq(explicit.clone()) {
            return true;
        }
        let set: BTreeSet<&String> = explicit.collect();
        set.len() == cur.len() && set.into_iter().eq(cur.iter())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn names(s: &Subscription) -> Vec<&str> {
        s.names().iter().map(String::as_str).collect()
    }

    fn sotw(kind: TypeKind, requests: &[&[&str]]) -> (Subscription, Vec<bool>) {
        let i = Interner::default();
        let mut s = Subscription::new(kind);
        let changed = requests.iter().map(|r| s.set_names(&v(r), &i)).collect();
        (s, changed)
    }

    #[test]
    fn sotw_legacy_wildcard_is_kept_while_requests_send_no_names() {
        let (s, changed) = sotw(TypeKind::Cluster, &[&[], &[], &[]]);
        assert!(s.is_wildcard() && s.is_legacy_wildcard());
        assert_eq!(s.key(), None);
        assert_eq!(s.wanted(), None);
        assert_eq!(changed, [true, false, false]);
    }

    #[test]
    fn sotw_names_end_legacy_wildcard_and_empty_then_means_nothing() {
        let (s, changed) = sotw(TypeKind::Cluster, &[&[], &["a"], &[]]);
        assert!(!s.is_wildcard());
        assert_eq!(s.wanted(), Some(&BTreeSet::new()));
        assert!(s.key().is_some());
        assert_eq!(changed, [true, true, true]);
        // And it stays nothing.
        let (s, _) = sotw(TypeKind::Listener, &[&["a"], &[], &[]]);
        assert!(!s.is_wildcard());
        assert!(names(&s).is_empty());
    }

    #[test]
    fn sotw_explicit_wildcard_ends_legacy_and_coexists_with_names() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Cluster);
        assert!(s.set_names(&v(&["*", "a"]), &i));
        assert!(s.is_wildcard() && !s.is_legacy_wildcard());
        assert_eq!(names(&s), ["a"]);
        assert_eq!(s.key(), None);
        assert!(!s.set_names(&v(&["a", "*"]), &i), "same subscription");
        // `*` dropped: "a" stays.
        assert!(s.set_names(&v(&["a"]), &i));
        assert!(!s.is_wildcard());
        assert_eq!(s.wanted().map(|w| w.len()), Some(1));
        // `*` back, then nothing at all: not wildcard any more.
        assert!(s.set_names(&v(&["*"]), &i));
        assert!(s.is_wildcard() && names(&s).is_empty());
        assert!(s.set_names(&[], &i));
        assert!(!s.is_wildcard());
    }

    #[test]
    fn sotw_unchanged_names_in_another_order_are_unchanged() {
        let (_, changed) = sotw(
            TypeKind::Endpoint,
            &[&["b", "a"], &["a", "b"], &["b", "a", "a"]],
        );
        assert_eq!(changed, [true, false, false]);
    }

    #[test]
    fn non_wildcard_types_are_never_legacy_wildcard() {
        for kind in [TypeKind::Endpoint, TypeKind::Route, TypeKind::Secret] {
            let (s, changed) = sotw(kind, &[&[], &[]]);
            assert!(!s.is_wildcard(), "{kind:?}");
            assert_eq!(s.wanted(), Some(&BTreeSet::new()));
            assert_eq!(changed, [true, false], "{kind:?}");

            let i = Interner::default();
            let mut d = Subscription::new(kind);
            assert_eq!(d.update(&[], &[], &i), DeltaChange::default());
            assert!(!d.is_wildcard(), "{kind:?}");
            // `*` is honoured if a client asks for it.
            d.update(&v(&["*"]), &[], &i);
            assert!(d.is_wildcard(), "{kind:?}");
        }
    }

    #[test]
    fn equal_subscriptions_share_names_and_key() {
        let i = Interner::default();
        let mut a = Subscription::new(TypeKind::Endpoint);
        let mut b = Subscription::new(TypeKind::Endpoint);
        a.set_names(&v(&["x", "y"]), &i);
        b.update(&v(&["y"]), &[], &i);
        b.update(&v(&["x"]), &[], &i);
        assert!(Arc::ptr_eq(
            a.names.as_ref().unwrap(),
            b.names.as_ref().unwrap()
        ));
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn delta_legacy_wildcard_then_names_keep_wildcard() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&[], &[], &i);
        assert!(s.is_legacy_wildcard());
        // ACKs carry no names: still legacy wildcard.
        s.update(&[], &[], &i);
        assert!(s.is_legacy_wildcard());
        let c = s.update(&v(&["a"]), &[], &i);
        assert_eq!(c.added, ["a"]);
        assert!(s.is_wildcard() && !s.is_legacy_wildcard());
        assert_eq!(names(&s), ["a"]);
        // Dropping `*` keeps "a"; dropping "a" then leaves nothing, not wildcard.
        s.update(&[], &v(&["*"]), &i);
        assert!(!s.is_wildcard());
        assert_eq!(names(&s), ["a"]);
        assert_eq!(s.update(&[], &v(&["a"]), &i), DeltaChange::default());
        assert!(!s.is_wildcard() && names(&s).is_empty());
        s.update(&[], &[], &i);
        assert!(
            !s.is_wildcard(),
            "an empty request is not wildcard any more"
        );
    }

    #[test]
    fn delta_first_request_with_names_or_unsubscribes_is_not_wildcard() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Listener);
        s.update(&v(&["a"]), &[], &i);
        assert!(!s.is_wildcard());
        s.update(&[], &[], &i);
        assert!(!s.is_wildcard());
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&[], &v(&["a"]), &i);
        assert!(!s.is_wildcard());
    }

    #[test]
    fn delta_explicit_wildcard_add_and_remove() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&v(&["*", "a"]), &[], &i);
        assert!(s.is_wildcard() && !s.is_legacy_wildcard());
        assert_eq!(s.key(), None);
        s.update(&[], &v(&["*"]), &i);
        assert!(!s.is_wildcard());
        assert!(s.key().is_some());
        s.update(&v(&["*"]), &[], &i);
        assert!(s.is_wildcard());
        // Both in one request: unsubscribes come last.
        s.update(&v(&["*"]), &v(&["*"]), &i);
        assert!(!s.is_wildcard());
    }

    #[test]
    fn delta_unsubscribing_under_wildcard_forces_an_answer() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&v(&["*", "a", "b"]), &[], &i);
        let c = s.update(&[], &v(&["a", "gone", "a"]), &i);
        assert_eq!(c.force, ["a", "gone"]);
        assert!(c.added.is_empty());
        assert_eq!(names(&s), ["b"]);
        // Legacy wildcard too.
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&[], &[], &i);
        s.update(&v(&["a"]), &[], &i);
        assert_eq!(s.update(&[], &v(&["a"]), &i).force, ["a"]);
    }

    #[test]
    fn delta_unsubscribing_without_wildcard_forces_nothing() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&v(&["a", "b"]), &[], &i);
        assert_eq!(s.update(&[], &v(&["a"]), &i), DeltaChange::default());
        // Leaving `*` in the same request: the proxy drops what it does not subscribe to.
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&v(&["*", "a"]), &[], &i);
        assert!(s.update(&[], &v(&["*", "a"]), &i).force.is_empty());
        // Subscribed again in the same request: nothing to force, nothing added.
        let mut s = Subscription::new(TypeKind::Cluster);
        s.update(&v(&["*", "a"]), &[], &i);
        assert_eq!(s.update(&v(&["a"]), &[], &i), DeltaChange::default());
    }

    #[test]
    fn delta_added_lists_only_new_names() {
        let i = Interner::default();
        let mut s = Subscription::new(TypeKind::Endpoint);
        assert_eq!(s.update(&v(&["a", "b"]), &[], &i).added, ["a", "b"]);
        assert_eq!(s.update(&v(&["b", "c"]), &[], &i).added, ["c"]);
        assert!(s.update(&v(&["d"]), &v(&["d"]), &i).added.is_empty());
        assert_eq!(names(&s), ["a", "b", "c"]);
    }
}
