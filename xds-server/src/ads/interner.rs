//! Subscriptions shared between streams. Thousands of sidecars of one class subscribe to
//! the same few hundred EDS names; each stream holding its own copy would cost more than
//! everything else it keeps. Identical sets are stored once and referenced.

use crate::cache::{subscription_key, SubscriptionKey};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};

pub type Names = Arc<BTreeSet<String>>;

#[derive(Debug, Default)]
pub struct Interner {
    sets: Mutex<HashMap<u128, Weak<BTreeSet<String>>>>,
}

impl Interner {
    /// The shared set for `names` (any order, duplicates allowed) and its key.
    pub fn intern(&self, names: &[String]) -> (Names, SubscriptionKey) {
        let borrowed: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let key = subscription_key(borrowed.iter().copied());
        self.get_or_insert(key, || borrowed.into_iter().map(str::to_owned).collect())
    }

    /// The shared set equal to `set`.
    pub fn intern_set(&self, set: BTreeSet<String>) -> (Names, SubscriptionKey) {
        let key = subscription_key(set.iter().map(String::as_str));
        self.get_or_insert(key, || set)
    }

    fn get_or_insert(
        &self,
        key: SubscriptionKey,
        make: impl FnOnce() -> BTreeSet<String>,
    ) -> (Names, SubscriptionKey) {
        let k = key.unwrap_or_default();
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = sets.get(&k).and_then(Weak::upgrade) {
            return (set, key);
        }
        let set: Names = Arc::new(make());
        // Sweep sets no stream uses any more, amortised over insertions.
        if sets.len() >= 64 && sets.len().is_power_of_two() {
            sets.retain(|_, w| w.strong_count() > 0);
        }
        sets.insert(k, Arc::downgrade(&set));
        (set, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sets_are_shared_whatever_the_order() {
        let i = Interner::default();
        let (a, ka) = i.intern(&["b".into(), "a".into()]);
        let (b, kb) = i.intern(&["a".into(), "b".into(), "a".into()]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(ka, kb);
        let (c, kc) = i.intern(&["a".into()]);
        assert_ne!(ka, kc);
        assert_eq!(c.len(), 1);
    }
}
