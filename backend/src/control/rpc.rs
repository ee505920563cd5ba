//! JSON-RPC 2.0 framing: parse a request line, answer with a result or an
//! error line. Notifications (requests without an id) get no answer, as
//! the spec says; batches are not supported.

use serde_json::{json, Value};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A JSON-RPC error: code and a message that names the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn parse(message: impl Into<String>) -> Self {
        RpcError {
            code: -32700,
            message: message.into(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        RpcError {
            code: -32600,
            message: message.into(),
        }
    }

    pub fn method_not_found(method: &str, known: &[&str]) -> Self {
        RpcError {
            code: -32601,
            message: format!("unknown method '{method}' (known: {})", known.join(", ")),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        RpcError {
            code: -32602,
            message: message.into(),
        }
    }

    /// The method ran and failed.
    pub fn server(message: impl Into<String>) -> Self {
        RpcError {
            code: -32000,
            message: message.into(),
        }
    }
}

/// Answers one request line (without the answer for a notification).
pub fn handle(line: &[u8], call: impl FnOnce(&str, &Value) -> Result<Value, RpcError>) -> String {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_line(Value::Null, &RpcError::parse(format!("not JSON: {e}"))),
    };
    let Some(obj) = req.as_object() else {
        return error_line(
            Value::Null,
            &RpcError::invalid_request("expected a JSON object (batches are not supported)"),
        );
    };
    let id = obj.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc") != Some(&Value::from("2.0")) {
        return error_line(
            reply_id,
            &RpcError::invalid_request("\"jsonrpc\" must be \"2.0\""),
        );
    }
    if !matches!(
        id,
        None | Some(Value::Null | Value::Number(_) | Value::String(_))
    ) {
        return error_line(
            Value::Null,
            &RpcError::invalid_request("\"id\" must be a number, a string or null"),
        );
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return error_line(
            reply_id,
            &RpcError::invalid_request("\"method\" must be a string"),
        );
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return error_line(
            reply_id,
            &RpcError::invalid_request("\"params\" must be an object or an array"),
        );
    }
    let result = call(method, &params);
    if id.is_none() {
        return String::new();
    }
    match result {
        Ok(v) => line_of(json!({"jsonrpc": "2.0", "id": reply_id, "result": v})),
        Err(e) => error_line(reply_id, &e),
    }
}

/// Methods without parameters accept none, `{}` or `[]`.
pub fn no_params(params: &Value) -> Result<(), RpcError> {
    match params {
        Value::Null => Ok(()),
        Value::Object(o) if o.is_empty() => Ok(()),
        Value::Array(a) if a.is_empty() => Ok(()),
        _ => Err(RpcError::invalid_params("this method takes no parameters")),
    }
}

pub fn error_line(id: Value, e: &RpcError) -> String {
    line_of(json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": e.code, "message": e.message},
    }))
}

fn line_of(v: Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(line: &str) -> Value {
        let out = handle(line.as_bytes(), |m, p| match m {
            "echo" => Ok(p.clone()),
            "fail" => Err(RpcError::server("it failed")),
            other => Err(RpcError::method_not_found(other, &["echo", "fail"])),
        });
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn results_and_errors_carry_the_id() {
        let a = answer(r#"{"jsonrpc":"2.0","id":7,"method":"echo","params":{"x":1}}"#);
        assert_eq!(a["id"], 7);
        assert_eq!(a["result"]["x"], 1);
        let a = answer(r#"{"jsonrpc":"2.0","id":"a","method":"fail"}"#);
        assert_eq!(
            (a["id"].as_str(), a["error"]["code"].as_i64()),
            (Some("a"), Some(-32000))
        );
        let a = answer(r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#);
        assert_eq!(a["error"]["code"], -32601);
        assert!(a["error"]["message"].as_str().unwrap().contains("'nope'"));
    }

    #[test]
    fn malformed_requests_get_the_right_code() {
        for (line, code) in [
            ("{not json", -32700),
            ("[1,2]", -32600),
            (r#"{"id":1,"method":"echo"}"#, -32600),
            (r#"{"jsonrpc":"2.0","id":1,"method":5}"#, -32600),
            (r#"{"jsonrpc":"2.0","id":{},"method":"echo"}"#, -32600),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":3}"#,
                -32600,
            ),
        ] {
            assert_eq!(answer(line)["error"]["code"], code, "{line}");
        }
    }

    #[test]
    fn notifications_get_no_answer() {
        let out = handle(br#"{"jsonrpc":"2.0","method":"echo"}"#, |_, _| {
            Ok(Value::Null)
        });
        assert!(out.is_empty());
    }
}
