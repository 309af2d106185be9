//! The xDS cache: translated resources, encoded once, grouped by proxy class.
//!
//! Kept apart from the ADS streams (`crate::ads`): streams only read snapshots and do
//! bookkeeping; everything that costs CPU per resource happens here, once per snapshot.

mod resource;
mod service_resources;
mod snapshot;
mod view;

pub use resource::{wire, Resource, ResourceSet, TypeKind};
pub use snapshot::Snapshot;
pub use view::{subscription_key, DeltaUpdate, ProxyView, SotwBody, SubscriptionKey};
