//! Trellis `xds-server`: the mesh control plane's configuration and xDS engine.
//!
//! Data flow (see DESIGN.md): [`config`] files are parsed and validated, joined into a
//! [`mesh::MeshState`], translated ([`translate`]) into Envoy resources that the
//! [`cache`] encodes once per version, and streamed by the [`ads`] server to every
//! proxy. [`controller`] watches the folder and publishes snapshots; [`admin`] shows
//! what each proxy was sent, ACKed and NACKed.

pub mod admin;
pub mod ads;
pub mod bootstrap;
pub mod cache;
pub mod clusters;
pub mod config;
pub mod controller;
pub mod dump;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod server;
pub mod translate;
