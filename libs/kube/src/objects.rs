//! Small pieces of Kubernetes objects and API answers that the coordinator launcher and the
//! executor launcher share.

use k8s_openapi::api::core::v1::{EnvVar, SecretVolumeSource, Volume, VolumeMount};

/// Whether `e` is the API server answering with HTTP status `code`.
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A volume `name` of Secret `secret`, its files in `default_mode` (the API's 0644 if None).
pub(crate) fn secret_volume(name: &str, secret: &str, default_mode: Option<i32>) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            default_mode,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Volume `name` mounted read-only at `path`.
pub(crate) fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// A `kubernetes.io/tls`-style Secret (tls.crt, tls.key, ca.crt) mounted read-only at a path,
/// with `COHORT_TLS_CERT`/`KEY`/`CA` pointing at its files: how coordinator and executor Pods
/// get their certificates.
pub(crate) struct TlsSecretMount {
    pub env: Vec<EnvVar>,
    pub volume: Volume,
    pub mount: VolumeMount,
}

impl TlsSecretMount {
    pub fn new(secret: &str, path: &str, default_mode: Option<i32>) -> Self {
        let env = [
            ("COHORT_TLS_CERT", "tls.crt"),
            ("COHORT_TLS_KEY", "tls.key"),
            ("COHORT_TLS_CA", "ca.crt"),
        ]
        .into_iter()
        .map(|(name, file)| EnvVar {
            name: name.to_string(),
            value: Some(format!("{path}/{file}")),
            ..Default::default()
        })
        .collect();
        Self {
            env,
            volume: secret_volume("tls", secret, default_mode),
            mount: read_only_mount("tls", path),
        }
    }
}
