//! One KMIP request and its response on a stream: kmip-protocol's types and
//! TTLV encoding, without its client module (which it compiles only with
//! one of its own TLS stacks; ours is `tls`).
//!
//! No copy of a response is kept for diagnostics: responses carry keys.
//! The raw bytes of each request and response are zeroed once decoded
//! (what the TLS library buffers inside is its own).

use std::cell::RefCell;
use std::io::{Read, Write};

use kmip_protocol::types::common::Operation;
use kmip_protocol::types::request::RequestPayload;
use kmip_protocol::types::response::{
    ResponseMessage, ResponsePayload, ResultReason, ResultStatus,
};
use zeroize::Zeroizing;

/// Largest KMIP response accepted.
pub const MAX_RESPONSE_BYTES: u32 = 1 << 20;

/// What went wrong with one exchange.
#[derive(Debug)]
pub enum WireError {
    /// The connection failed (write, read, end of stream): another server,
    /// or a later try, may answer.
    Connection(String),
    /// The server answered that the object does not exist.
    NotFound(String),
    /// The server refused the operation, or answered something unusable.
    Server(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Connection(m) => write!(f, "I/O error: {m}"),
            WireError::NotFound(m) | WireError::Server(m) => f.write_str(m),
        }
    }
}

/// A KMIP client on one stream; requests go one at a time.
pub struct Wire<T> {
    stream: RefCell<T>,
}

impl<T: Read + Write> Wire<T> {
    pub fn new(stream: T) -> Self {
        Wire {
            stream: RefCell::new(stream),
        }
    }

    /// Sends `payload` and returns the response's payload.
    pub fn request(&self, payload: RequestPayload) -> Result<ResponsePayload, WireError> {
        let operation = payload.operation();
        // A Register carries key bytes: the encoded request is zeroed too.
        let bytes = Zeroizing::new(
            kmip_protocol::request::to_vec(payload, None)
                .map_err(|e| WireError::Server(format!("cannot encode {operation:?}: {e}")))?,
        );
        // Sizes and operations only: contents carry keys.
        tracing::debug!(?operation, bytes = bytes.len(), "KMIP request");
        let mut stream = self.stream.borrow_mut();
        stream
            .write_all(&bytes)
            .and_then(|()| stream.flush())
            .map_err(|e| WireError::Connection(e.to_string()))?;
        let raw = read_message(&mut *stream)?;
        let res: ResponseMessage = kmip_ttlv::from_slice(&raw)
            .map_err(|e| WireError::Server(format!("unreadable response to {operation:?}: {e}")))?;
        drop(raw);
        let r = one_result(operation, res);
        tracing::debug!(?operation, ok = r.is_ok(), "KMIP response");
        r
    }
}

/// Reads one TTLV message (an 8-byte tag, type and length, then the
/// value) into a buffer that is zeroed when dropped: a Get's response
/// holds the key. The buffer is allocated once at its full size, so no
/// reallocation leaves a copy behind.
fn read_message(stream: &mut impl Read) -> Result<Zeroizing<Vec<u8>>, WireError> {
    let io = |e: std::io::Error| WireError::Connection(e.to_string());
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).map_err(io)?;
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RESPONSE_BYTES - 8 {
        return Err(WireError::Server(format!(
            "response of {len} bytes, more than the {MAX_RESPONSE_BYTES} accepted"
        )));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(8 + len as usize));
    buf.extend_from_slice(&head);
    buf.resize(8 + len as usize, 0);
    stream.read_exact(&mut buf[8..]).map_err(io)?;
    Ok(buf)
}

/// The payload of the single batch item a response to `operation` carries.
fn one_result(
    operation: Operation,
    mut res: ResponseMessage,
) -> Result<ResponsePayload, WireError> {
    if res.header.batch_count != 1 || res.batch_items.len() != 1 {
        return Err(WireError::Server(format!(
            "expected one batch item in the response to {operation:?}, got {}",
            res.batch_items.len()
        )));
    }
    let item = &mut res.batch_items[0];
    let message = || item.result_message.clone().unwrap_or_default();
    match item.result_status {
        ResultStatus::Success if item.operation == Some(operation) => {
            item.payload.take().ok_or_else(|| {
                WireError::Server(format!("the response to {operation:?} has no payload"))
            })
        }
        ResultStatus::Success => Err(WireError::Server(format!(
            "the response to {operation:?} is for {:?}",
            item.operation
        ))),
        ResultStatus::OperationFailed
            if matches!(item.result_reason, Some(ResultReason::ItemNotFound)) =>
        {
            Err(WireError::NotFound(format!(
                "Operation {operation:?} failed: {}",
                message()
            )))
        }
        ResultStatus::OperationFailed => Err(WireError::Server(format!(
            "Operation {operation:?} failed: {}",
            message()
        ))),
        // Pending, undone, or a status newer than this client knows.
        _ => Err(WireError::Server(format!(
            "{operation:?}: result status {:?} is not supported",
            item.result_status
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_whole_and_bounded() {
        let mut msg = vec![0x42, 0x00, 0x7b, 0x01, 0, 0, 0, 8];
        msg.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        msg.extend_from_slice(b"next message");
        let mut r = &msg[..];
        assert_eq!(&read_message(&mut r).unwrap()[..], &msg[..16]);
        assert_eq!(r, b"next message");
        let huge = [0x42, 0x00, 0x7b, 0x01, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_message(&mut &huge[..]),
            Err(WireError::Server(_))
        ));
        let short = [0x42, 0x00, 0x7b, 0x01, 0, 0, 0, 8, 1, 2];
        assert!(matches!(
            read_message(&mut &short[..]),
            Err(WireError::Connection(_))
        ));
    }
}
