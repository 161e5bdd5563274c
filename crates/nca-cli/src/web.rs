//! `nca-cli web`: a self-contained static folder that runs a trained rule in the browser.
//!
//! The folder holds `index.html`, `nca.js` (the page's glue, no build step), `nca.wasm`
//! (crate `nca-web`: the ndarray backend's own forward step compiled to
//! `wasm32-unknown-unknown`) and `weights.safetensors` (weights, config and target). The
//! `.wasm` is built on demand with cargo from this source tree, so `cargo build` never
//! needs the wasm target; without it, the command says how to install it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use nca_api::{Checkpoint, TensorFile};

use crate::cli::Finish;

/// The page, shipped inside the binary so the folder needs nothing else.
const INDEX_HTML: &str = include_str!("../../nca-web/assets/index.html");
/// The page's script.
const NCA_JS: &str = include_str!("../../nca-web/assets/nca.js");
/// The wasm target the page's module is built for.
const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// Environment variable naming a prebuilt `nca_web.wasm` (used instead of building).
pub const WASM_ENV: &str = "NCA_WEB_WASM";

/// The files of the folder, with their content types for `--serve`.
const SERVED: [(&str, &str); 4] = [
    ("index.html", "text/html; charset=utf-8"),
    ("nca.js", "text/javascript; charset=utf-8"),
    ("nca.wasm", "application/wasm"),
    ("weights.safetensors", "application/octet-stream"),
];

/// Options of `nca-cli web`.
#[derive(Clone, Debug)]
pub struct WebArgs {
    /// Checkpoint of a trained rule.
    pub checkpoint: PathBuf,
    /// Folder to write.
    pub out: PathBuf,
    /// Replace a non-empty folder.
    pub force: bool,
    /// A prebuilt `nca_web.wasm` instead of building one.
    pub wasm: Option<PathBuf>,
    /// Serve the folder on 127.0.0.1 after writing it.
    pub serve: bool,
    /// Port for `--serve` (0: any free port).
    pub port: u16,
}

/// Writes the folder and, with `serve`, serves it until the process is stopped.
pub fn web_command(args: &WebArgs) -> Result<Finish> {
    let weights = web_weights(&args.checkpoint)?;
    let wasm = match args
        .wasm
        .clone()
        .or_else(|| std::env::var_os(WASM_ENV).map(PathBuf::from))
    {
        Some(path) => path,
        None => build_wasm()?,
    };
    let wasm_bytes =
        std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    if !wasm_bytes.starts_with(b"\0asm") {
        bail!("{} is not a WebAssembly module", wasm.display());
    }
    prepare_dir(&args.out, args.force)?;
    let write = |name: &str, bytes: &[u8]| {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("index.html", INDEX_HTML.as_bytes())?;
    write("nca.js", NCA_JS.as_bytes())?;
    write("nca.wasm", &wasm_bytes)?;
    write("weights.safetensors", &weights)?;
    eprintln!(
        "wrote {} (index.html, nca.js, nca.wasm {} KiB, weights.safetensors {} KiB); serve it \
         with any static file server, or pass --serve",
        args.out.display(),
        wasm_bytes.len() / 1024,
        weights.len() / 1024
    );
    if args.serve {
        serve(&args.out, args.port)?;
    }
    Ok(Finish::Completed)
}

/// The page's weights file: the checkpoint's config (as read today, so legacy
/// checkpoints arrive as the plain model), weights and target, without optimiser state or
/// carried state: the page grows from fresh noise.
pub fn web_weights(checkpoint: &Path) -> Result<Vec<u8>> {
    let ckpt = Checkpoint::load_limited(checkpoint, &nca_api::MemoryLimit::from_env()?)
        .with_context(|| format!("cannot load checkpoint {}", checkpoint.display()))?;
    let v = ckpt.config.model.visible_channels;
    if v != 1 && v != 3 {
        bail!("the checkpoint has {v} visible channels; the page shows 1 (grey) or 3 (RGB)");
    }
    if let Some(name) = ckpt.weights.first_non_finite() {
        bail!(
            "checkpoint {}: tensor `{name}` holds NaN or inf values, so the page could not \
             run the rule (the checkpoint was probably written by a run that diverged)",
            checkpoint.display()
        );
    }
    if ckpt.target.is_none() {
        eprintln!("note: the checkpoint holds no target; the page shows no PSNR");
    }
    // The page grows from fresh noise: no optimiser state, no carried state, and no run
    // file (its absolute paths mean nothing to a browser).
    let file: TensorFile = Checkpoint {
        adam: None,
        state: None,
        run_file: None,
        ..ckpt
    }
    .to_file();
    file.to_bytes()
        .map_err(|e| anyhow!("cannot encode weights: {e}"))
}

fn prepare_dir(out: &Path, force: bool) -> Result<()> {
    if out.exists() {
        let mut entries =
            std::fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))?;
        if entries.next().is_some() && !force {
            bail!(
                "{} exists and is not empty (pass --force to replace its files)",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

/// Builds `nca_web.wasm` from this source tree and returns its path.
///
/// It uses its own target directory (`target/web`) so that it never waits for, or
/// invalidates, the build that is running this binary.
fn build_wasm() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !root.join("crates/nca-web/Cargo.toml").is_file() {
        bail!(
            "the nca source tree ({}) is not here to build nca.wasm from; pass --wasm \
             PATH or set {WASM_ENV} to a built nca_web.wasm",
            root.display()
        );
    }
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib").join(WASM_TARGET).is_dir() {
        bail!(
            "the Rust target {WASM_TARGET} is not installed; run `rustup target add \
             {WASM_TARGET}` (once), then this command again"
        );
    }
    let target_dir = root.join("target/web");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building nca.wasm (cargo build -p nca-web --target {WASM_TARGET} --release)…");
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "-p", "nca-web", "--lib", "--release", "--target"])
        .arg(WASM_TARGET)
        .env("CARGO_TARGET_DIR", &target_dir)
        // The page needs no symbols or line tables: about a third of the size.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        // RUSTFLAGS would replace .cargo/config.toml's getrandom setting for wasm.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("cannot run cargo to build nca.wasm")?;
    if !status.success() {
        bail!("building nca.wasm failed ({status}); see cargo's messages above");
    }
    Ok(target_dir.join(WASM_TARGET).join("release/nca_web.wasm"))
}

