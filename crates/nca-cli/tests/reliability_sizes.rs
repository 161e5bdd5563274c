//! Reliability against hostile sizes and inputs: every test runs the real binary under
//! a small `NCA_MEMORY_LIMIT` and under an address-space limit (`ulimit -v`), so that a
//! regression that allocates what it should have refused aborts (rc 134) instead of
//! passing. Each test asserts exit code 1, a message that names the field, flag or file
//! and says how much, and that no output directory was created.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nca_api::{Checkpoint, HostTensor, NcaConfig, Progress, TensorFile, Weights};
use tempfile::TempDir;

mod common;
use common::{binary, stderr, write};

/// Virtual memory the binary may map, in KiB: far below what any refused request asks,
/// far above what a tiny run needs.
const ADDRESS_SPACE_KIB: u64 = 4_000_000;

/// Longest any of these commands may take: a refusal is immediate, a hang is a failure.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `nca-cli ARGS` under `ulimit -v` with `NCA_MEMORY_LIMIT=memory`.
fn limited<S: AsRef<std::ffi::OsStr>>(memory: &str, args: &[S]) -> Output {
    let script = format!("ulimit -v {ADDRESS_SPACE_KIB}; exec \"$0\" \"$@\"");
    assert_cmd::Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NCA_MEMORY_LIMIT", memory)
        .timeout(TIMEOUT)
        .output()
        .expect("runs")
}

/// Asserts exit code 1 (not a panic's 101 or an abort's 134) and every needle in stderr.
fn refused(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

/// Trains `run_file` with `--out DIR/out` under the limits; expects a refusal with
/// `needles` and no `DIR/out`.
fn training_refused(memory: &str, run_file: &str, needles: &[&str]) {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "run.ron", run_file);
    let out = tmp.path().join("out");
    let o = limited(
        memory,
        &[cfg.as_os_str(), "--out".as_ref(), out.as_os_str()],
    );
    refused(&o, needles);
    assert!(!out.exists(), "a refused run created {}", out.display());
}

#[test]
fn a_grid_of_100000_squared_is_refused_before_anything_is_written() {
    training_refused(
        "2G",
        "(grid: (height: 100000, width: 100000), target: Solid(1.0, 0.0, 0.0))",
        &["100000x100000", "GiB", "grid.height", "NCA_MEMORY_LIMIT"],
    );
}

#[test]
fn a_batch_of_a_billion_is_refused() {
    training_refused(
        "2G",
        "(grid: (batch: 1000000000), target: Solid(1.0, 0.0, 0.0))",
        &["batch 1000000000", "GiB", "grid.batch"],
    );
}

#[test]
fn a_batch_of_u64_max_is_refused_without_a_panic() {
    training_refused(
        "2G",
        "(grid: (batch: 18446744073709551615), target: Solid(1.0, 0.0, 0.0))",
        &["grid.batch"],
    );
}

#[test]
fn a_1_by_100000000_grid_is_refused() {
    training_refused(
        "2G",
        "(grid: (height: 1, width: 100000000), target: Solid(1.0, 0.0, 0.0))",
        &["1x100000000", "GiB", "grid.width"],
    );
}

#[test]
fn hidden_channels_of_u64_max_are_refused_by_field() {
    training_refused(
        "2G",
        "(model: (hidden_channels: 18446744073709551615), target: Solid(1.0, 0.0, 0.0))",
        &["model.hidden_channels"],
    );
}

#[test]
fn hidden_channels_beyond_the_backend_are_refused_by_field() {
    training_refused(
        "2G",
        "(model: (hidden_channels: 40), target: Solid(1.0, 0.0, 0.0))",
        &["model.hidden_channels", "at most 32"],
    );
}

#[test]
fn a_height_of_2_to_the_32_is_refused() {
    training_refused(
        "2G",
        "(grid: (height: 4294967296, width: 8), target: Solid(1.0, 0.0, 0.0))",
        &["4294967296", "grid.height"],
    );
}

