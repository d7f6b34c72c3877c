//! The names one record id takes in Redis, rendered once per store call: `{prefix}{<hex
//! id>}` for the record, the same plus `:lock` for its lease and `:w` for its waiters'
//! mark (the braces are a hash tag, so all three share a Cluster slot).

use crate::store::{push_hex, RecordId};

pub(super) struct Keys {
    /// `{prefix}{<hex id>}:lock`; the record's key is its start.
    lock: String,
    waiting: String,
    /// Where the id's hex starts in `lock`, and where the record's key ends.
    hex_start: usize,
    record_len: usize,
}

impl Keys {
    pub(super) fn new(prefix: &str, id: RecordId) -> Self {
        let record_len = prefix.len() + 2 + 2 * id.0.len();
        let mut lock = String::with_capacity(record_len + ":lock".len());
        lock.push_str(prefix);
        lock.push('{');
        push_hex(&mut lock, &id.0);
        lock.push('}');
        let mut waiting = String::with_capacity(record_len + ":w".len());
        waiting.push_str(&lock);
        waiting.push_str(":w");
        lock.push_str(":lock");
        Keys {
            lock,
            waiting,
            hex_start: prefix.len() + 1,
            record_len,
        }
    }

    pub(super) fn record(&self) -> &str {
        &self.lock[..self.record_len]
    }

    pub(super) fn lock(&self) -> &str {
        &self.lock
    }

    pub(super) fn waiting(&self) -> &str {
        &self.waiting
    }

    /// The `events` message about this id: `<hex id>:c` (completed) or `:r` (released).
    pub(super) fn message(&self, kind: &str) -> String {
        let hex = &self.lock[self.hex_start..self.record_len - 1];
        let mut message = String::with_capacity(hex.len() + kind.len());
        message.push_str(hex);
        message.push_str(kind);
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_hash_tag() {
        let id = RecordId([0xab; 32]);
        let keys = Keys::new("idem:", id);
        let hex = "ab".repeat(32);
        assert_eq!(keys.record(), format!("idem:{{{hex}}}"));
        assert_eq!(keys.lock(), format!("idem:{{{hex}}}:lock"));
        assert_eq!(keys.waiting(), format!("idem:{{{hex}}}:w"));
        assert_eq!(keys.message(":c"), format!("{hex}:c"));
        assert_eq!(Keys::new("", id).message(":r"), format!("{hex}:r"));
    }
}
