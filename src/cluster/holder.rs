//! Who holds a lease: the value of the lease key.

use serde::{Deserialize, Serialize};

/// An instance, as the lease key names it. Serialized as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holder {
    pub host: String,
    pub pid: u32,
    /// The id of the instance's store (see `Store::instance_id`).
    pub store: String,
    /// The store's directory.
    pub path: String,
    /// When the instance started, Unix ms.
    pub since: u64,
}

/// The longest lease value read: a holder is a few hundred bytes.
const MAX_VALUE: usize = 4096;

impl Holder {
    /// This process, serving from the store `store` at `path`.
    pub fn this_process(store: String, path: &std::path::Path, since: u64) -> Holder {
        Holder {
            host: host_name(),
            pid: std::process::id(),
            store,
            path: path.display().to_string(),
            since,
        }
    }

    /// Whether `other` served from this very store: the same store id in the same directory
    /// on the same host. Only one process can have a store open at a time (sled locks it), so
    /// such a holder is a predecessor of this process that died without giving the lease
    /// back, and its lease may be taken over at once instead of after it ages out. (A store
    /// directory copied to another host or path has another holder identity.)
    pub fn same_store(&self, other: &Holder) -> bool {
        self.store == other.store && self.host == other.host && self.path == other.path
    }

    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    /// Reads a lease value written by any instance (or anyone else who could write the key).
    pub fn decode(value: &[u8]) -> Result<Holder, String> {
        if value.len() > MAX_VALUE {
            return Err(format!("a lease value of {} bytes", value.len()));
        }
        serde_json::from_slice(value).map_err(|_| {
            let shown = String::from_utf8_lossy(&value[..value.len().min(200)]).into_owned();
            format!("an unreadable lease value {shown:?}")
        })
    }

    /// How logs and `stats` name it; every field escaped.
    pub fn describe(&self) -> String {
        format!(
            "host {:?} pid {} store {:?} at {:?}",
            self.host, self.pid, self.store, self.path
        )
    }
}

fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return "unknown".to_owned();
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_identity() {
        let me = Holder::this_process("01J".into(), std::path::Path::new("/var/lib/x"), 7);
        let back = Holder::decode(&me.encode()).unwrap();
        assert_eq!(back, me);
        assert!(me.same_store(&back));
        let elsewhere = Holder {
            path: "/var/lib/y".into(),
            ..me.clone()
        };
        assert!(!me.same_store(&elsewhere));
        let other_host = Holder {
            host: "other".into(),
            ..me.clone()
        };
        assert!(!me.same_store(&other_host));
    }

    #[test]
    fn hostile_values_are_refused_escaped() {
        let err = Holder::decode(b"\x1b[2J\"}{").unwrap_err();
        assert!(err.contains("\\u{1b}"), "{err}");
        assert!(!err.contains('\x1b'));
        assert!(Holder::decode(&vec![b'a'; MAX_VALUE + 1]).is_err());
        let odd = Holder {
            host: "h\n\"x".into(),
            pid: 1,
            store: "s".into(),
            path: "p".into(),
            since: 0,
        };
        assert!(!odd.describe().contains('\n'));
    }
}
