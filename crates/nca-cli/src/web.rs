//! `nca-cli web`: a self-contained static folder that runs a trained rule in the browser.
//!
//! The folder holds `index.html`, `nca.js` (the page's glue, no build step), `nca.wasm`
//! (crate `nca-web`: the ndarray backend's own forward step compiled to
//! `wasm32-unknown-unknown`) and `weights.safetensors` (weights, config and target). The
//! `.wasm` is built on demand with cargo from this source tree, so `cargo build` never
//! needs the wasm target; without it, the command says how to install it.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nca_api::{Checkpoint, TensorFile};
// The page and its script ship inside the binary, so the folder needs nothing else.
use nca_web::{INDEX_HTML, NCA_JS};

use crate::cli::Finish;

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
pub struct WebArgs<'a> {
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
    /// Set by Ctrl-C, SIGTERM or SIGHUP: `--serve` stops.
    pub interrupt: &'a AtomicBool,
}

/// Writes the folder and, with `serve`, serves it until Ctrl-C, SIGTERM or SIGHUP.
pub fn web_command(args: &WebArgs<'_>) -> Result<Finish> {
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
        return serve(&args.out, args.port, args.interrupt);
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
        training_weights: None,
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

/// Longest request read: a request line and headers as a browser sends them fit many
/// times over; a client sending more is answered 431 and dropped.
const MAX_REQUEST_BYTES: u64 = 16 * 1024;

/// Time a client has to send its whole request.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Time a client has to take the whole answer (the largest file is the `.wasm`, a few MiB
/// at most, which loopback moves in milliseconds).
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// How often the accept loop looks whether Ctrl-C asked it to stop.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Serves the folder's files on 127.0.0.1 until Ctrl-C, SIGTERM or SIGHUP sets
/// `interrupt`. Connections are answered one at a time, each within its deadlines, so a
/// client that stalls holds the others up by seconds at most.
fn serve(dir: &Path, port: u16, interrupt: &AtomicBool) -> Result<Finish> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    // Non-blocking, so the loop sees a stop request instead of waiting in accept forever.
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    println!("serving {} at http://{addr}/ (Ctrl-C stops)", dir.display());
    std::io::stdout().flush()?;
    while !interrupt.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(dir, stream) {
                    tracing::debug!("request failed: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(STOP_POLL),
            Err(e) => tracing::debug!("connection failed: {e}"),
        }
    }
    eprintln!("stopped serving {}", dir.display());
    Ok(Finish::Stopped)
}

/// A socket whose reads and writes fail with `TimedOut` once `deadline` has passed, however
/// the client spreads its bytes: a timeout per call alone would let a client that sends or
/// takes one byte every few seconds hold the server forever.
struct Deadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Deadline<'_> {
    /// Time left, or `TimedOut` when none is.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "the client missed its deadline",
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&mut &*self.stream).flush()
    }
}

/// Answers one HTTP/1.0-style GET for one of the folder's files; nothing else is served.
fn answer(dir: &Path, stream: TcpStream) -> Result<()> {
    // Accepted sockets inherit non-blocking from the listener on some systems.
    stream.set_nonblocking(false)?;
    let request = Deadline {
        stream: &stream,
        deadline: Instant::now() + READ_DEADLINE,
    };
    let mut reader = BufReader::new(request.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Read the headers up to the blank line before answering: closing a socket with
    // request bytes still unread makes the kernel reset the connection, and the client
    // sees a broken pipe instead of the answer.
    let mut complete = false;
    let mut header = String::new();
    loop {
        header.clear();
        if reader.read_line(&mut header)? == 0 {
            break;
        }
        if header.trim().is_empty() {
            complete = true;
            break;
        }
    }
    let mut out = Deadline {
        stream: &stream,
        deadline: Instant::now() + WRITE_DEADLINE,
    };
    if !complete {
        let body = b"request too large\n";
        write!(
            out,
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        out.write_all(body)?;
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let name = path.split('?').next().unwrap_or("").trim_start_matches('/');
    let name = if name.is_empty() { "index.html" } else { name };
    let found = SERVED.iter().find(|(n, _)| *n == name);
    let file = match (method, found) {
        ("GET" | "HEAD", Some((n, kind))) => File::open(dir.join(n))
            .and_then(|f| Ok((f.metadata()?.len(), f)))
            .ok()
            .map(|(len, f)| (*kind, len, f)),
        _ => None,
    };
    let (status, kind, len) = match (&file, method) {
        (Some((kind, len, _)), _) => ("200 OK", *kind, *len),
        (None, "GET" | "HEAD") => ("404 Not Found", "text/plain", NOT_FOUND.len() as u64),
        (None, _) => (
            "405 Method Not Allowed",
            "text/plain",
            GET_ONLY.len() as u64,
        ),
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    match (file, method) {
        // Streamed, so a large file is never held in memory.
        (Some((_, _, mut f)), _) => {
            std::io::copy(&mut f, &mut out)?;
        }
        (None, "GET") => out.write_all(NOT_FOUND)?,
        (None, _) => out.write_all(GET_ONLY)?,
    }
    out.flush()?;
    Ok(())
}

/// Body of a 404.
const NOT_FOUND: &[u8] = b"not found\n";

/// Body of a 405.
const GET_ONLY: &[u8] = b"GET only\n";

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
            training_weights: None,
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
