//! The file rules through the real file system: modes on creation, refusal of
//! exposed secrets, durable replacement, and PEM files that hold the wrong thing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use portswitch_files::*;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-files-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_durable_write_is_private_from_the_start_and_replaces_whole() {
    let dir = temp_dir("durable");
    let path = dir.join("state.json");
    write_durable(&path, b"one", SECRET_MODE).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"one");
    assert_eq!(mode(&path), 0o600);
    // An older, world-readable file is replaced by a private one.
    chmod(&path, 0o644);
    // A stale file aside (a crash) with a wide mode does not lend the new file its mode.
    std::fs::write(dir.join("state.json.tmp"), b"stale").unwrap();
    chmod(&dir.join("state.json.tmp"), 0o666);
    write_durable(&path, b"two", SECRET_MODE).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    assert_eq!(mode(&path), 0o600);
    assert!(!dir.join("state.json.tmp").exists(), "nothing left aside");
    // Public files get at most the mode asked for (less the umask).
    write_durable(&dir.join("ca.pem"), b"cert", PUBLIC_MODE).unwrap();
    assert_eq!(mode(&dir.join("ca.pem")) & !PUBLIC_MODE, 0);
    // A write into a missing directory names the file it could not create.
    let err = write_durable(&dir.join("missing-dir/x"), b"x", SECRET_MODE).unwrap_err();
    assert!(err.to_string().contains("missing-dir/x.tmp"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_new_file_never_replaces_one() {
    let dir = temp_dir("new");
    let path = dir.join("key.pem");
    write_new_durable(&path, b"first", SECRET_MODE).unwrap();
    assert_eq!(mode(&path), 0o600);
    let err = write_new_durable(&path, b"second", SECRET_MODE).unwrap_err();
    assert!(
        matches!(&err, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{err:?}"
    );
    assert!(err.to_string().contains("key.pem"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    assert!(!dir.join("key.pem.tmp").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_secret_open_to_others_is_refused_with_the_fix() {
    let dir = temp_dir("secret");
    let path = dir.join("auth.json");
    let err = read_secret(&path).unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    std::fs::write(&path, b"{}").unwrap();
    chmod(&path, 0o644);
    let err = read_secret(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} is readable by group or others (mode 0644); run chmod 600 {}",
            path.display(),
            path.display()
        )
    );
    assert_eq!(err.path(), path);
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(io.to_string().contains("chmod 600"), "{io}");
    // Any access at all is too much, even without read.
    chmod(&path, 0o620);
    let err = open_secret(&path).unwrap_err();
    assert!(
        matches!(
            err,
            FileError::Exposed {
                mode: 0o620,
                access: "accessible",
                ..
            }
        ),
        "{err:?}"
    );
    chmod(&path, 0o604);
    assert!(matches!(
        read_secret(&path),
        Err(FileError::Exposed { mode: 0o604, .. })
    ));
    chmod(&path, 0o600);
    assert_eq!(read_secret(&path).unwrap(), b"{}");
    chmod(&path, 0o400);
    assert_eq!(read_secret(&path).unwrap(), b"{}");
    // A directory is not a secret file.
    chmod(&dir, 0o700);
    assert!(matches!(open_secret(&dir), Err(FileError::NotAFile { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_log_is_created_with_its_mode_and_appended_to() {
    let dir = temp_dir("append");
    let path = dir.join("audit.log");
    let mut f = open_append(&path, SECRET_MODE).unwrap();
    std::io::Write::write_all(&mut f, b"a\n").unwrap();
    drop(f);
    assert_eq!(mode(&path), 0o600);
    assert!(is_private(&std::fs::File::open(&path).unwrap()).unwrap());
    let mut f = open_append(&path, SECRET_MODE).unwrap();
    std::io::Write::write_all(&mut f, b"b\n").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\n");
    chmod(&path, 0o640);
    assert!(!is_private(&std::fs::File::open(&path).unwrap()).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pem_files_must_hold_what_they_are_for() {
    let dir = temp_dir("pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let both = dir.join("both.pem");
    std::fs::write(&both, format!("{}{}", key.serialize_pem(), cert.pem())).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, b"").unwrap();

    assert_eq!(load_certs(&cert_pem).unwrap(), vec![cert.der().clone()]);
    assert_eq!(load_certs(&both).unwrap().len(), 1);
    assert_eq!(load_roots(&cert_pem).unwrap().len(), 1);
    assert!(load_key(&key_pem).is_ok());
    assert!(load_key(&both).is_ok());

    // The empty check the server's loader lacked: a key file given as certificate.
    let err = load_certs(&key_pem).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no certificate in the file", key_pem.display())
    );
    let err = load_roots(&empty).unwrap_err();
    assert!(
        matches!(
            err,
            FileError::Missing {
                what: "CA certificate",
                ..
            }
        ),
        "{err:?}"
    );
    let err = load_key(&cert_pem).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no private key in the file", cert_pem.display())
    );
    // Malformed PEM names the file; so does a missing one.
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, b"-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let err = load_certs(&broken).unwrap_err();
    assert!(matches!(err, FileError::Pem { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&broken.display().to_string()));
    let err = load_key(&dir.join("absent.pem")).unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains("absent.pem"));
    // A huge file (the wrong path) fails before it is parsed.
    let huge = dir.join("huge.pem");
    std::fs::write(&huge, vec![b'x'; PEM_FILE_BYTES_MAX as usize + 1]).unwrap();
    assert!(matches!(load_certs(&huge), Err(FileError::TooLarge { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}
