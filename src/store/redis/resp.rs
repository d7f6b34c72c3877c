//! RESP2 replies as [`pipe`](super::pipe) reads them: one whole reply at the start of a
//! buffer, or `None` while it is still arriving. A server's error reply becomes the
//! `RedisError` redis-rs would have made of it (`NOSCRIPT` keeps its kind, so a call
//! can load its script and try again). Commands go the other way as arrays of bulk
//! strings, written by [`write_array_len`] and [`write_bulk`].

use ::redis::{ErrorKind, RedisError, ServerErrorKind, Value};

/// A reply and the bytes it took, once complete; `Err` for bytes no server would send.
pub(super) type Parsed = Option<(Result<Value, RedisError>, usize)>;

/// Nesting deeper than this is refused rather than followed: the parser recurses, and a
/// broken server's `*1` after `*1` must not exhaust a serving thread's stack (redis-rs
/// stops at the same depth).
const MAX_DEPTH: usize = 100;

pub(super) fn parse(buf: &[u8]) -> Result<Parsed, String> {
    Ok(value(buf, 0, 0)?.map(|(reply, end)| (reply.map_err(|e| server_error(&e)), end)))
}

/// The value starting at `at` (an error reply as its text) and where it ends.
type Item = Option<(Result<Value, String>, usize)>;

fn value(buf: &[u8], at: usize, depth: usize) -> Result<Item, String> {
    if depth > MAX_DEPTH {
        return Err(format!("a reply nested deeper than {MAX_DEPTH}"));
    }
    let Some((kind, text, next)) = line(buf, at) else {
        return Ok(None);
    };
    let reply = match kind {
        b'+' if text == b"OK" => Ok(Value::Okay),
        b'+' => Ok(Value::SimpleString(lossy(text))),
        b'-' => Err(lossy(text)),
        b':' => Ok(Value::Int(number(text)?)),
        b'$' => return bulk(buf, length(text)?, next),
        b'*' => return array(buf, length(text)?, next, depth),
        other => return Err(format!("unexpected reply type {:?}", other as char)),
    };
    Ok(Some((reply, next)))
}

/// `None` for a nil (`-1`).
fn bulk(buf: &[u8], len: Option<usize>, at: usize) -> Result<Item, String> {
    let Some(len) = len else {
        return Ok(Some((Ok(Value::Nil), at)));
    };
    let end = at.checked_add(len).ok_or("a bulk string too long")?;
    match buf.get(end..end.saturating_add(2)) {
        None => Ok(None),
        Some(b"\r\n") => Ok(Some((
            Ok(Value::BulkString(buf[at..end].to_vec())),
            end + 2,
        ))),
        Some(_) => Err("a bulk string longer than its length".into()),
    }
}

/// `None` for a nil (`-1`). An error among the items is the whole reply's error, as
/// redis-rs makes it.
fn array(buf: &[u8], len: Option<usize>, mut at: usize, depth: usize) -> Result<Item, String> {
    let Some(len) = len else {
        return Ok(Some((Ok(Value::Nil), at)));
    };
    // Not `with_capacity(len)`: the length is the server's word, the bytes are not here yet.
    let mut items = Vec::new();
    let mut failed = None;
    for _ in 0..len {
        let Some((item, next)) = value(buf, at, depth + 1)? else {
            return Ok(None);
        };
        match item {
            Ok(v) => items.push(v),
            Err(e) => failed = failed.or(Some(e)),
        }
        at = next;
    }
    let reply = match failed {
        Some(e) => Err(e),
        None => Ok(Value::Array(items)),
    };
    Ok(Some((reply, at)))
}

/// The type byte at `at`, the text after it up to `\r\n`, and where the next line starts.
fn line(buf: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let kind = *buf.get(at)?;
    let rest = buf.get(at + 1..)?;
    let len = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((kind, &rest[..len], at + 1 + len + 2))
}

/// A bulk string's or an array's length: `None` for `-1` (nil), an error for any other
/// negative number or one this machine cannot address.
fn length(text: &[u8]) -> Result<Option<usize>, String> {
    match number(text)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .map(Some)
            .map_err(|_| format!("not a length: {n}")),
    }
}

fn number(text: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("not a number: {:?}", lossy(text)))
}

fn lossy(text: &[u8]) -> String {
    String::from_utf8_lossy(text).into_owned()
}

