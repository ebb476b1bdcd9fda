//! Port names as a session keeps them.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

use bytes::Bytes;

/// A port name: inline when short (most names, no allocation per request), shared
/// bytes otherwise. Hashes and compares as its bytes, so maps keyed by names are
/// looked up with a plain `&[u8]`.
#[derive(Clone)]
pub(crate) enum Name {
    Inline {
        len: u8,
        bytes: [u8; NAME_INLINE_MAX],
    },
    Heap(Bytes),
}

/// The longest name kept inline by [`Name`].
pub(crate) const NAME_INLINE_MAX: usize = 30;

impl Name {
    pub fn new(port: &[u8]) -> Name {
        if port.len() <= NAME_INLINE_MAX {
            let mut bytes = [0; NAME_INLINE_MAX];
            bytes[..port.len()].copy_from_slice(port);
            Name::Inline {
                len: port.len() as u8,
                bytes,
            }
        } else {
            Name::Heap(Bytes::copy_from_slice(port))
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..*len as usize],
            Name::Heap(b) => b,
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        match self {
            Name::Heap(b) => b.clone(),
            inline => Bytes::copy_from_slice(inline.as_slice()),
        }
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_slice()))
    }
}

impl Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_slice().hash(h)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Name {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_short_and_long_are_found_by_their_bytes() {
        let mut owned: hashbrown::HashSet<Name, foldhash::fast::RandomState> =
            hashbrown::HashSet::default();
        let short = b"p-1".to_vec();
        let edge = vec![b'e'; NAME_INLINE_MAX];
        let long = vec![b'l'; NAME_INLINE_MAX + 1];
        for n in [&short, &edge, &long] {
            assert!(owned.insert(Name::new(n)));
        }
        assert!(matches!(Name::new(&edge), Name::Inline { .. }));
        assert!(matches!(Name::new(&long), Name::Heap(_)));
        assert!(
            !owned.insert(Name::new(&short)),
            "the same bytes are one name"
        );
        for n in [&short, &edge, &long] {
            assert!(owned.contains(n.as_slice()));
        }
        assert!(owned.remove(long.as_slice()));
        assert!(!owned.contains(&b"p-"[..]));
        let mut back: Vec<Bytes> = owned.iter().map(Name::to_bytes).collect();
        back.sort();
        assert_eq!(back, vec![Bytes::from(edge), Bytes::from(short)]);
    }
}
