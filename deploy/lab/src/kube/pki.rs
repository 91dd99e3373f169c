//! The real cluster's certificates and kubeconfigs: one CA signs the API
//! server's serving certificate and a client certificate for each caller,
//! whose subject is the identity Kubernetes authorizes (`system:masters`
//! for the administrator, `system:node:<name>` in `system:nodes` for each
//! kubelet, as kubeadm issues them).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Where the files are, once written.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

/// Who a client certificate says its holder is.
pub struct Subject<'a> {
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The key that signs service-account tokens.
    pub fn service_account_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }

    /// Its public half, which verifies them.
    pub fn service_account_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.kubeconfig"))
    }

    /// Writes the CA, the API server's serving certificate for `api_names`
    /// (addresses and DNS names) and the service-account key.
    pub fn init(&self, api_names: &[String]) -> anyhow::Result<Authority> {
        std::fs::create_dir_all(&self.dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "weft-lab-kubernetes-ca");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let ca_key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        write(&self.ca_cert(), &issuer.pem())?;
        write(&self.ca_key(), &ca_key_pem)?;
        let sa = KeyPair::generate()?;
        write(&self.service_account_key(), &sa.serialize_pem())?;
        write(&self.service_account_pub(), &sa.public_key_pem())?;
        let authority = Authority {
            pki: self.clone(),
            issuer,
        };
        authority.issue(
            "kube-apiserver",
            &Subject {
                user: "kube-apiserver",
                groups: &[],
            },
            api_names,
        )?;
        Ok(authority)
    }
}

/// The CA while it signs.
pub struct Authority {
    pki: Pki,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    /// Writes `<name>.crt` and `<name>.key`: a certificate for `subject`,
    /// good for clients and, with `names`, for serving them.
    pub fn issue(&self, name: &str, subject: &Subject<'_>, names: &[String]) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, subject.user);
        for group in subject.groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        write(&self.pki.cert(name), &cert.pem())?;
        write(&self.pki.key(name), &key.serialize_pem())
    }

    /// Issues a client certificate for `subject` and writes
    /// `<name>.kubeconfig` that uses it against `server`.
    pub fn kubeconfig(
        &self,
        name: &str,
        subject: &Subject<'_>,
        server: &str,
    ) -> anyhow::Result<PathBuf> {
        self.issue(name, subject, &[])?;
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "weft-lab", "cluster": {
                "server": server,
                "certificate-authority": self.pki.ca_cert(),
            }}],
            "users": [{"name": name, "user": {
                "client-certificate": self.pki.cert(name),
                "client-key": self.pki.key(name),
            }}],
            "contexts": [{"name": "weft-lab", "context": {"cluster": "weft-lab", "user": name}}],
            "current-context": "weft-lab",
        });
        let path = self.pki.kubeconfig(name);
        write(&path, &serde_json::to_string_pretty(&config)?)?;
        Ok(path)
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
