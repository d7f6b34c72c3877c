//! A completed exchange and its one byte encoding, shared by every backend. The encoding
//! is owned and contiguous: a record never keeps a read buffer of hyper's alive, so the
//! bytes a store counts are the bytes the process holds.
//!
//! Layout (all integers big-endian):
//! `"IGR" version:u8 fingerprint:[u8;32] status:u16 headers:u16
//!  (name_len:u16 name value_len:u32 value)* has_body:u8 [body_len:u32 body]`

use bytes::{BufMut, Bytes};
use http::{HeaderName, HeaderValue, StatusCode};

use super::{Fingerprint, StoreError};

const MAGIC: &[u8; 3] = b"IGR";
/// Bumped whenever the layout changes; a newer record is refused, never misread.
pub const FORMAT_VERSION: u8 = 1;

/// A completed exchange as it will be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub fingerprint: Fingerprint,
    pub status: StatusCode,
    /// End-to-end headers only; hop-by-hop ones never reach a record.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `None` when the body was larger than `max_stored_response` (retries get 410).
    pub body: Option<Bytes>,
}

/// A record's bytes as every store keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(Bytes);

impl Encoded {
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// What the record weighs against `store.max_bytes`.
    pub fn weight(&self) -> u64 {
        self.0.len() as u64
    }

    /// Wraps bytes read back from a store; checked when decoded.
    pub fn from_stored(bytes: Bytes) -> Self {
        Encoded(bytes)
    }

    /// The fingerprint alone, without decoding the rest.
    pub fn fingerprint(&self) -> Result<Fingerprint, StoreError> {
        let mut r = Reader::new(&self.0);
        r.header()?;
        Ok(Fingerprint(r.array()?))
    }

    pub fn decode(&self) -> Result<Record, StoreError> {
        let mut r = Reader::new(&self.0);
        r.header()?;
        let fingerprint = Fingerprint(r.array()?);
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| corrupt("status"))?;
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = r.u16()? as usize;
            let name = HeaderName::from_bytes(r.take(len)?).map_err(|_| corrupt("header name"))?;
            let len = r.u32()? as usize;
            let value = r.slice(len)?;
            let value =
                HeaderValue::from_maybe_shared(value).map_err(|_| corrupt("header value"))?;
            headers.push((name, value));
        }
        let body = match r.u8()? {
            0 => None,
            _ => {
                let len = r.u32()? as usize;
                Some(r.slice(len)?)
            }
        };
        if r.pos != self.0.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Record {
            fingerprint,
            status,
            headers,
            body,
        })
    }
}

impl Record {
    /// One exact-size allocation holding everything, copied out of whatever buffers the
    /// parts came from.
    pub fn encode(&self) -> Result<Encoded, StoreError> {
        let body_len = self.body.as_ref().map_or(0, |b| b.len() + 4);
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(3 + 1 + 32 + 2 + 2 + headers_len + 1 + body_len);
        out.put_slice(MAGIC);
        out.put_u8(FORMAT_VERSION);
        out.put_slice(&self.fingerprint.0);
        out.put_u16(self.status.as_u16());
        let count = u16::try_from(self.headers.len()).map_err(|_| corrupt("too many headers"))?;
        out.put_u16(count);
        for (name, value) in &self.headers {
            let n = u16::try_from(name.as_str().len()).map_err(|_| corrupt("header name"))?;
            let v = u32::try_from(value.len()).map_err(|_| corrupt("header value"))?;
            out.put_u16(n);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(v);
            out.put_slice(value.as_bytes());
        }
        match &self.body {
            None => out.put_u8(0),
            Some(body) => {
                out.put_u8(1);
                out.put_u32(u32::try_from(body.len()).map_err(|_| corrupt("body"))?);
                out.put_slice(body);
            }
        }
        Ok(Encoded(Bytes::from(out)))
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("record encoding: bad {what}"))
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    fn header(&mut self) -> Result<(), StoreError> {
        if self.take(3)? != MAGIC {
            return Err(corrupt("magic"));
        }
        match self.u8()? {
            FORMAT_VERSION => Ok(()),
            v => Err(StoreError::Corrupt(format!(
                "record format version {v} is newer than this idemgate understands ({FORMAT_VERSION})"
            ))),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| corrupt("length"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn slice(&mut self, n: usize) -> Result<Bytes, StoreError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: Option<&'static [u8]>) -> Record {
        Record {
            fingerprint: Fingerprint([7; 32]),
            status: StatusCode::CREATED,
            headers: vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("set-cookie"),
                    HeaderValue::from_static("a=1"),
                ),
                (
                    HeaderName::from_static("set-cookie"),
                    HeaderValue::from_static("b=2"),
                ),
            ],
            body: body.map(Bytes::from_static),
        }
    }

    #[test]
    fn round_trips_exactly() {
        for body in [Some(&b"{\"id\":1}"[..]), Some(&b""[..]), None] {
            let record = sample(body);
            let encoded = record.encode().unwrap(); // ok: test
            assert_eq!(encoded.decode().unwrap(), record); // ok: test
            assert_eq!(encoded.fingerprint().unwrap(), record.fingerprint); // ok: test
            assert_eq!(encoded.weight(), encoded.as_bytes().len() as u64);
        }
    }

    #[test]
    fn truncated_corrupt_or_future_records_are_refused() {
        let bytes = sample(Some(b"body")).encode().unwrap().as_bytes().clone(); // ok: test
        for cut in 0..bytes.len() {
            assert!(
                Encoded::from_stored(bytes.slice(..cut)).decode().is_err(),
                "cut at {cut}"
            );
        }
        let mut future = bytes.to_vec();
        future[3] = FORMAT_VERSION + 1;
        let err = Encoded::from_stored(Bytes::from(future))
            .decode()
            .unwrap_err(); // ok: test
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
