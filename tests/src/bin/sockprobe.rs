//! A client that reports what its sockets see, for tests of the socket
//! programs: run in a namespace and cgroup of a test's choosing, it prints
//! one `key value` line per observation.
//!
//! ```text
//! sockprobe tcp ADDR            connects, prints `peer` (getpeername), sends
//!                               an HTTP/1.0 GET and prints the answer's `body`
//! sockprobe udp ADDR TEXT       sends TEXT from an unconnected socket, prints
//!                               the answer's source (`from`) and `reply`
//! sockprobe udp-connected ADDR TEXT
//!                               the same from a connected socket, and `peer`
//! ```
//!
//! Exits non-zero (with the error on stderr) if anything fails.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// How long any one step may take.
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr) = match args.as_slice() {
        [mode, addr, ..] => (mode.as_str(), addr),
        _ => bail!("usage: sockprobe tcp|udp|udp-connected ADDR [TEXT]"),
    };
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    let text = args.get(2).map_or("probe", String::as_str);
    match mode {
        "tcp" => tcp(addr),
        "udp" => udp(addr, text, false),
        "udp-connected" => udp(addr, text, true),
        other => bail!("unknown mode {other:?}"),
    }
}

fn tcp(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).context("connect")?;
    println!("peer {}", s.peer_addr().context("getpeername")?);
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .context("send the request")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).context("read the answer")?;
    let (_, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {answer:?}"))?;
    println!("body {}", body.trim_end());
    Ok(())
}

fn udp(addr: SocketAddr, text: &str, connected: bool) -> anyhow::Result<()> {
    let s = if addr.is_ipv6() {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
    }
    .context("bind")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    if connected {
        s.connect(addr).context("connect")?;
        println!("peer {}", s.peer_addr().context("getpeername")?);
        s.send(text.as_bytes()).context("send")?;
    } else {
        s.send_to(text.as_bytes(), addr).context("send")?;
    }
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).context("receive the answer")?;
    println!("from {from}");
    println!("reply {}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}
