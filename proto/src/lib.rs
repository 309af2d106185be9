//! Trellis's own gRPC APIs, generated at build time from `proto/**.proto`.
//!
//! - [`istio::v1::auth`]: Istio's `IstioCertificateService/CreateCertificate`, served by
//!   `xds-server` on its secure port so Istio's agents and Trellis relays can get
//!   workload certificates signed.
//! - [`trellis::relay::v1`]: `Registration/Report`, how a member cluster's relay reports
//!   the cluster's workloads to the control plane, and what a relay keeps on disk
//!   (`CacheFile`) to serve its cluster after a restart without the control plane.

pub mod istio {
    pub mod v1 {
        pub mod auth {
            #![allow(clippy::all)]
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod trellis {
    pub mod relay {
        pub mod v1 {
            #![allow(clippy::all)]
            tonic::include_proto!("trellis.relay.v1");
        }
    }
}