#[test]
fn a_snapshot_too_large_for_memory_names_output_scale() {
    // Training the plain model on 2048² fits this limit; one snapshot at scale 64 does not.
    training_refused(
        "64G",
        "(grid: (height: 2048, width: 2048), model: (position_octaves: None, mlp_hidden: None), \
         output: (scale: 64), target: Solid(1.0, 0.0, 0.0))",
        &[
            "a snapshot",
            "262148x131072 pixels",
            "GiB",
            "output.scale to at most",
        ],
    );
}

#[test]
fn a_trajectory_gif_wider_than_the_format_names_output_scale() {
    training_refused(
        "8G",
        "(grid: (height: 128, width: 128, batch: 8), model: (position_octaves: None, \
         mlp_hidden: None), output: (scale: 64), target: Solid(1.0, 0.0, 0.0))",
        &["trajectory.gif", "65535", "output.scale to at most 56"],
    );
}

#[test]
fn bench_of_a_100000_grid_is_refused_before_measuring() {
    let o = limited("2G", &["bench", "--sizes", "100000", "--seconds", "0.1"]);
    let err = refused(&o, &["100000x100000", "GiB", "--sizes"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("steps/s"),
        "nothing is measured: {err}"
    );
}

/// The config of the small checkpoints below: an 8×8 grid of the default model.
fn small_config() -> NcaConfig {
    let mut cfg = NcaConfig::default();
    cfg.grid.height = 8;
    cfg.grid.width = 8;
    cfg
}

/// Writes a checkpoint of `cfg` with `weights` and a `target` tensor of `target_shape`.
fn checkpoint(dir: &Path, cfg: &NcaConfig, weights: Weights, target_shape: &[usize]) -> PathBuf {
    let ckpt = Checkpoint {
        config: cfg.clone(),
        weights,
        adam: None,
        training_weights: None,
        progress: Progress::default(),
        state: None,
        backend: "test".into(),
        target: None,
        run_file: None,
    };
    let mut file = ckpt.to_file();
    file.tensors
        .insert("target".into(), HostTensor::filled(target_shape, 0.5));
    let path = dir.join("ckpt.safetensors");
    file.write(&path).expect("write checkpoint");
    path
}

fn valid_checkpoint(dir: &Path) -> PathBuf {
    let cfg = small_config();
    checkpoint(dir, &cfg, Weights::init(&cfg.model, 0), &cfg.target_shape())
}

/// Runs `rollout --checkpoint CKPT --out DIR/out EXTRA` under the limits; expects a
/// refusal with `needles` and no `DIR/out`.
fn rollout_refused(memory: &str, dir: &Path, ckpt: &Path, extra: &[&str], needles: &[&str]) {
    let out = dir.join("out");
    let mut args: Vec<std::ffi::OsString> = vec![
        "rollout".into(),
        "--checkpoint".into(),
        ckpt.into(),
        "--out".into(),
        out.clone().into(),
        "--steps".into(),
        "5".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    let o = limited(memory, &args);
    refused(&o, needles);
    assert!(!out.exists(), "a refused rollout created {}", out.display());
}

#[test]
fn a_small_rollout_passes_under_the_same_limits() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    let out = tmp.path().join("out");
    let o = limited(
        "1G",
        &[
            "rollout".as_ref(),
            "--checkpoint".as_ref(),
            ckpt.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--steps".as_ref(),
            "5".as_ref(),
            "--eval-steps".as_ref(),
            "3".as_ref(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("rollout.json").is_file());
}

#[test]
fn a_checkpoint_claiming_a_grid_of_100000_squared_is_refused() {
    let tmp = TempDir::new().expect("tempdir");
    let mut cfg = small_config();
    cfg.grid.height = 100_000;
    cfg.grid.width = 100_000;
    let ckpt = checkpoint(
        tmp.path(),
        &cfg,
        Weights::init(&cfg.model, 0),
        &[1, 3, 1, 1],
    );
    rollout_refused(
        "2G",
        tmp.path(),
        &ckpt,
        &[],
        &["ckpt.safetensors", "100000", "GiB"],
    );
}

#[test]
fn a_checkpoint_claiming_a_batch_of_a_billion_is_refused() {
    let tmp = TempDir::new().expect("tempdir");
    let mut cfg = small_config();
    cfg.grid.batch = 1_000_000_000;
    let ckpt = checkpoint(
        tmp.path(),
        &cfg,
        Weights::init(&cfg.model, 0),
        &[1, 3, 8, 8],
    );
    rollout_refused(
        "2G",
        tmp.path(),
        &ckpt,
        &[],
        &["ckpt.safetensors", "1000000000", "GiB"],
    );
}

/// A safetensors file whose `state` claims `shape` (F32), made that large by a sparse
/// `set_len` rather than by writing its bytes.
fn sparse_state_file(path: &Path, shape: &[usize]) {
    let elements: usize = shape.iter().product();
    let header = format!(
        "{{\"state\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[0,{}]}}}}",
        elements * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(path, &bytes).expect("write header");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("reopen");
    file.set_len(bytes.len() as u64 + elements as u64 * 4)
        .expect("sparse length");
}

#[test]
fn a_300_mb_init_file_larger_than_the_limit_is_refused_unread() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    let init = tmp.path().join("big.safetensors");
    sparse_state_file(&init, &[300_000, 3, 8, 8]);
    rollout_refused(
        "100M",
        tmp.path(),
        &ckpt,
        &["--init", init.to_str().expect("utf-8")],
        &["big.safetensors", "MiB"],
    );
}

#[test]
fn a_300_mb_init_file_whose_batch_would_not_fit_is_refused_naming_init() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    let init = tmp.path().join("big.safetensors");
    sparse_state_file(&init, &[400_000, 3, 8, 8]);
    rollout_refused(
        "1500M",
        tmp.path(),
        &ckpt,
        &["--init", init.to_str().expect("utf-8")],
        &["batch 400000", "GiB", "--init"],
    );
}

#[test]
fn init_state_of_the_wrong_rank_names_the_file() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    let init = tmp.path().join("flat.safetensors");
    let mut file = TensorFile::default();
    file.tensors
        .insert("state".into(), HostTensor::zeros(&[3, 8, 8]));
    file.write(&init).expect("write");
    rollout_refused(
        "1G",
        tmp.path(),
        &ckpt,
        &["--init", init.to_str().expect("utf-8")],
        &["flat.safetensors", "[3, 8, 8]", "[B, 3, 8, 8]"],
    );
}

#[test]
fn nan_weights_are_refused_naming_the_tensor() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = small_config();
    let mut weights = Weights::init(&cfg.model, 0);
    weights[nca_api::Param::Wq].data_mut()[3] = f32::NAN;
    let ckpt = checkpoint(tmp.path(), &cfg, weights, &cfg.target_shape());
    rollout_refused(
        "1G",
        tmp.path(),
        &ckpt,
        &[],
        &["ckpt.safetensors", "`wq`", "NaN"],
    );
}

