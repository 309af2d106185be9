//! The one error type of the crate.
//!
//! Messages are written for the operator reading a log line or a gRPC status: they name the
//! file, the identity or the claim that was wrong, and where it helps, what to do about it.

use std::path::PathBuf;

use crate::rotation::Phase;
use crate::token::TokenKind;

/// Everything that can go wrong in the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or folder of the CA state or of a plugged CA could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What the CA was doing ("reading", "writing", "creating folder", ...).
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// PEM (or the DER inside it) that does not hold what it should.
    #[error("{what}: {reason}")]
    BadPem {
        /// The file or input ("CSR", a path) that was wrong.
        what: String,
        reason: String,
    },

    /// A private key that does not belong to the certificate it is paired with.
    #[error(
        "the private key in {} does not match the certificate in {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    /// A JSON state file of the CA (state.json, rotation.json) that cannot be used.
    #[error("CA state file {}: {reason}", path.display())]
    State { path: PathBuf, reason: String },

    /// A plugged-in CA (Istio layout) that is invalid or an operation it does not allow.
    #[error("plugged CA: {0}")]
    Plugged(String),

    /// A SPIFFE ID (or trust domain, namespace, service account) that is not well formed.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidIdentity { input: String, reason: String },

    /// Options that cannot work together.
    #[error("invalid CA options: {0}")]
    InvalidOptions(String),

    /// A CSR that cannot be parsed or asks for something a workload may not have.
    #[error("invalid CSR: {0}")]
    CsrInvalid(String),

    /// A CSR whose self-signature does not verify: it was altered or not made with its key.
    #[error("the CSR's signature does not verify with its own public key (altered or corrupted request)")]
    CsrSignature,

    /// A CSR asking for an identity other than (or more than) the one its caller proved.
    #[error(
        "the CSR asks for {} but the caller proved {proven}; a CSR must carry exactly one URI SAN equal to the caller's identity and nothing else",
        describe_sans(requested)
    )]
    CsrIdentity {
        proven: String,
        requested: Vec<String>,
    },

    /// A token that is not a compact ES256 JWS of this control plane's shape.
    #[error("malformed token: {0}")]
    TokenMalformed(String),

    /// A well-formed token whose signature does not verify.
    #[error("token signature does not verify: not issued by this control plane")]
    TokenForged,

    /// A genuine token past its expiry.
    #[error("token expired at {exp} (unix seconds)")]
    TokenExpired { exp: u64 },

    /// A genuine token of another kind (a join token used as a workload token, ...).
    #[error("token is a {got:?} token, but a {expected:?} token is required here")]
    TokenKind { expected: TokenKind, got: TokenKind },

    /// A one-time token (a join token) that was already redeemed.
    #[error("{kind} token already used: redeemed at {at} (jti {jti}); make a new one")]
    TokenUsed {
        kind: TokenKind,
        jti: String,
        /// When it was redeemed, RFC 3339.
        at: String,
    },

    /// An extra claim that would shadow one of the registered claims.
    #[error("token claim {0:?} is reserved and cannot be set as an extra claim")]
    TokenClaim(String),

    /// `start_rotation` while a rotation is still running.
    #[error(
        "a root rotation to {new_root} is already running (phase {phase:?}); advance it to the end before starting another"
    )]
    RotationInProgress { phase: Phase, new_root: String },

    /// `advance_rotation` with no rotation running.
    #[error("no root rotation is running")]
    NoRotation,

    /// A failure of the signing or key generation machinery itself.
    #[error("crypto: {0}")]
    Crypto(String),
}

fn describe_sans(sans: &[String]) -> String {
    if sans.is_empty() {
        "no subject alternative name".to_string()
    } else {
        format!("[{}]", sans.join(", "))
    }
}

impl CaError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        CaError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_pem(what: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        CaError::BadPem {
            what: what.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn crypto(context: &str, err: impl std::fmt::Display) -> Self {
        CaError::Crypto(format!("{context}: {err}"))
    }
}
