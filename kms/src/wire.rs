//! One KMIP request and its response on a stream: kmip-protocol's types and
//! TTLV encoding, without its client module (which it compiles only with
//! one of its own TLS stacks; ours is `tls`).
//!
//! No copy of a response is kept for diagnostics: responses carry keys.

use std::cell::RefCell;
use std::io::{Read, Write};

use kmip_protocol::types::common::Operation;
use kmip_protocol::types::request::RequestPayload;
use kmip_protocol::types::response::{
    ResponseMessage, ResponsePayload, ResultReason, ResultStatus,
};
use kmip_ttlv::error::ErrorKind;

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
        let bytes = kmip_protocol::request::to_vec(payload, None)
            .map_err(|e| WireError::Server(format!("cannot encode {operation:?}: {e}")))?;
        // Sizes and operations only: contents carry keys.
        tracing::debug!(?operation, bytes = bytes.len(), "KMIP request");
        let mut stream = self.stream.borrow_mut();
        stream
            .write_all(&bytes)
            .and_then(|()| stream.flush())
            .map_err(|e| WireError::Connection(e.to_string()))?;
        let config = kmip_ttlv::Config::default().with_max_bytes(MAX_RESPONSE_BYTES);
        let res: ResponseMessage =
            kmip_ttlv::from_reader(&mut *stream, &config).map_err(|e| match e.kind() {
                ErrorKind::IoError(io) => WireError::Connection(io.to_string()),
                _ => WireError::Server(format!("unreadable response to {operation:?}: {e}")),
            })?;
        let r = one_result(operation, res);
        tracing::debug!(?operation, ok = r.is_ok(), "KMIP response");
        r
    }
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