#[test]
fn a_nan_init_state_is_refused_naming_the_file() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    let init = tmp.path().join("nan.safetensors");
    let mut state = HostTensor::zeros(&[1, 3, 8, 8]);
    state.data_mut()[10] = f32::NAN;
    let mut file = TensorFile::default();
    file.tensors.insert("state".into(), state);
    file.write(&init).expect("write");
    rollout_refused(
        "1G",
        tmp.path(),
        &ckpt,
        &["--init", init.to_str().expect("utf-8")],
        &["nan.safetensors", "NaN"],
    );
}

#[test]
fn absurd_noise_is_refused() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    rollout_refused(
        "1G",
        tmp.path(),
        &ckpt,
        &["--noise", "1e30"],
        &["--noise", "1000000000000000000000000000000"],
    );
}

#[test]
fn a_rollout_that_becomes_non_finite_fails_naming_the_step() {
    // Finite but enormous output weights without a clamp overflow to inf at the first step.
    let tmp = TempDir::new().expect("tempdir");
    let mut cfg = small_config();
    cfg.model.state_clamp = None;
    let mut weights = Weights::init(&cfg.model, 0);
    weights[nca_api::Param::Bo].data_mut().fill(f32::MAX);
    let ckpt = checkpoint(tmp.path(), &cfg, weights, &cfg.target_shape());
    let out = tmp.path().join("out");
    let o = limited(
        "1G",
        &[
            "rollout".as_ref(),
            "--checkpoint".as_ref(),
            ckpt.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--steps".as_ref(),
            "5".as_ref(),
            "--frame-every".as_ref(),
            "1".as_ref(),
        ],
    );
    refused(&o, &["non-finite", "at step 2"]);
    assert!(
        !out.join("rollout.json").exists(),
        "no summary claims a result"
    );
}

