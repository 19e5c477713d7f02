//! A minimal blocking client of the agent's HTTP API on its unix socket.
//!
//! The bench times API calls end to end; a plain HTTP/1.1 exchange over a
//! [`UnixStream`] needs no async runtime and adds nothing to the timing but
//! the request itself.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// How long one API call may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's API at one socket.
#[derive(Clone, Debug)]
pub struct Api {
    socket: PathBuf,
}

impl Api {
    /// The API served on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// Sends `method path` with an optional JSON body; returns the answer's
    /// JSON (`null` when empty) or an error carrying the agent's message.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: datapath\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .with_context(|| format!("{method} {path}: reading the answer"))?;
        let (status, body) = parse_response(&answer)
            .with_context(|| format!("{method} {path}: malformed answer"))?;
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).with_context(|| format!("{method} {path}: not JSON"))?
        };
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status}: {}", value["error"]);
        }
        Ok(value)
    }

    /// `POST /v1/containers`: gives namespace `netns` a container network
    /// with the published ports `publish`; returns the container's info.
    pub fn add_container(&self, name: &str, netns: &str, publish: &[String]) -> Result<Value> {
        let body = serde_json::json!({ "name": name, "netns": netns, "publish": publish });
        self.call("POST", "/v1/containers", Some(&body))
    }

    /// `DELETE /v1/containers/{name}`.
    pub fn del_container(&self, name: &str) -> Result<()> {
        self.call("DELETE", &format!("/v1/containers/{name}"), None)
            .map(drop)
    }

    /// `POST /v1/containers/{name}/ports`: publishes one more port of a
    /// running container.
    pub fn publish(&self, name: &str, spec: &str) -> Result<Value> {
        let body = serde_json::json!({ "publish": spec });
        self.call("POST", &format!("/v1/containers/{name}/ports"), Some(&body))
    }

    /// `DELETE /v1/containers/{name}/ports`: stops publishing one port.
    pub fn unpublish(&self, name: &str, spec: &str) -> Result<Value> {
        let body = serde_json::json!({ "publish": spec });
        self.call(
            "DELETE",
            &format!("/v1/containers/{name}/ports"),
            Some(&body),
        )
    }

    /// `DELETE /v1/conntrack`: forgets every tracked flow.
    pub fn flush_conntrack(&self) -> Result<()> {
        self.call("DELETE", "/v1/conntrack", None).map(drop)
    }
}

/// Splits an HTTP/1.1 answer into its status and body (content-length or
/// chunked framing).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

/// Decodes a chunked body.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size without end of line")?;
        let size_text = std::str::from_utf8(&raw[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_length_or_chunks_are_parsed() {
        let plain = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).ok(), Some((201, b"{}".to_vec())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).ok(), Some((200, b"[1,2]".to_vec())));
        assert!(parse_response(b"garbage").is_err());
    }
}
