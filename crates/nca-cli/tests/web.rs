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
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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

#[test]
fn serve_answers_on_loopback_with_the_folder_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(tmp.path());
    let wasm = tmp.path().join("stand-in.wasm");
    std::fs::write(&wasm, EMPTY_WASM).unwrap();
    let mut child = nca()
        .args(["web", "--serve", "--port", "0", "--checkpoint"])
        .arg(&ckpt)
        .arg("--out")
        .arg(tmp.path().join("web"))
        .arg("--wasm")
        .arg(&wasm)
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
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
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
    child.kill().unwrap();
    child.wait().unwrap();
}
