//! A test fleet CA and member certificates (rcgen), written as PEM files the way
//! `deploy/make-test-certs.sh` writes them.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use vfio_migd::tls::PeerTlsConfig;

pub struct Fleet {
    pub dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Fleet {
    pub fn new(name: &str) -> Fleet {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        Fleet { dir, issuer: Issuer::new(params, key), ca_pem }
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A member valid now, whose SANs are `names` (DNS names or IP addresses).
    pub fn member(&self, file: &str, names: &[&str]) -> PeerTlsConfig {
        self.issue(file, names, false)
    }

    /// A member whose certificate expired in 2021.
    pub fn expired_member(&self, file: &str, names: &[&str]) -> PeerTlsConfig {
        self.issue(file, names, true)
    }

    fn issue(&self, file: &str, names: &[&str], expired: bool) -> PeerTlsConfig {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let dir = self.dir.path();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        PeerTlsConfig {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
            ca: dir.join("ca.pem"),
        }
    }
}

/// `[peer.tls]` for `tls`.
pub fn tls_toml(tls: &PeerTlsConfig) -> String {
    let show = |p: &Path| p.display().to_string();
    format!(
        "[peer.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        show(&tls.cert),
        show(&tls.key),
        show(&tls.ca)
    )
}
