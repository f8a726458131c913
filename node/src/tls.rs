//! TLS for the QUIC data plane: libp2p's TLS profile, with AES-GCM first.
//!
//! Each side presents a self-signed certificate that carries its ed25519 node key
//! ([`libp2p::tls::certificate`]), and each side checks the other's: exactly one certificate,
//! its libp2p extension signed by the key it names, and the TLS 1.3 handshake signed by that
//! key. The client also checks that the key is the node it meant to reach. This is what
//! `libp2p::tls::make_{client,server}_config` build; they are not used because they fix the
//! cipher suites with ChaCha20-Poly1305 first, which every connection then uses. On hosts with
//! AES instructions (every x86 KVM host) AES-GCM costs less CPU per byte than ChaCha20 (a
//! 1 GiB `bench-fabric` snapshot took 10% less time), and the data plane carries every page
//! of every snapshot and restore. ChaCha20 stays allowed, last. Unlike libp2p's, these
//! configurations neither issue nor use session tickets (a resumed handshake skips the
//! certificate checks) and refuse handshake signatures with RSA PKCS#1 v1.5, which TLS 1.3
//! forbids. Reviewed against libp2p-tls 0.7's verifier.

use libp2p::identity::{Keypair, PeerId};
use libp2p::tls::certificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The data plane's cipher suites, most preferred first (TLS 1.3 only).
pub const CIPHER_SUITES: &[rustls::SupportedCipherSuite] = &[
    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

fn provider() -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = CIPHER_SUITES.to_vec();
    Arc::new(p)
}

/// The certificate and key that prove `keypair`, as TLS presents them. (Not through
/// `with_single_cert`: rustls would parse the certificate to match it with the key, and its
/// parser refuses the critical libp2p extension that [`Verifier`] checks.)
fn identity(keypair: &Keypair, provider: &CryptoProvider) -> anyhow::Result<Arc<SingleCertAndKey>> {
    let (cert, key) = certificate::generate(keypair).map_err(|e| anyhow::anyhow!("cannot make this node's TLS certificate: {e}"))?;
    let key = provider.key_provider.load_private_key(key)?;
    Ok(Arc::new(SingleCertAndKey::from(CertifiedKey::new(vec![cert], key))))
}

/// The server side: any peer that proves its key (membership is checked after the handshake).
pub fn server_config(keypair: &Keypair) -> anyhow::Result<rustls::ServerConfig> {
    let provider = provider();
    let me = identity(keypair, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Verifier { expect: None }))
        .with_cert_resolver(me);
    // No session tickets: a resumed handshake skips the certificate checks, and clients here
    // never resume (each dial builds a new configuration).
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client side: the server must prove it is `expect`.
pub fn client_config(keypair: &Keypair, expect: PeerId) -> anyhow::Result<rustls::ClientConfig> {
    let provider = provider();
    let me = identity(keypair, &provider)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { expect: Some(expect) }))
        .with_client_cert_resolver(me);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Checks a peer's certificate as libp2p's TLS profile requires.
#[derive(Debug)]
struct Verifier {
    /// The peer the client means to reach (`None` on the server: any peer with a valid proof).
    expect: Option<PeerId>,
}

/// Signature schemes a libp2p certificate's key may sign the handshake with, most preferred
/// first: libp2p's list less RSA PKCS#1 v1.5, which TLS 1.3 does not allow there.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
];

impl Verifier {
    /// The peer a presented chain proves: exactly one certificate, self-signed, with a valid
    /// libp2p extension.
    fn peer_of(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<PeerId, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General("the libp2p TLS profile allows exactly one certificate".into()));
        }
        let cert = certificate::parse(end_entity).map_err(|e| bad_certificate(e.to_string()))?;
        Ok(cert.peer_id())
    }

    fn tls13(message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only the schemes offered: TLS 1.3 forbids PKCS#1 v1.5 signatures of the handshake,
        // which a certificate's RSA key could otherwise make.
        if !SCHEMES.contains(&dss.scheme) {
            return Err(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme));
        }
        let cert = certificate::parse(cert).map_err(|e| bad_certificate(e.to_string()))?;
        cert.verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }
}

fn bad_certificate(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(std::io::Error::other(why)))))
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = Self::peer_of(end_entity, intermediates)?;
        if self.expect.is_some_and(|e| e != peer) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], _now: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        Self::peer_of(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    /// A whole TLS 1.3 handshake in memory; the suite it agreed on, or the first error.
    fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> Result<rustls::CipherSuite, rustls::Error> {
        let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("vmcsnap").expect("name"))?;
        let mut s = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client writes");
            s.read_tls(&mut buf.as_slice()).expect("server reads");
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).expect("server writes");
            c.read_tls(&mut buf.as_slice()).expect("client reads");
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.negotiated_cipher_suite().expect("suite").suite());
            }
        }
        panic!("the handshake did not end");
    }

    #[test]
    fn members_agree_on_aes_gcm_and_the_client_gets_the_node_it_named() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let suite = handshake(client_config(&a, b.public().to_peer_id()).expect("client"), server_config(&b).expect("server"));
        assert_eq!(suite.expect("handshake"), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // Someone else answering for the node the client named is refused.
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let err = handshake(client_config(&a, other).expect("client"), server_config(&b).expect("server")).expect_err("wrong node");
        assert!(matches!(err, rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)), "{err:?}");
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let server = Keypair::generate_ed25519();
        let anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier { expect: Some(server.public().to_peer_id()) }))
            .with_no_client_auth();
        let err = handshake(anonymous, server_config(&server).expect("server")).expect_err("no client certificate");
        assert!(matches!(err, rustls::Error::NoCertificatesPresented | rustls::Error::AlertReceived(_)), "{err:?}");
    }

    #[test]
    fn a_peer_without_the_libp2p_proof_is_refused() {
        // A plain self-signed certificate, no libp2p extension.
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["vmcsnap".into()]).expect("params").self_signed(&k).expect("cert");
        let provider = provider();
        let key = provider.key_provider.load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(k.serialize_der().into())).expect("load");
        let plain = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(CertifiedKey::new(vec![cert.der().clone()], key))));
        let me = Keypair::generate_ed25519();
        let err = handshake(client_config(&me, PeerId::random()).expect("client"), plain).expect_err("no libp2p proof");
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
    }
}
