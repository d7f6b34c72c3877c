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

pub(super) struct Scripts {
    pub(super) begin: Script,
    pub(super) renew: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            begin: Script::new(BEGIN),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }
}

/// An `EVALSHA` of `script` on `keys`, built straight into one command buffer; the
/// caller appends `args` arguments of about `bytes` bytes in all. (A `ScriptInvocation`
/// keeps a copy of each key and argument, the record included, before building the
/// same command.)
pub(super) fn evalsha(script: &Script, keys: &[&str], args: usize, bytes: usize) -> Cmd {
    let key_bytes: usize = keys.iter().map(|k| k.len() + 16).sum();
    let mut cmd = Cmd::with_capacity(3 + keys.len() + args, 80 + key_bytes + bytes);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}