/// The kinds redis-rs gives the error codes it knows; any other error keeps its code in
/// its text.
fn server_error(text: &str) -> RedisError {
    let (code, detail) = text.split_once(' ').unwrap_or((text, ""));
    let kind = match code {
        "NOSCRIPT" => ServerErrorKind::NoScript,
        "EXECABORT" => ServerErrorKind::ExecAbort,
        "LOADING" => ServerErrorKind::BusyLoading,
        "MOVED" => ServerErrorKind::Moved,
        "ASK" => ServerErrorKind::Ask,
        "TRYAGAIN" => ServerErrorKind::TryAgain,
        "CLUSTERDOWN" => ServerErrorKind::ClusterDown,
        "CROSSSLOT" => ServerErrorKind::CrossSlot,
        "MASTERDOWN" => ServerErrorKind::MasterDown,
        "READONLY" => ServerErrorKind::ReadOnly,
        "NOTBUSY" => ServerErrorKind::NotBusy,
        "NOPERM" => ServerErrorKind::NoPerm,
        _ => {
            let kind = ErrorKind::Server(ServerErrorKind::ResponseError);
            return RedisError::from((kind, "Redis answered with an error", text.to_string()));
        }
    };
    let kind = ErrorKind::Server(kind);
    RedisError::from((kind, "Redis answered with an error", detail.to_string()))
}

/// The start of a command as redis-server reads it: an array of `len` bulk strings.
pub(super) fn write_array_len(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(super) fn write_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(itoa::Buffer::new().format(bytes.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// A number as Redis takes one in a command: its decimal digits, as a bulk string.
pub(super) fn write_bulk_int(out: &mut Vec<u8>, n: u64) {
    write_bulk(out, itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Result<Value, RedisError> {
        match parse(bytes) {
            Ok(Some((reply, used))) => {
                assert_eq!(used, bytes.len(), "{bytes:?}");
                reply
            }
            other => panic!("{bytes:?}: {other:?}"),
        }
    }

    #[test]
    fn reads_each_kind_of_reply() {
        assert_eq!(whole(b"+OK\r\n").ok(), Some(Value::Okay));
        assert_eq!(whole(b":-12\r\n").ok(), Some(Value::Int(-12)));
        assert_eq!(whole(b"$-1\r\n").ok(), Some(Value::Nil));
        assert_eq!(
            whole(b"$5\r\na\r\nbc\r\n").ok(),
            Some(Value::BulkString(b"a\r\nbc".to_vec()))
        );
        let nested = b"*3\r\n:1\r\n$2\r\nhi\r\n*1\r\n:7\r\n";
        let expected = Value::Array(vec![
            Value::Int(1),
            Value::BulkString(b"hi".to_vec()),
            Value::Array(vec![Value::Int(7)]),
        ]);
        assert_eq!(whole(nested).ok(), Some(expected));
        let e = whole(b"-NOSCRIPT No matching script.\r\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server(ServerErrorKind::NoScript));
        let e = whole(b"-ERR wrong number of arguments\r\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server(ServerErrorKind::ResponseError));
        assert!(e.to_string().contains("wrong number of arguments"), "{e}");
    }

    #[test]
    fn waits_for_every_byte_of_a_reply_and_takes_no_more() {
        let reply = b"*2\r\n:0\r\n$3\r\nabc\r\n";
        for cut in 0..reply.len() {
            assert!(matches!(parse(&reply[..cut]), Ok(None)), "cut at {cut}");
        }
        let mut two = reply.to_vec();
        two.extend_from_slice(b":5\r\n");
        let Ok(Some((_, used))) = parse(&two) else {
            panic!("not parsed");
        };
        assert_eq!(used, reply.len());
    }

    #[test]
    fn refuses_bytes_no_server_sends() {
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b":12a\r\n").is_err());
        assert!(parse(b"$2\r\nabc\r\n").is_err());
        assert!(parse(b"$-2\r\n").is_err());
        assert!(parse(b"*-7\r\n").is_err());
        assert!(parse(b"$9223372036854775807\r\nab").is_ok_and(|p| p.is_none()));
    }

    #[test]
    fn refuses_nesting_deeper_than_redis_rs_follows() {
        let deep = b"*1\r\n".repeat(100_000);
        assert!(parse(&deep).is_err());
        let mut ok = b"*1\r\n".repeat(MAX_DEPTH);
        ok.extend_from_slice(b":1\r\n");
        assert!(matches!(parse(&ok), Ok(Some((Ok(_), _)))));
    }
}
