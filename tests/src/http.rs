//! A deliberately small blocking HTTP/1.1 client for sending test traffic through Envoy.
//!
//! One request per connection (`Connection: close`), so each call is independent and no pool
//! hides which listener or connection served it. Errors are flat strings (no cause chain), so
//! `err.to_string()` inside [`crate::eventually`] shows everything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

/// Deadline for a whole request (connect, send, receive) when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuse bodies beyond this: a test talking to a misbehaving server should fail, not OOM.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A received response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    /// In wire order; names as received (compare case-insensitively, see [`Self::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as lossy UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| anyhow!("body is not JSON ({e}): {}", truncate(&self.text(), 200)))
    }
}

/// `GET path` to `addr` with extra headers and [`DEFAULT_TIMEOUT`].
///
/// `Host` defaults to `addr`; pass a `("host", "svc.ns")` header to route by virtual host.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", path, headers, &[], DEFAULT_TIMEOUT)
}

/// `GET path` to `addr` (an admin API) expecting 200 and a JSON body.
pub fn http_get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let response = http_get(addr, path, &[])?;
    if response.status != 200 {
        bail!(
            "{addr}{path}: status {}: {}",
            response.status,
            response.text()
        );
    }
    response.json()
}

/// Sends one request and reads the whole response, all within `timeout`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> anyhow::Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| anyhow!("connect {addr}: {e}"))?;
    // Requests are tiny; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(remaining(deadline, addr)?))
        .map_err(|e| anyhow!("set write timeout: {e}"))?;

    let request = encode_request(addr, method, path, headers, body);
    stream
        .write_all(&request)
        .map_err(|e| anyhow!("send to {addr}: {e}"))?;

    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(response) = try_parse(&buf, method, false)? {
            return Ok(response);
        }
        stream
            .set_read_timeout(Some(remaining(deadline, addr)?))
            .map_err(|e| anyhow!("set read timeout: {e}"))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!(
                "read from {addr} after {} bytes: {e}{}",
                buf.len(),
                partial_hint(&buf)
            ),
        };
        if n == 0 {
            return try_parse(&buf, method, true)?.ok_or_else(|| {
                anyhow!(
                    "{addr} closed the connection after {} bytes, before a complete response{}",
                    buf.len(),
                    partial_hint(&buf)
                )
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE_BYTES {
            bail!("response from {addr} exceeds {MAX_RESPONSE_BYTES} bytes");
        }
    }
}

fn remaining(deadline: Instant, addr: SocketAddr) -> anyhow::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("request to {addr} timed out");
    }
    Ok(left)
}

fn encode_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("connection") {
        head.push_str("Connection: close\r\n");
    }
    if !has("content-length") && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// `Ok(None)` means "need more bytes". With `eof`, a body without framing ends here.
fn try_parse(buf: &[u8], method: &str, eof: bool) -> anyhow::Result<Option<HttpResponse>> {
    let mut start = 0;
    loop {
        let Some(head_len) = find(&buf[start..], b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = std::str::from_utf8(&buf[start..start + head_len])
            .map_err(|_| anyhow!("response head is not UTF-8"))?;
        let body_start = start + head_len + 4;
        let (status, reason, headers) = parse_head(head)?;
        // Interim responses (e.g. 100 Continue) precede the real one; 101 would switch
        // protocols, which this client never asks for.
        if (100..200).contains(&status) && status != 101 {
            start = body_start;
            continue;
        }
        let rest = &buf[body_start..];
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim())
        };
        let body = if method.eq_ignore_ascii_case("HEAD")
            || status == 204
            || status == 304
            || (100..200).contains(&status)
        {
            Some(Vec::new())
        } else if header("transfer-encoding").is_some_and(|te| {
            te.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
        }) {
            decode_chunked(rest)?
        } else if let Some(len) = header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| anyhow!("bad Content-Length {len:?}"))?;
            (rest.len() >= len).then(|| rest[..len].to_vec())
        } else if eof {
            Some(rest.to_vec())
        } else {
            None
        };
        return Ok(body.map(|body| HttpResponse {
            status,
            reason,
            headers,
            body,
        }));
    }
}

type Head = (u16, String, Vec<(String, String)>);

fn parse_head(head: &str) -> anyhow::Result<Head> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {}", truncate(status_line, 100));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {}", truncate(status_line, 100)))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line: {}", truncate(line, 100)))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok((status, reason, headers))
}

/// `Ok(None)` when the chunked body is not complete yet. Trailers are read and dropped.
fn decode_chunked(mut data: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&data[..line_end])
            .map_err(|_| anyhow!("chunk size line is not UTF-8"))?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| anyhow!("bad chunk size {size_hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailer section: header lines until an empty line.
            loop {
                let Some(end) = find(data, b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                data = &data[end + 2..];
            }
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[..size]);
        if &data[size..size + 2] != b"\r\n" {
            bail!("chunk of {size} bytes not followed by CRLF");
        }
        data = &data[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn partial_hint(buf: &[u8]) -> String {
    if buf.is_empty() {
        String::new()
    } else {
        format!("; got: {}", truncate(&String::from_utf8_lossy(buf), 200))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, eof: bool) -> Option<HttpResponse> {
        try_parse(raw.as_bytes(), "GET", eof).expect("parse")
    }

    #[test]
    fn content_length_body() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello";
        let r = parse(raw, false).expect("complete");
        assert_eq!(r.status, 200);
        assert_eq!(r.reason, "OK");
        assert_eq!(r.text(), "hello");
        assert_eq!(r.header("x-a"), Some("1"));
        assert_eq!(r.header_all("X-A"), vec!["1", "2"]);
        assert!(parse(&raw[..raw.len() - 1], false).is_none());
    }

    #[test]
    fn chunked_body_with_trailers() {
        let raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
        assert_eq!(parse(raw, false).expect("complete").text(), "hello world");
        assert!(parse(&raw[..raw.len() - 2], false).is_none());
    }

    #[test]
    fn unframed_body_ends_at_eof() {
        let raw = "HTTP/1.1 503 Service Unavailable\r\n\r\nno healthy upstream";
        assert!(parse(raw, false).is_none());
        let r = parse(raw, true).expect("complete");
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "no healthy upstream");
    }

    #[test]
    fn skips_interim_responses_and_bodyless_statuses() {
        let raw = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        let r = parse(raw, false).expect("complete");
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert!(try_parse(b"SSH-2.0-OpenSSH\r\n\r\n", "GET", true).is_err());
        assert!(try_parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "GET",
            false
        )
        .is_err());
    }

    #[test]
    fn request_defaults_host_connection_and_length() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let req = String::from_utf8(encode_request(addr, "POST", "/x", &[("X-Y", "z")], b"hi"))
            .expect("utf8");
        assert_eq!(
            req,
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\
             Content-Length: 2\r\nX-Y: z\r\n\r\nhi"
        );
        let req = String::from_utf8(encode_request(addr, "GET", "/", &[("host", "svc")], b""))
            .expect("utf8");
        assert!(req.starts_with("GET / HTTP/1.1\r\nConnection: close\r\nhost: svc\r\n"));
    }
}
