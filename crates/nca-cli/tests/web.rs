//! `nca-cli web` with a stand-in `.wasm` (building the real one needs the wasm target;
//! `.ci/run` does that and drives the page in Chromium): the folder's files, the weights
//! file the page reads, refusals, and `--serve`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nca_api::{Checkpoint, HostTensor, NcaConfig, Progress, TensorFile, Weights};

/// The smallest valid WebAssembly module: magic and version.
const EMPTY_WASM: &[u8] = b"\0asm\x01\0\0\0";

/// A checkpoint as the CLI writes it: with Adam state, carried state and a target.
fn checkpoint(dir: &Path) -> std::path::PathBuf {
    let mut config = NcaConfig::default();
    config.grid.height = 6;
    config.grid.width = 5;
    let ckpt = Checkpoint {
        weights: Weights::init(&config.model, 1),
        adam: Some(nca_api::AdamState::new(&config.model)),
        training_weights: None,
        progress: Progress::default(),
        state: Some(HostTensor::zeros(&[1, 3, 6, 5])),
        backend: "ndarray".into(),
        target: None,
        run_file: None,
        config,
    };
    let mut file = ckpt.to_file();
    file.tensors
        .insert("target".into(), HostTensor::filled(&[1, 3, 6, 5], 0.25));
    let path = dir.join("checkpoint.safetensors");
    file.write(&path).unwrap();
    path
}

fn nca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nca-cli"))
}

#[test]
fn writes_the_four_files_and_a_weights_file_without_optimiser_state() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let wasm = tmp.path().join("stand-in.wasm");
    std::fs::write(&wasm, EMPTY_WASM).unwrap();
    let out = tmp.path().join("web");
    let status = nca()
        .args(["web", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(&out)
        .arg("--wasm")
        .arg(&wasm)
        .status()
        .unwrap();
    assert!(status.success());
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["index.html", "nca.js", "nca.wasm", "weights.safetensors"]
    );
    assert_eq!(std::fs::read(out.join("nca.wasm")).unwrap(), EMPTY_WASM);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("<script src=\"nca.js\">") && !html.contains("http"));
    let file = TensorFile::read(&out.join("weights.safetensors")).unwrap();
    assert!(file.tensors.contains_key("target") && file.tensors.contains_key("w1"));
    assert!(!file.tensors.contains_key("state"));
    assert!(!file.tensors.keys().any(|k| k.starts_with("adam.")));
    let back = Checkpoint::load(&out.join("weights.safetensors")).unwrap();
    assert_eq!(back.weights, Weights::init(&back.config.model, 1));

    // A second time into the same folder needs --force; a non-wasm file is refused.
    let again = nca()
        .args(["web", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(&out)
        .arg("--wasm")
        .arg(&wasm)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let not_wasm = nca()
        .args(["web", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(tmp.path().join("web2"))
        .arg("--wasm")
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(!not_wasm.status.success());
    assert!(String::from_utf8_lossy(&not_wasm.stderr).contains("not a WebAssembly module"));
}

fn get(addr: &str, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    // Longer than the server's deadlines, so a test sees how long it waited for its turn.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // One write: a request split over several writes can race the server's close.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&all[..split]).into_owned(),
        all[split + 4..].to_vec(),
    )
}

/// A running `nca-cli web --serve` on a free port, killed when dropped.
struct Server {
    child: std::process::Child,
    addr: String,
}

impl Server {
    /// Writes the folder of `ckpt` with `wasm` into `out` and serves it.
    fn start(ckpt: &Path, wasm: &Path, out: &Path) -> Self {
        let mut child = nca()
            .args(["web", "--serve", "--port", "0", "--checkpoint"])
            .arg(ckpt)
            .arg("--out")
            .arg(out)
            .arg("--wasm")
            .arg(wasm)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let started = Instant::now();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(60));
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://127.0.0.1:"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"));
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Self { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The folder's checkpoint and a stand-in wasm of `wasm_bytes` bytes in `dir`.
fn inputs(dir: &Path, wasm_bytes: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let ckpt = checkpoint(dir);
    let wasm = dir.join("stand-in.wasm");
    let mut bytes = EMPTY_WASM.to_vec();
    bytes.resize(wasm_bytes.max(EMPTY_WASM.len()), 0);
    std::fs::write(&wasm, bytes).unwrap();
    (ckpt, wasm)
}

#[test]
fn serve_answers_on_loopback_with_the_folder_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, wasm) = inputs(tmp.path(), 0);
    let server = Server::start(&ckpt, &wasm, &tmp.path().join("web"));
    let addr = server.addr.as_str();
    let (head, body) = get(addr, "/");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/html"),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&body).contains("nca.js"));
    let (head, body) = get(addr, "/nca.wasm");
    assert!(head.contains("application/wasm"), "{head}");
    assert_eq!(body, EMPTY_WASM);
    let (head, _) = get(addr, "/../checkpoint.safetensors");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[test]
fn serve_drops_a_client_sending_an_endless_header_and_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, wasm) = inputs(tmp.path(), 0);
    let server = Server::start(&ckpt, &wasm, &tmp.path().join("web"));
    let addr = server.addr.clone();
    // Writes one header line that never ends until the server closes the connection.
    let flood = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nX-Endless: ").unwrap();
        let chunk = [b'a'; 1024];
        let started = Instant::now();
        let mut sent = 0usize;
        while s.write_all(&chunk).is_ok() {
            sent += chunk.len();
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the server still reads an endless header after {sent} bytes"
            );
        }
        sent
    });
    let sent = flood.join().unwrap();
    // Bounded by the request limit, plus what the socket buffers held when it closed.
    assert!(sent < 64 << 20, "{sent} bytes accepted");
    let (head, body) = get(&server.addr, "/");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("nca.js"));
}

#[test]
fn serve_gives_up_on_a_client_that_never_reads_and_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    // Far more than loopback's socket buffers hold, so writing it blocks on the client.
    let (ckpt, wasm) = inputs(tmp.path(), 64 << 20);
    let server = Server::start(&ckpt, &wasm, &tmp.path().join("web"));
    let stalled = TcpStream::connect(&server.addr).unwrap();
    (&stalled)
        .write_all(format!("GET /nca.wasm HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes())
        .unwrap();
    // A client that connects and never sends its request at all.
    let silent = TcpStream::connect(&server.addr).unwrap();
    let started = Instant::now();
    let (head, body) = get(&server.addr, "/index.html");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("nca.js"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered only after {:?}",
        started.elapsed()
    );
    drop((stalled, silent));
}

#[cfg(unix)]
#[test]
fn serve_stops_on_the_first_ctrl_c_or_sigterm() {
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, wasm) = inputs(tmp.path(), 0);
        let mut server = Server::start(&ckpt, &wasm, &tmp.path().join("web"));
        let sent = Command::new("kill")
            .args([signal, &server.child.id().to_string()])
            .status()
            .expect("the `kill` program sends the signal");
        assert!(sent.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still serving 10 s after kill {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(code), "kill {signal}");
    }
}