/// Serves the folder's files on 127.0.0.1 until the process is stopped.
fn serve(dir: &Path, port: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let addr = listener.local_addr()?;
    println!("serving {} at http://{addr}/ (Ctrl-C stops)", dir.display());
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        match stream {
            // One request per connection, answered in turn: four small files.
            Ok(s) => {
                if let Err(e) = answer(dir, s) {
                    tracing::debug!("request failed: {e}");
                }
            }
            Err(e) => tracing::debug!("connection failed: {e}"),
        }
    }
    Ok(())
}

/// Answers one HTTP/1.0-style GET for one of the folder's files; nothing else is served.
fn answer(dir: &Path, mut stream: TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    reader.read_line(&mut line)?;
    // Read the headers up to the blank line before answering: closing a socket with
    // request bytes still unread makes the kernel reset the connection, and the client
    // sees a broken pipe instead of the answer. Bounded, so a slow client cannot hold us.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let name = path.split('?').next().unwrap_or("").trim_start_matches('/');
    let name = if name.is_empty() { "index.html" } else { name };
    let found = SERVED.iter().find(|(n, _)| *n == name);
    let (status, kind, body) = match (method, found) {
        ("GET" | "HEAD", Some((n, kind))) => match std::fs::read(dir.join(n)) {
            Ok(b) => ("200 OK", *kind, b),
            Err(_) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
        },
        ("GET" | "HEAD", None) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n".to_vec(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        stream.write_all(&body)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = nca_api::NcaConfig::default();
        let mut weights = nca_api::Weights::init(&config.model, 0);
        weights[nca_api::Param::Wk].data_mut()[0] = f32::INFINITY;
        let path = dir.path().join("nan.safetensors");
        Checkpoint {
            config,
            weights,
            adam: None,
            progress: nca_api::Progress::default(),
            state: None,
            backend: "test".into(),
            target: None,
            run_file: None,
        }
        .save(&path)
        .expect("save");
        let msg = format!("{:#}", web_weights(&path).expect_err("refused"));
        assert!(
            msg.contains("`wk`") && msg.contains("nan.safetensors"),
            "{msg}"
        );
    }
}
