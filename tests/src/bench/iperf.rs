//! Bulk TCP and small-packet UDP with iperf3 (`-J` output).

use std::{
    net::SocketAddrV4,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    bench::cpu::{CpuDelta, CpuTimes},
    netns::Netns,
};

/// How long a server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its test a client may run before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// `iperf3 -s` in a namespace; killed on drop.
#[derive(Debug)]
pub struct IperfServer {
    child: Child,
}

impl IperfServer {
    /// Starts a server on `port` in `ns` and waits until it listens.
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let child = ns
            .command("iperf3")
            .args(["-s", "-p", &port.to_string(), "--idle-timeout", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting iperf3 -s in {}", ns.name()))?;
        let server = Self { child };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let filter = format!("sport = :{port}");
        while ns.exec_ok("ss", ["-Hltn", &filter]).trim().is_empty() {
            if Instant::now() > deadline {
                bail!("iperf3 -s -p {port} in {} does not listen", ns.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        // It may have exited already: nothing to report then.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// TCP with `streams` parallel streams; `reverse` makes the server send.
    Tcp {
        /// Parallel streams (`-P`).
        streams: u32,
        /// Server to client (`-R`).
        reverse: bool,
    },
    /// UDP datagrams of `payload` bytes as fast as the sender can
    /// (`-u -l <payload> -b 0`).
    Udp {
        /// Payload size.
        payload: u32,
    },
}

/// One iperf3 run's figures.
#[derive(Clone, Copy, Debug)]
pub struct IperfResult {
    /// Received bits per second.
    pub bits_per_second: f64,
    /// Received bytes.
    pub bytes: f64,
    /// Seconds measured.
    pub secs: f64,
    /// UDP: datagrams sent.
    pub packets: u64,
    /// UDP: datagrams lost.
    pub lost: u64,
    /// CPU spent machine-wide while the test ran.
    pub cpu: CpuDelta,
}

impl IperfResult {
    /// Gigabits received.
    pub fn gbits(&self) -> f64 {
        self.bytes * 8.0 / 1e9
    }

    /// UDP: datagrams received.
    pub fn received(&self) -> u64 {
        self.packets.saturating_sub(self.lost)
    }
}

/// Runs one iperf3 client in `ns` against `target` for `secs` whole
/// seconds.
pub fn run(ns: &Netns, target: SocketAddrV4, test: Test, secs: u32) -> Result<IperfResult> {
    let mut cmd = ns.command("iperf3");
    cmd.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ])
    .args(["-t", &secs.max(1).to_string(), "-J", "-i", "0"])
    .args(["--connect-timeout", "3000"]);
    match test {
        Test::Tcp { streams, reverse } => {
            cmd.args(["-P", &streams.to_string()]);
            if reverse {
                cmd.arg("-R");
            }
        }
        Test::Udp { payload } => {
            cmd.args(["-u", "-l", &payload.to_string(), "-b", "0"]);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let before = CpuTimes::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting iperf3 -c in {}", ns.name()))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The receiver may have given up: nothing to do then.
        let _ = tx.send(child.wait_with_output());
    });
    let limit = Duration::from_secs(u64::from(secs)) + GRACE;
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out?,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            bail!("iperf3 to {target} ran over {limit:?}: killed");
        }
    };
    let cpu = CpuTimes::now().since(&before);
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 to {target}: output is not JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = json["error"].as_str() {
        bail!("iperf3 to {target}: {err}");
    }
    parse(&json, test, cpu).with_context(|| format!("iperf3 to {target}: unexpected output"))
}

/// Reads the figures of `test` out of iperf3's JSON.
fn parse(json: &Value, test: Test, cpu: CpuDelta) -> Result<IperfResult> {
    let end = &json["end"];
    let num = |v: &Value, what: &str| v.as_f64().with_context(|| format!("no {what}"));
    match test {
        Test::Tcp { .. } => {
            let sum = &end["sum_received"];
            Ok(IperfResult {
                bits_per_second: num(&sum["bits_per_second"], "bits_per_second")?,
                bytes: num(&sum["bytes"], "bytes")?,
                secs: num(&sum["seconds"], "seconds")?,
                packets: 0,
                lost: 0,
                cpu,
            })
        }
        Test::Udp { .. } => {
            let sum = &end["sum"];
            let packets = sum["packets"].as_u64().context("no packets")?;
            let lost = sum["lost_packets"].as_u64().context("no lost_packets")?;
            let secs = num(&sum["seconds"], "seconds")?;
            let bytes = num(&sum["bytes"], "bytes")?;
            let lost_share = if packets == 0 {
                0.0
            } else {
                lost as f64 / packets as f64
            };
            let received_bytes = bytes * (1.0 - lost_share);
            Ok(IperfResult {
                bits_per_second: if secs > 0.0 {
                    received_bytes * 8.0 / secs
                } else {
                    0.0
                },
                bytes: received_bytes,
                secs,
                packets,
                lost,
                cpu,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_udp_summaries_are_read() {
        let tcp = serde_json::json!({"end": {"sum_received":
            {"bits_per_second": 2.5e10, "bytes": 6.25e9, "seconds": 2.0}}});
        let r = parse(
            &tcp,
            Test::Tcp {
                streams: 1,
                reverse: false,
            },
            CpuDelta::default(),
        )
        .expect("parses");
        assert_eq!(r.gbits(), 50.0);
        let udp = serde_json::json!({"end": {"sum":
            {"packets": 1000, "lost_packets": 100, "seconds": 1.0, "bytes": 64000.0}}});
        let r = parse(&udp, Test::Udp { payload: 64 }, CpuDelta::default()).expect("parses");
        assert_eq!(r.received(), 900);
        assert!((r.bytes - 57600.0).abs() < 1e-6);
        assert!(
            parse(
                &serde_json::json!({}),
                Test::Udp { payload: 64 },
                CpuDelta::default()
            )
            .is_err()
        );
    }
}
