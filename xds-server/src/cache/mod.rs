//! The xDS cache: translated resources, encoded once, grouped by proxy class.
//!
//! Kept apart from the ADS streams (`crate::ads`): streams only read snapshots and do
//! bookkeeping; everything that costs CPU per resource happens here, once per snapshot.

mod resource;
mod service_resources;
mod snapshot;

pub use resource::{wire, Resource, ResourceSet, TypeKind};
pub use snapshot::{subscription_key, DeltaUpdate, ProxyView, Snapshot, SotwBody, SubscriptionKey};
