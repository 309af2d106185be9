//! Trellis's own gRPC APIs, generated at build time from `proto/**.proto`.
//!
//! - [`istio::v1::auth`]: Istio's `IstioCertificateService/CreateCertificate`, served by
//!   `xds-server` on its secure port so Istio's agents and Trellis relays can get
//!   workload certificates signed.

pub mod istio {
    pub mod v1 {
        pub mod auth {
            #![allow(clippy::all)]
            tonic::include_proto!("istio.v1.auth");
        }
    }
}
