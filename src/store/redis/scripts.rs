//! The Lua scripts that make each step atomic on Redis. Each acts only while the lock
//! value still starts with the caller's token (32 hex characters; the request's
//! fingerprint follows), so a stale owner can never overwrite a newer record.
//!
//! Complete and release publish only when the id's `:w` key says someone waits (their
//! one `DEL` of the lock and the mark counts 2, the lock being known to exist): a waiter
//! sets it (in `BEGIN`, then on every poll, with a short expiry), and the publish it
//! saves on every other request was a message to every replica (measured: Redis misses
//! 16.6k req/s with a publish each). A waiter that misses a message still polls. The mark
//! is best effort: a Redis that refuses writes (`maxmemory` with `noeviction`) leaves
//! waiters to their polls rather than failing them.

use ::redis::{Cmd, Script};

use super::resp;

const BEGIN: &str = r#"
local rec = redis.call('GET', KEYS[1])
if rec then return {1, rec} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local holder = redis.call('GET', KEYS[2])
if not holder then return {3} end
redis.pcall('SET', KEYS[3], '1', 'PX', ARGV[3])
return {2, holder, redis.call('PTTL', KEYS[2])}
"#;

const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

const COMPLETE: &str = r#"
local v = redis.call('GET', KEYS[2])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if redis.call('DEL', KEYS[2], KEYS[3]) == 2 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"#;

const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 32) ~= ARGV[1] then return 0 end
if redis.call('DEL', KEYS[1], KEYS[2]) == 2 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"#;

/// A script and its source: a serving thread's own connection loads it by source after a
/// `NOSCRIPT`; redis-rs's connections load it through the `Script`.
pub(super) struct Lua {
    pub(super) script: Script,
    source: &'static str,
}

impl Lua {
    fn new(source: &'static str) -> Self {
        Lua {
            script: Script::new(source),
            source,
        }
    }

    /// `SCRIPT LOAD` of this script, as RESP.
    pub(super) fn write_load(&self, out: &mut Vec<u8>) {
        resp::write_array_len(out, 3);
        resp::write_bulk(out, b"SCRIPT");
        resp::write_bulk(out, b"LOAD");
        resp::write_bulk(out, self.source.as_bytes());
    }
}

pub(super) struct Scripts {
    pub(super) begin: Lua,
    pub(super) renew: Lua,
    pub(super) complete: Lua,
    pub(super) release: Lua,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            begin: Lua::new(BEGIN),
            renew: Lua::new(RENEW),
            complete: Lua::new(COMPLETE),
            release: Lua::new(RELEASE),
        }
    }
}

/// One argument of a script: bytes, or a number Redis reads from its decimal digits.
pub(super) enum Arg<'a> {
    Bytes(&'a [u8]),
    Int(u64),
}

/// An `EVALSHA` of `lua` on `keys` with `args`, written only when it is sent: straight
/// into a serving thread's connection buffer as RESP (the record copied once, into the
/// buffer the connection writes from), or as a redis-rs `Cmd` for its connections (TLS,
/// Unix sockets, Cluster).
pub(super) struct Call<'a> {
    pub(super) lua: &'a Lua,
    pub(super) keys: &'a [&'a str],
    pub(super) args: &'a [Arg<'a>],
}

impl Call<'_> {
    pub(super) fn write(&self, out: &mut Vec<u8>) {
        let script = &self.lua.script;
        resp::write_array_len(out, 3 + self.keys.len() + self.args.len());
        resp::write_bulk(out, b"EVALSHA");
        resp::write_bulk(out, script.get_hash().as_bytes());
        resp::write_bulk_int(out, self.keys.len() as u64);
        for key in self.keys {
            resp::write_bulk(out, key.as_bytes());
        }
        for arg in self.args {
            match arg {
                Arg::Bytes(bytes) => resp::write_bulk(out, bytes),
                Arg::Int(n) => resp::write_bulk_int(out, *n),
            }
        }
    }

    /// The same command for redis-rs, which routes a Cluster's commands by their keys.
    pub(super) fn cmd(&self) -> Cmd {
        // Sized once: a multi-MiB record would otherwise grow the buffer several times.
        let bytes = self.keys.iter().map(|k| k.len() + 16).sum::<usize>()
            + self
                .args
                .iter()
                .map(|a| match a {
                    Arg::Bytes(b) => b.len() + 16,
                    Arg::Int(_) => 36,
                })
                .sum::<usize>();
        let mut cmd = Cmd::with_capacity(3 + self.keys.len() + self.args.len(), 80 + bytes);
        cmd.arg("EVALSHA");
        cmd.arg(self.lua.script.get_hash()).arg(self.keys.len());
        for key in self.keys {
            cmd.arg(*key);
        }
        for arg in self.args {
            match arg {
                Arg::Bytes(bytes) => cmd.arg(*bytes),
                Arg::Int(n) => cmd.arg(*n),
            };
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our RESP and redis-rs's are the same bytes, so either connection sends one command.
    #[test]
    fn a_call_writes_what_redis_rs_would_send() {
        let scripts = Scripts::new();
        let record = vec![0u8, 13, 10, 255, b'$'];
        let call = Call {
            lua: &scripts.complete,
            keys: &["p:{ab}", "p:{ab}:lock", "p:{ab}:w"],
            args: &[
                Arg::Bytes(b"token"),
                Arg::Bytes(&record),
                Arg::Int(u64::MAX),
                Arg::Int(0),
                Arg::Bytes(b""),
            ],
        };
        let mut out = b"before".to_vec();
        call.write(&mut out);
        assert_eq!(&out[..6], b"before");
        assert_eq!(out[6..], call.cmd().get_packed_command()[..]);
        let mut load = Vec::new();
        scripts.begin.write_load(&mut load);
        let expected = ::redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(BEGIN)
            .get_packed_command();
        assert_eq!(load, expected);
    }
}
