//! Database names as SQLite passes them, turned into vault paths.
//!
//! A name is a path inside the vault: `app.db`, `/app.db` and `./app.db` are the same
//! file; `data/app.db` lives in the vault directory `/data` (which must exist). SQLite
//! derives the journal and WAL names from the full path (`/app.db-journal`,
//! `/app.db-wal`), so they land beside the database.

/// Bytes of a full path (`mxPathname` of the VFS): SQLite's own default limit.
pub(crate) const PATH_BYTES_MAX: usize = 512;

/// The canonical vault path of `name`: absolute, `.` and empty parts dropped, `..`
/// applied (never above the root). `None` when it names the root itself or exceeds
/// [`PATH_BYTES_MAX`].
pub(crate) fn full(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(name.len() + 1);
    for p in parts {
        out.push('/');
        out.push_str(p);
    }
    (out.len() <= PATH_BYTES_MAX).then_some(out)
}

/// Splits a canonical path into its parent directory's path and its last name.
pub(crate) fn split(full: &str) -> (&str, &str) {
    match full.rfind('/') {
        Some(0) => ("/", &full[1..]),
        Some(i) => (&full[..i], &full[i + 1..]),
        None => ("/", full),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical() {
        assert_eq!(full("app.db").as_deref(), Some("/app.db"));
        assert_eq!(full("/app.db").as_deref(), Some("/app.db"));
        assert_eq!(full("./d//x/../app.db").as_deref(), Some("/d/app.db"));
        assert_eq!(full("../../app.db").as_deref(), Some("/app.db"));
        assert_eq!(full("/"), None);
        assert_eq!(full(""), None);
        assert_eq!(full(&"a".repeat(600)), None);
        assert_eq!(split("/app.db"), ("/", "app.db"));
        assert_eq!(split("/d/e/app.db-wal"), ("/d/e", "app.db-wal"));
    }
}
