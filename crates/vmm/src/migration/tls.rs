//! TLS for `tls:HOST:PORT` migrations (rustls): both sides show a certificate and check the
//! other's against a CA, since the stream carries the whole guest.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

/// The largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

/// This side's certificate and key, and the CA that signs the other side's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// A request's three fields for `url` (named `field` in errors): all of them with a
    /// `tls:` URL, none with another; the error names what is wrong.
    pub fn for_url(
        url: &super::transport::Url,
        field: &str,
        cert: &Option<String>,
        key: &Option<String>,
        ca: &Option<String>,
    ) -> Result<Option<TlsFiles>, String> {
        let tls = matches!(url, super::transport::Url::Tls(_));
        match (cert, key, ca) {
            (None, None, None) if tls => {
                Err(format!("a tls: {field} needs tls_cert, tls_key and tls_ca; give the PEM files."))
            }
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) if tls => {
                Ok(Some(TlsFiles { cert: cert.into(), key: key.into(), ca: ca.into() }))
            }
            (Some(_), Some(_), Some(_)) => Err(format!("tls_cert, tls_key and tls_ca go with a tls: {field}.")),
            _ => Err("tls_cert, tls_key and tls_ca go together; give all three PEM files.".into()),
        }
    }

    fn read(path: &Path, field: &str) -> Result<Vec<u8>, String> {
        sandbox::files::read_regular(path, field, MAX_PEM).map_err(|e| format!("{e}."))
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let pem = Self::read(&self.cert, "tls_cert")?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls_cert {} is not PEM certificates ({e}).", self.cert.display()))?;
        if chain.is_empty() {
            return Err(format!("tls_cert {} holds no certificate; give a PEM certificate.", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&Self::read(&self.key, "tls_key")?)
            .map_err(|e| format!("tls_key {} is not a PEM private key ({e}).", self.key.display()))?;
        Ok((chain, key))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, String> {
        let pem = Self::read(&self.ca, "tls_ca")?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("tls_ca {} is not PEM certificates ({e}).", self.ca.display()))?;
            roots.add(cert).map_err(|e| format!("tls_ca {} holds a bad CA certificate ({e}).", self.ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("tls_ca {} holds no certificate; give the CA's PEM certificate.", self.ca.display()));
        }
        Ok(Arc::new(roots))
    }

    /// *ring*'s provider: rustls marks it deprecated for its lack of post-quantum key
    /// exchange, but the alternative (aws-lc-rs) is a C build of AWS-LC in every build of ours.
    #[allow(deprecated)]
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The source's side: its certificate, and the CA the destination's must chain to.
    pub fn client(&self) -> Result<Arc<ClientConfig>, String> {
        let (chain, key) = self.identity()?;
        let config = ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS cannot be set up ({e})."))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("tls_cert and tls_key do not make a usable identity ({e})."))?;
        Ok(Arc::new(config))
    }

    /// The destination's side: its certificate, and the CA the source's must chain to.
    pub fn server(&self) -> Result<Arc<ServerConfig>, String> {
        let (chain, key) = self.identity()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .build()
            .map_err(|e| format!("tls_ca cannot check clients ({e})."))?;
        let config = ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS cannot be set up ({e})."))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("tls_cert and tls_key do not make a usable identity ({e})."))?;
        Ok(Arc::new(config))
    }
}

/// A TLS stream over TCP, either side.
pub struct TlsStream<C> {
    tls: StreamOwned<C, TcpStream>,
}

impl<C, S> TlsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    /// Runs the handshake at once, so that a refused certificate fails here.
    fn handshake(mut connection: C, mut tcp: TcpStream) -> Result<TlsStream<C>, String> {
        while connection.is_handshaking() {
            connection.complete_io(&mut tcp).map_err(|e| format!("the TLS handshake failed ({e})"))?;
        }
        Ok(TlsStream { tls: StreamOwned::new(connection, tcp) })
    }
}

/// The source's TLS stream to `host` over `tcp`.
pub fn connect(config: Arc<ClientConfig>, host: &str, tcp: TcpStream) -> Result<TlsStream<ClientConnection>, String> {
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
        .map_err(|e| format!("{host} is not a name TLS can check ({e})"))?;
    let connection = ClientConnection::new(config, name).map_err(|e| format!("TLS cannot start ({e})"))?;
    TlsStream::handshake(connection, tcp)
}

/// The destination's TLS stream from an accepted `tcp`.
pub fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> Result<TlsStream<ServerConnection>, String> {
    let connection = ServerConnection::new(config).map_err(|e| format!("TLS cannot start ({e})"))?;
    TlsStream::handshake(connection, tcp)
}

impl<C, S> Read for TlsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tls.read(buf)
    }
}

impl<C, S> Write for TlsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tls.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tls.flush()
    }
}

impl<C> AsRawFd for TlsStream<C> {
    fn as_raw_fd(&self) -> RawFd {
        self.tls.sock.as_raw_fd()
    }
}

impl<C, S> TlsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn plaintext_waits(&mut self) -> bool {
        self.tls.conn.process_new_packets().is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }
}

impl super::transport::Stream for TlsStream<ClientConnection> {
    fn buffered_input(&mut self) -> bool {
        self.plaintext_waits()
    }
}

impl super::transport::Stream for TlsStream<ServerConnection> {
    fn buffered_input(&mut self) -> bool {
        self.plaintext_waits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::transport::Url;

    #[test]
    fn the_three_files_go_together_and_only_with_a_tls_url() {
        let (tls, tcp) = (Url::Tls("h:1".into()), Url::Tcp("h:1".into()));
        let some = |s: &str| Some(s.to_string());
        let files = TlsFiles::for_url(&tls, "f", &some("c"), &some("k"), &some("a")).unwrap().unwrap();
        assert_eq!(files.ca, PathBuf::from("a"));
        assert_eq!(TlsFiles::for_url(&tcp, "f", &None, &None, &None), Ok(None));
        assert!(TlsFiles::for_url(&tls, "f", &None, &None, &None).unwrap_err().contains("a tls: f needs"));
        assert!(TlsFiles::for_url(&tcp, "f", &some("c"), &some("k"), &some("a")).unwrap_err().contains("go with"));
        assert!(TlsFiles::for_url(&tls, "f", &some("c"), &None, &None).unwrap_err().contains("go together"));
    }
}
