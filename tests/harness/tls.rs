//! Certificates for a NATS server that speaks only TLS and verifies its clients: a throwaway CA,
//! a server certificate for 127.0.0.1, and a client certificate, as PEM files in a temporary
//! directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "taskfactory test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = write("ca.pem", ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![purpose];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let cert = params.signed_by(&key, &issuer)?;
            anyhow::Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "nats-server",
        )?;
        let (client_cert, client_key) = leaf(
            vec!["taskfactory-client".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "taskfactory-client",
        )?;
        Ok(Self {
            ca: ca_pem,
            server_cert: write("server.pem", server_cert)?,
            server_key: write("server-key.pem", server_key)?,
            client_cert: write("client.pem", client_cert)?,
            client_key: write("client-key.pem", client_key)?,
            _dir: dir,
        })
    }

    /// The `tls { }` block of a nats-server configuration: TLS only, clients verified.
    pub fn server_config(&self) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        )
    }

    /// The environment a service process needs to connect.
    pub fn client_env(&self) -> [(&'static str, String); 3] {
        [
            ("NATS_CA", self.ca.display().to_string()),
            ("NATS_CERT", self.client_cert.display().to_string()),
            ("NATS_KEY", self.client_key.display().to_string()),
        ]
    }

    /// Connect options of a test client.
    pub fn connect_options(&self) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .add_root_certificates(self.ca.clone())
            .add_client_certificate(self.client_cert.clone(), self.client_key.clone())
            .require_tls(true)
    }
}
