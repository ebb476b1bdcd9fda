//! The file API: create, write, read, rename, remove, reopen.

mod common;

use common::*;
use portswitch_vault::{FileKind, SetAttr, VaultError, ROOT};

#[test]
fn write_read_reopen() {
    let d = TempDir::new("basic");
    let v = create(d.path());
    v.mkdir_all("/a/b").unwrap();
    let data = text(1, 100_000);
    v.write_file("/a/b/file.txt", &data).unwrap();
    assert_eq!(v.read_file("/a/b/file.txt").unwrap(), data);
    let big = noise(2, 3 << 20);
    v.write_file("/big", &big).unwrap();
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    assert_eq!(v.read_file("/a/b/file.txt").unwrap(), data);
    assert_eq!(v.read_file("/big").unwrap(), big);
    let names: Vec<_> = v.list("/").unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec![b"a".to_vec(), b"big".to_vec()]);
}

#[test]
fn partial_writes_holes_and_truncation() {
    let d = TempDir::new("partial");
    let v = create(d.path());
    let f = v.create_file(ROOT, b"f", 0o644).unwrap();
    let mut model = vec![0u8; 0];
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..300 {
        match rng.u8(..10) {
            0 => {
                let size = rng.u64(..40_000);
                v.setattr(
                    f.ino,
                    SetAttr {
                        size: Some(size),
                        ..Default::default()
                    },
                )
                .unwrap();
                model.resize(size as usize, 0);
            }
            1 => {
                v.commit().unwrap();
            }
            2 => {
                v.sync().unwrap();
            }
            _ => {
                let off = rng.usize(..30_000);
                let len = rng.usize(1..9000);
                let data = noise(round, len);
                v.write(f.ino, off as u64, &data).unwrap();
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&data);
            }
        }
        let mut buf = vec![0u8; model.len() + 100];
        let n = v.read(f.ino, 0, &mut buf).unwrap();
        assert_eq!(n, model.len(), "round {round}");
        assert_eq!(&buf[..n], &model[..], "round {round}");
        assert_eq!(v.getattr(f.ino).unwrap().size, model.len() as u64);
    }
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    assert_eq!(v.read_file("/f").unwrap(), model);
}

#[test]
fn namespace_operations() {
    let d = TempDir::new("ns");
    let v = create(d.path());
    let a = v.mkdir(ROOT, b"a", 0o755).unwrap();
    let f = v.create_file(a.ino, b"x", 0o600).unwrap();
    v.write(f.ino, 0, b"hello").unwrap();
    assert!(matches!(
        v.create_file(a.ino, b"x", 0o600),
        Err(VaultError::Exists)
    ));
    assert!(matches!(
        v.mkdir(ROOT, b"a/b", 0o755),
        Err(VaultError::InvalidName)
    ));
    assert!(matches!(
        v.mkdir(ROOT, &[b'n'; 256], 0o755),
        Err(VaultError::TooLarge { .. })
    ));
    assert!(matches!(v.rmdir(ROOT, b"a"), Err(VaultError::NotEmpty)));
    assert!(matches!(v.unlink(ROOT, b"a"), Err(VaultError::IsDir)));
    assert!(matches!(
        v.rename(ROOT, b"a", a.ino, b"inside"),
        Err(VaultError::Invalid(_))
    ));
    let s = v.symlink(ROOT, b"link", b"/a/x").unwrap();
    assert_eq!(v.readlink(s.ino).unwrap(), b"/a/x");
    assert_eq!(v.read_file("/link").unwrap(), b"hello");
    v.rename(a.ino, b"x", ROOT, b"y").unwrap();
    assert!(matches!(v.lookup(a.ino, b"x"), Err(VaultError::NotFound)));
    // Rename over an existing file replaces it.
    v.write_file("/z", b"old").unwrap();
    v.rename(ROOT, b"y", ROOT, b"z").unwrap();
    assert_eq!(v.read_file("/z").unwrap(), b"hello");
    v.rmdir(ROOT, b"a").unwrap();
    v.sync().unwrap();
    drop(v);
    let v = open(d.path());
    let mut names: Vec<_> = v
        .readdir(ROOT)
        .unwrap()
        .into_iter()
        .map(|e| (String::from_utf8(e.name).unwrap(), e.kind))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        names,
        vec![
            ("link".to_string(), FileKind::Symlink),
            ("z".to_string(), FileKind::File)
        ]
    );
    assert_eq!(v.read_file("/z").unwrap(), b"hello");
    assert_eq!(v.getattr(v.resolve("/z").unwrap().ino).unwrap().mode, 0o600);
}
