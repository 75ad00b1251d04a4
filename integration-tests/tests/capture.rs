//! `cohort demo` runs over mutual TLS: a packet capture of the loopback
//! interface while it runs shows no plaintext HTTP/2 (gRPC) on any of its
//! connections, parties to proxy and between the server services alike.
//!
//! Needs tcpdump and the right to capture (root or CAP_NET_RAW); the test
//! script installs tcpdump. Without it the test says it skipped, except under CI.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cohort_integration_tests::cohort_bin;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn tcpdump() -> Option<PathBuf> {
    ["/usr/bin/tcpdump", "/usr/sbin/tcpdump", "/sbin/tcpdump"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// One TCP segment's ports and payload.
struct Segment {
    src: u16,
    dst: u16,
    payload: Vec<u8>,
}

/// Reads a pcap file of Ethernet (the `lo` link type) or raw IPv4 frames.
fn tcp_segments(pcap: &[u8]) -> Vec<Segment> {
    assert!(pcap.len() >= 24, "capture file without a header");
    let magic = u32::from_le_bytes(pcap[0..4].try_into().expect("test step"));
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        other => panic!("not a pcap file (magic {other:#x})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let bytes: [u8; 4] = b[at..at + 4].try_into().expect("test step");
        if le {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        }
    };
    let link = u32_at(pcap, 20);
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32_at(pcap, at + 8) as usize;
        let frame = &pcap[at + 16..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        let ip = match link {
            1 if frame.len() > 14 && frame[12..14] == [0x08, 0x00] => &frame[14..],
            101 | 228 => frame,
            _ => continue,
        };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
            continue;
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let tcp = &ip[ihl.min(ip.len())..total.min(ip.len())];
        if tcp.len() < 20 {
            continue;
        }
        let offset = ((tcp[12] >> 4) as usize) * 4;
        out.push(Segment {
            src: u16::from_be_bytes([tcp[0], tcp[1]]),
            dst: u16::from_be_bytes([tcp[2], tcp[3]]),
            payload: tcp[offset.min(tcp.len())..].to_vec(),
        });
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every port a demo process logged it serves on (services and coordinators).
fn served_ports(dir: &Path) -> HashSet<u16> {
    let mut ports = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|l| l.contains("serving") && !l.contains("task-manager"))
                {
                    if let Some(port) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|addr| addr.rsplit(':').next())
                        .and_then(|p| p.trim_matches('"').parse().ok())
                    {
                        ports.insert(port);
                    }
                }
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_traffic_is_mutual_tls_with_no_plaintext_grpc() {
    let Some(tcpdump) = tcpdump() else {
        cohort_testkit::skip("tcpdump is not installed (scripts/test.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().expect("test step");
    let pcap = dir.path().join("lo.pcap");
    let data = dir.path().join("demo");
    let mut capture = tokio::process::Command::new(&tcpdump)
        .args(["-i", "lo", "--immediate-mode", "-U", "-s", "0", "-n", "-w"])
        .arg(&pcap)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tcpdump");
    // tcpdump writes the file header once it captures.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0) < 24 {
        if let Ok(Some(status)) = capture.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = capture.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            panic!("tcpdump exited ({status}): {err}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tcpdump did not start capturing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let demo = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(cohort_bin())
            .args([
                "demo",
                "--clients",
                "2",
                "--rounds",
                "3",
                "--json",
                "--data-dir",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo within 4 minutes")
    .expect("run cohort demo");
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(
        demo.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("summary line");
    assert_eq!(last["state"], "SUCCEEDED", "{last}");

    // Control: a plaintext gRPC call during the capture must be seen as such.
    let control = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("test step");
    let control_port = control.local_addr().expect("test step").port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic_health::server::health_reporter().1)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(control)),
    );
    let channel =
        cohort_runtime::lazy_channel(&format!("127.0.0.1:{control_port}")).expect("test step");
    let _ = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    server.abort();
    // Packets reach the file as they come (--immediate-mode, -U); on a loaded machine that
    // can still take a moment: wait for the control call, the last traffic, to be in it
    // before stopping (everything before it then is too).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let seen = tcp_segments(&std::fs::read(&pcap).unwrap_or_default())
            .iter()
            .any(|s| {
                (s.src == control_port || s.dst == control_port) && contains(&s.payload, H2_PREFACE)
            });
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.id().expect("tcpdump pid") as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("test step");
    let _ = tokio::time::timeout(Duration::from_secs(10), capture.wait()).await;

    let segments = tcp_segments(&std::fs::read(&pcap).expect("test step"));
    let on = |port: u16| {
        segments
            .iter()
            .filter(move |s| s.src == port || s.dst == port)
    };
    assert!(
        on(control_port).any(|s| contains(&s.payload, H2_PREFACE)),
        "the capture must show a plaintext call as plaintext"
    );

    let ports = served_ports(&data);
    assert!(
        ports.len() >= 5,
        "proxy, three services and a coordinator: {ports:?}"
    );
    let token = std::fs::read_to_string(data.join("pki/admin.token")).expect("test step");
    let mut bytes = 0usize;
    let mut handshakes = 0usize;
    for s in segments
        .iter()
        .filter(|s| ports.contains(&s.src) || ports.contains(&s.dst))
    {
        bytes += s.payload.len();
        assert!(
            !contains(&s.payload, H2_PREFACE),
            "plaintext HTTP/2 between {} and {}",
            s.src,
            s.dst
        );
        assert!(
            !contains(&s.payload, b"application/grpc"),
            "plaintext gRPC headers between {} and {}",
            s.src,
            s.dst
        );
        assert!(
            !contains(&s.payload, token.trim().as_bytes()),
            "the admin token on the wire"
        );
        // A TLS handshake record: content type 22, version 3.x.
        if s.payload.len() > 5 && s.payload[0] == 0x16 && s.payload[1] == 0x03 {
            handshakes += 1;
        }
    }
    eprintln!(
        "captured {bytes} bytes on {} demo ports, {handshakes} TLS handshake records, no plaintext HTTP/2",
        ports.len()
    );
    // The demo moved models and updates through these ports, all of it in TLS records.
    assert!(bytes > 100_000, "only {bytes} bytes captured on {ports:?}");
    assert!(handshakes >= 10, "only {handshakes} TLS handshake records");

    // No secret in any log line.
    let key_marker = "PRIVATE KEY";
    for entry in std::fs::read_dir(data.join("logs"))
        .expect("test step")
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !text.contains(token.trim()),
            "token in {}",
            entry.path().display()
        );
        assert!(
            !text.contains(key_marker),
            "key in {}",
            entry.path().display()
        );
    }
}
