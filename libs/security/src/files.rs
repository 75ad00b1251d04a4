//! Reading and writing PEM files. Keys are created 0600 and replaced
//! atomically, so a reader never sees a half-written or world-readable key.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::SecurityError;

/// Writes a certificate (mode 0644), atomically; parent directories are created.
pub fn write_cert(path: &Path, pem: &str) -> Result<(), SecurityError> {
    write_atomic(path, pem.as_bytes(), 0o644, "certificate")
}

/// Writes a private key (mode 0600 from creation on), atomically via a temporary
/// file and a rename in the same directory; parent directories are created.
pub fn write_key(path: &Path, pem: &str) -> Result<(), SecurityError> {
    write_atomic(path, pem.as_bytes(), 0o600, "private key")
}

fn write_atomic(
    path: &Path,
    data: &[u8],
    mode: u32,
    what: &'static str,
) -> Result<(), SecurityError> {
    let werr = |p: &Path, source| SecurityError::Write {
        what,
        path: p.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| SecurityError::InvalidArgument {
            field: "path",
            reason: format!("{} does not name a file", path.display()),
        })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| werr(&dir, e))?;

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{:016x}", rand::rng().random::<u64>()));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut file = create_new(&tmp, mode)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(werr(path, e));
    }
    // Make the rename durable; not every filesystem supports syncing a directory.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(unix)]
fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have narrowed the mode; set it exactly (never wider than `mode`).
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(file)
}

#[cfg(not(unix))]
fn create_new(path: &Path, _mode: u32) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, SecurityError> {
    fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Describes a PEM error without quoting the file's contents.
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line".to_string(),
        pem::Error::Base64Decode(_) => "invalid base64 in a PEM section".to_string(),
        pem::Error::NoItemsFound => "no PEM section of the expected kind".to_string(),
        pem::Error::SectionTooLarge => "PEM section too large".to_string(),
        pem::Error::Io(e) => e.to_string(),
        _ => "malformed PEM".to_string(),
    }
}

/// Every certificate in a PEM file (leaf first, as written); an error if there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    Ok(load_certs_pem(path)?.1)
}

/// The file's bytes and the certificates in them, from one read: what is checked is what is
/// used, even while the file is being replaced (a rotated Kubernetes Secret).
pub fn load_certs_pem(
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), SecurityError> {
    const WHAT: &str = "certificate file";
    let data = read(path, WHAT)?;
    let certs = certs_from_pem(&data, path, WHAT)?;
    Ok((data, certs))
}

/// The certificates in PEM text read from `path`; at least one.
pub(crate) fn certs_from_pem(
    data: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let invalid = |reason: String| SecurityError::InvalidFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE section".to_string()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, SecurityError> {
    Ok(load_key_pem(path)?.1)
}

/// The file's bytes and the private key in them, from one read.
pub fn load_key_pem(path: &Path) -> Result<(Vec<u8>, PrivateKeyDer<'static>), SecurityError> {
    const WHAT: &str = "private key file";
    let data = read(path, WHAT)?;
    let key = PrivateKeyDer::from_pem_slice(&data).map_err(|e| SecurityError::InvalidFile {
        what: WHAT,
        path: path.to_path_buf(),
        reason: match e {
            pem::Error::NoItemsFound => "no PRIVATE KEY section".to_string(),
            e => pem_reason(&e),
        },
    })?;
    Ok((data, key))
}

/// Reads a text file whole (for rcgen, which takes PEM strings).
pub(crate) fn read_pem_string(path: &Path, what: &'static str) -> Result<String, SecurityError> {
    let data = read(path, what)?;
    String::from_utf8(data).map_err(|_| SecurityError::InvalidFile {
        what,
        path: path.to_path_buf(),
        reason: "not UTF-8 text".to_string(),
    })
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn key_is_0600_cert_is_0644_and_parents_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("a/b/party.key");
        let cert = dir.path().join("a/b/party.crt");
        write_key(&key, "secret").unwrap();
        write_cert(&cert, "public").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret");

        // Replacing keeps the mode and leaves no temporary files behind.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        write_key(&key, "secret 2").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret 2");
        let names: Vec<_> = fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crt");
        let err = load_certs(&missing).unwrap_err().to_string();
        assert!(err.starts_with("cannot read certificate file "), "{err}");
        assert!(err.contains("missing.crt"), "{err}");

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "hello\n").unwrap();
        let err = load_certs(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let err = load_key(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no PRIVATE KEY"),
            "{err}"
        );

        let broken = dir.path().join("broken.key");
        fs::write(
            &broken,
            "-----BEGIN PRIVATE KEY-----\nTOPSECRET!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load_key(&broken).unwrap_err().to_string();
        assert!(
            err.contains("broken.key") && !err.contains("TOPSECRET"),
            "{err}"
        );
    }

    #[test]
    fn path_without_file_name_is_refused() {
        assert!(write_key(Path::new("/"), "x").is_err());
    }
}