#[test]
fn a_one_channel_target_in_an_rgb_checkpoint_is_refused_before_frames_exist() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = small_config();
    let ckpt = checkpoint(
        tmp.path(),
        &cfg,
        Weights::init(&cfg.model, 0),
        &[1, 1, 8, 8],
    );
    rollout_refused(
        "1G",
        tmp.path(),
        &ckpt,
        &[],
        &[
            "ckpt.safetensors",
            "`target`",
            "[1, 1, 8, 8]",
            "[B, 3, 8, 8]",
        ],
    );
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo failed");
}

#[cfg(unix)]
#[test]
fn a_fifo_as_the_target_image_is_refused_at_once() {
    let tmp = TempDir::new().expect("tempdir");
    mkfifo(&tmp.path().join("pipe.png"));
    let started = Instant::now();
    let cfg = write(
        tmp.path(),
        "run.ron",
        "(grid: (height: 8, width: 8), training: (steps: 2), target: Image(path: \"pipe.png\"))",
    );
    let out = tmp.path().join("out");
    let o = limited("1G", &[cfg.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    refused(&o, &["pipe.png", "FIFO"]);
    assert!(!out.exists());
    assert!(
        started.elapsed() < TIMEOUT,
        "refused at once, not after a wait"
    );
}

#[cfg(unix)]
#[test]
fn a_fifo_as_the_init_state_is_refused_at_once() {
    let tmp = TempDir::new().expect("tempdir");
    let ckpt = valid_checkpoint(tmp.path());
    let fifo = tmp.path().join("state.safetensors");
    mkfifo(&fifo);
    rollout_refused(
        "1G",
        tmp.path(),
        &ckpt,
        &["--init", fifo.to_str().expect("utf-8")],
        &["state.safetensors"],
    );
}

/// CRC-32 (PNG's) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn an_image_declaring_100000_squared_pixels_is_refused_before_decoding() {
    let tmp = TempDir::new().expect("tempdir");
    // A real 1×1 PNG whose header then claims 100000×100000 pixels (CRC fixed up).
    let png = tmp.path().join("huge.png");
    image::RgbImage::new(1, 1).save(&png).expect("png");
    let mut bytes = std::fs::read(&png).expect("read");
    let ihdr = 8; // after the signature: length (4), "IHDR" (4), width, height, …
    bytes[ihdr + 8..ihdr + 12].copy_from_slice(&100_000u32.to_be_bytes());
    bytes[ihdr + 12..ihdr + 16].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bytes[ihdr + 4..ihdr + 8 + 13]);
    bytes[ihdr + 21..ihdr + 25].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&png, &bytes).expect("write");
    let cfg = write(
        tmp.path(),
        "run.ron",
        "(grid: (height: 8, width: 8), training: (steps: 2), target: Image(path: \"huge.png\"))",
    );
    let out = tmp.path().join("out");
    let o = limited("1G", &[cfg.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    refused(&o, &["huge.png", "100000x100000 pixels", "GiB"]);
    assert!(!out.exists());
}
