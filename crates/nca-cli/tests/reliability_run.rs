//! Reliability of the training path: refusals before anything is written, `--force` and
//! the lock, failures while writing, divergence and crashes. Each test runs the real
//! binary and asserts the exit code, the message and what is on disk afterwards.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nca_api::{Checkpoint, HostTensor, TensorFile};
use tempfile::TempDir;

mod common;
use common::{binary, nca, stderr, write};

/// A tiny, fast run file: 8×8 grid, `steps` steps, green target.
fn tiny(steps: u64, output: &str) -> String {
    format!(
        "(\n  grid: (height: 8, width: 8),\n  training: (steps: {steps}, learning_rate: 0.01),\n  \
         target: Solid(0.0, 1.0, 0.0),\n  output: ({output}),\n  evaluation: (steps: 5, seeds: 1),\n)\n"
    )
}

const TINY_OUTPUT: &str = "snapshot_every: 10, checkpoint_every: 20, scale: 4";

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    nca()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs")
}

/// Runs and expects exit code 1 with every `needle` in stderr; returns stderr.
fn fails_with<S: AsRef<std::ffi::OsStr>>(args: &[S], needles: &[&str]) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

/// A finished 20-step run in `dir/name`; returns its directory.
fn finished_run(dir: &Path, name: &str) -> PathBuf {
    let cfg = write(dir, &format!("{name}.ron"), &tiny(20, TINY_OUTPUT));
    let out = dir.join(name);
    let o = run(&[cfg.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// Every file under `dir` (recursively), relative, sorted, with its bytes.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("inside").to_path_buf();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// Rewrites the checkpoint at `path` after `edit` changed its tensors or metadata.
fn edit_checkpoint(path: &Path, edit: impl FnOnce(&mut TensorFile)) {
    let mut file = TensorFile::read(path).expect("checkpoint reads");
    edit(&mut file);
    std::fs::write(path, file.to_bytes().expect("encodes")).expect("rewrite checkpoint");
}

fn loss_steps(csv: &Path) -> Vec<u64> {
    std::fs::read_to_string(csv)
        .expect("loss.csv")
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("step")
        })
        .collect()
}

// ---- refused before anything is written -------------------------------------------------

#[test]
fn missing_resume_checkpoint_is_reported_once_and_creates_nothing() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "tiny.ron", &tiny(20, TINY_OUTPUT));
    let out = tmp.path().join("new");
    let missing = tmp.path().join("missing.safetensors");
    let err = fails_with(
        &[
            cfg.as_os_str(),
            "--resume".as_ref(),
            missing.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        &["cannot resume from", "missing.safetensors"],
    );
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );
    assert!(!out.exists(), "a refused run created {}", out.display());
}

#[test]
fn resuming_a_checkpoint_with_nan_weights_is_refused_naming_file_and_tensor() {
    let tmp = TempDir::new().expect("tempdir");
    let first = finished_run(tmp.path(), "first");
    let ckpt = first.join("checkpoint.safetensors");
    edit_checkpoint(&ckpt, |f| {
        let wq = f.tensors.get_mut("wq").expect("wq");
        wq.data_mut()[0] = f32::NAN;
    });
    let cfg = write(tmp.path(), "more.ron", &tiny(40, TINY_OUTPUT));
    let out = tmp.path().join("second");
    let err = fails_with(
        &[
            cfg.as_os_str(),
            "--resume".as_ref(),
            ckpt.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        &["`wq`", "NaN"],
    );
    assert!(err.contains(&ckpt.display().to_string()), "{err}");
    assert!(!err.contains("last good checkpoint"), "{err}");
    assert!(!out.exists(), "a refused run created {}", out.display());
}

#[test]
fn resume_state_with_another_batch_is_refused_up_front() {
    let tmp = TempDir::new().expect("tempdir");
    let first = finished_run(tmp.path(), "first");
    let ckpt = first.join("checkpoint.safetensors");
    edit_checkpoint(&ckpt, |f| {
        let shape = f.tensors["state"].shape().to_vec();
        f.tensors.insert(
            "state".into(),
            HostTensor::zeros(&[4, shape[1], shape[2], shape[3]]),
        );
    });
    let cfg = write(tmp.path(), "more.ron", &tiny(80, TINY_OUTPUT));
    let out = tmp.path().join("second");
    let err = fails_with(
        &[
            cfg.as_os_str(),
            "--resume".as_ref(),
            ckpt.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        &["state", "checkpoint.safetensors"],
    );
    assert!(err.contains('4'), "names the batch found: {err}");
    assert!(!out.exists(), "a refused run created {}", out.display());
}

#[test]
fn adam_step_near_u64_max_is_refused_up_front() {
    let tmp = TempDir::new().expect("tempdir");
    let first = finished_run(tmp.path(), "first");
    let ckpt = first.join("checkpoint.safetensors");
    edit_checkpoint(&ckpt, |f| {
        f.metadata.insert("adam.step".into(), u64::MAX.to_string());
    });
    let cfg = write(tmp.path(), "more.ron", &tiny(80, TINY_OUTPUT));
    let out = tmp.path().join("second");
    fails_with(
        &[
            cfg.as_os_str(),
            "--resume".as_ref(),
            ckpt.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        &["adam.step", "checkpoint.safetensors"],
    );
    assert!(!out.exists(), "a refused run created {}", out.display());
}

// ---- inputs, --force and the lock -------------------------------------------------------

#[test]
fn force_onto_the_input_directory_is_refused_and_inputs_stay_intact() {
    let tmp = TempDir::new().expect("tempdir");
    let inp = tmp.path().join("inp");
    std::fs::create_dir_all(&inp).expect("mkdir");
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]))
        .save(inp.join("target.png"))
        .expect("png");
    let text = tiny(20, TINY_OUTPUT).replace(
        "target: Solid(0.0, 1.0, 0.0)",
        "// my notes, which must survive\n  target: Image(path: \"target.png\")",
    );
    let cfg = write(&inp, "config.ron", &text);
    let before = contents(&inp);
    for force in [true, false] {
        let mut args = vec![cfg.as_os_str(), "--out".as_ref(), inp.as_os_str()];
        if force {
            args.push("--force".as_ref());
        }
        let err = fails_with(&args, &["config.ron", "--out DIR"]);
        assert!(err.contains("reads"), "says why: {err}");
    }
    assert_eq!(contents(&inp), before, "inputs untouched");
    // The same with the run file elsewhere: the target image alone makes it an input dir.
    let outside = write(
        tmp.path(),
        "outside.ron",
        &text.replace("target.png", "inp/target.png"),
    );
    fails_with(
        &[
            outside.as_os_str(),
            "--out".as_ref(),
            inp.as_os_str(),
            "--force".as_ref(),
        ],
        &["target image", "target.png"],
    );
    assert_eq!(contents(&inp), before, "inputs untouched");
}

#[test]
fn force_removes_stale_temporaries_of_killed_runs_but_not_user_files() {
    let tmp = TempDir::new().expect("tempdir");
    let out = finished_run(tmp.path(), "run");
    let stale = out.join(".checkpoint.safetensors.999999.tmp");
    std::fs::write(&stale, b"half a checkpoint").expect("write");
    let mine = out.join(".notes.tmp");
    std::fs::write(&mine, b"mine").expect("write");
    let cfg = tmp.path().join("run.ron");
    let o = run(&[
        cfg.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--force".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists(), "stale temporary left behind");
    assert!(mine.exists(), "a user's file was removed");
}

/// Holds the lock of `dir` as a running nca-cli would: the lock file, locked, with a pid.
fn hold_lock(dir: &Path, pid: &str) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(".nca-lock"))
        .expect("lock file");
    file.try_lock().expect("the test takes the lock first");
    std::fs::write(dir.join(".nca-lock"), pid).expect("pid");
    file
}

#[test]
fn a_locked_run_directory_is_refused_at_once_naming_the_holder() {
    let tmp = TempDir::new().expect("tempdir");
    let out = finished_run(tmp.path(), "run");
    let cfg = tmp.path().join("run.ron");
    let more = write(tmp.path(), "more.ron", &tiny(40, TINY_OUTPUT));
    let lock = hold_lock(&out, "424242");
    let before = contents(&out);
    let started = Instant::now();
    // `--force` twice, and two in-place resumes: the second of each meets the lock.
    fails_with(
        &[
            cfg.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--force".as_ref(),
        ],
        &["pid 424242", "in use"],
    );
    fails_with(
        &[
            more.as_os_str(),
            "--resume".as_ref(),
            out.join("checkpoint.safetensors").as_os_str(),
        ],
        &["pid 424242", "in use"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "fails at once instead of waiting"
    );
    assert_eq!(contents(&out), before, "nothing modified while locked");
    drop(lock);
    let o = run(&[
        more.as_os_str(),
        "--resume".as_ref(),
        out.join("checkpoint.safetensors").as_os_str(),
    ]);
    assert!(o.status.success(), "after release: {}", stderr(&o));
    assert_eq!(
        loss_steps(&out.join("loss.csv")),
        (1..=40).collect::<Vec<_>>()
    );
}

// ---- failures while writing -------------------------------------------------------------

/// Runs nca-cli under `ulimit -f KIB` (files may not grow past it; SIGXFSZ ignored, so
/// a write past it fails with EFBIG like a full disk). Needs bash.
fn run_with_file_limit(kib: u64, args: &[&Path]) -> Output {
    let bin = binary();
    let mut script = format!("trap '' XFSZ; ulimit -f {kib}; exec '{}'", bin.display());
    for a in args {
        script.push_str(&format!(" '{}'", a.display()));
    }
    std::process::Command::new("bash")
        .args(["-c", &script])
        .env("RUST_LOG", "warn")
        .output()
        .expect("bash runs nca-cli under `ulimit -f`")
}

#[cfg(unix)]
#[test]
fn failed_checkpoint_write_is_reported_first_and_leaves_no_partial_files() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "tiny.ron", &tiny(40, TINY_OUTPUT));
    let out = tmp.path().join("run");
    // 16 KiB: the run file, target, snapshots and loss.csv fit; the ~300 KiB checkpoint of
    // step 20 does not, nor do the bigger pictures written after it.
    let o = run_with_file_limit(16, &[&cfg, Path::new("--out"), &out]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("an error line");
    assert!(
        first.contains("checkpoint.safetensors") && first.contains("step 20"),
        "the checkpoint write is the first failure named: {err}"
    );
    for (rel, bytes) in contents(&out) {
        let name = rel.display().to_string();
        assert!(!name.ends_with(".tmp"), "temporary left behind: {name}");
        assert!(!bytes.is_empty(), "zero-byte file {name}");
        if name.ends_with(".png") || name.ends_with(".gif") {
            image::load_from_memory(&bytes)
                .unwrap_or_else(|e| panic!("{name} is not a whole picture: {e}"));
        }
    }
    assert!(!out.join("checkpoint.safetensors").exists());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["status"], "failed");
    let error = summary["error"].as_str().expect("error text");
    assert!(error.contains("checkpoint"), "{error}");
    // The message says only what is true: every file it calls written exists.
    let names = err
        .split("written in ")
        .nth(1)
        .and_then(|l| l.split_once(": "))
        .map(|(_, n)| n.lines().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("lists what was written: {err}"));
    let names: Vec<&str> = names
        .split(", ")
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    assert!(!names.is_empty(), "names the files written: {err}");
    for name in names {
        assert!(out.join(name).is_file(), "said written but absent: {name}");
    }
    assert!(err.contains("no checkpoint was written"), "{err}");
}

#[test]
fn divergence_after_resuming_elsewhere_names_no_checkpoint_that_is_not_there() {
    let tmp = TempDir::new().expect("tempdir");
    let first = finished_run(tmp.path(), "first");
    let ckpt = first.join("checkpoint.safetensors");
    let before = std::fs::read(&ckpt).expect("checkpoint");
    let wild = tiny(200, TINY_OUTPUT)
        .replace("learning_rate: 0.01", "learning_rate: 1e30")
        .replace("grid: (", "model: (state_clamp: None),\n  grid: (");
    let wild = write(tmp.path(), "wild.ron", &wild);
    let out = tmp.path().join("second");
    let err = fails_with(
        &[
            wild.as_os_str(),
            "--resume".as_ref(),
            ckpt.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        &["at step 2", "unchanged"],
    );
    assert!(!out.join("checkpoint.safetensors").exists());
    assert!(
        !err.contains(&out.join("checkpoint.safetensors").display().to_string()),
        "claims a checkpoint in the new directory: {err}"
    );
    let names = err
        .split("written in ")
        .nth(1)
        .and_then(|l| l.split_once(": "))
        .map(|(_, n)| n.lines().next().unwrap_or(""))
        .expect("lists what was written");
    for name in names.split(", ").map(str::trim) {
        assert!(out.join(name).is_file(), "said written but absent: {name}");
    }
    assert_eq!(std::fs::read(&ckpt).expect("checkpoint"), before);
}

#[test]
fn a_diverging_run_never_keeps_a_checkpoint_with_non_finite_tensors() {
    let tmp = TempDir::new().expect("tempdir");
    // lr 1 without clamp: the loss stays finite for a while as Adam's moments and the
    // state blow up; each checkpoint must be all finite or not written.
    let text = tiny(400, "snapshot_every: 100, checkpoint_every: 1, scale: 1")
        .replace("learning_rate: 0.01", "learning_rate: 1.0, grad_clip: None")
        .replace("grid: (", "model: (state_clamp: None),\n  grid: (");
    let cfg = write(tmp.path(), "wild.ron", &text);
    let out = tmp.path().join("run");
    let err = fails_with(
        &[cfg.as_os_str(), "--out".as_ref(), out.as_os_str()],
        &["NaN or infinite", "diverged", "learning rate"],
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["status"], "diverged");
    // The run is seeded, so it diverges at the same step every time, after finite
    // checkpoints (step 6 of 7 on ndarray): one must be kept.
    let path = out.join("checkpoint.safetensors");
    assert!(path.is_file(), "no checkpoint kept; stderr: {err}");
    let ckpt = Checkpoint::load(&path).expect("loads");
    assert!(
        ckpt.first_non_finite().is_none(),
        "kept checkpoint of step {} is not finite; stderr: {err}",
        ckpt.progress.step
    );
    let rest = err
        .split("last good checkpoint (step ")
        .nth(1)
        .unwrap_or_else(|| panic!("names the kept checkpoint: {err}"));
    let step: u64 = rest
        .split(')')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("step");
    assert_eq!(step, ckpt.progress.step, "{err}");
}

// ---- history ----------------------------------------------------------------------------

/// Checkpoints every 37 steps; snapshots (which also flush `loss.csv`) far apart, so only
/// the checkpoint's own flush puts the loss rows on disk before the checkpoint of their
/// step.
const CRASH_OUTPUT: &str = "snapshot_every: 1000000, checkpoint_every: 37, scale: 1";

#[test]
fn a_crash_right_after_a_checkpoint_then_resume_leaves_no_gap_in_loss_csv() {
    let tmp = TempDir::new().expect("tempdir");
    let long = write(tmp.path(), "long.ron", &tiny(1000, CRASH_OUTPUT));
    let out = tmp.path().join("run");
    // The process dies as under `kill -9` right after the checkpoint of step 111 (the
    // first at or after 100) is on disk: the worst moment for rows still in a buffer,
    // reached on every run rather than by the timing of a kill.
    let o = run(&[
        long.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--abort-after-checkpoint".as_ref(),
        "100".as_ref(),
    ]);
    assert!(!o.status.success(), "did not crash: {}", stderr(&o));
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            Some(9),
            "died of SIGKILL: {}",
            stderr(&o)
        );
    }
    assert!(
        !out.join("summary.json").exists(),
        "a crashed run wrote its summary"
    );
    let ckpt = out.join("checkpoint.safetensors");
    let at = Checkpoint::load(&ckpt).expect("checkpoint").progress.step;
    assert_eq!(at, 111);
    let on_disk = loss_steps(&out.join("loss.csv"));
    assert_eq!(
        on_disk,
        (1..=at).collect::<Vec<_>>(),
        "loss.csv holds every step up to the checkpoint's, once"
    );
    let resume = write(tmp.path(), "resume.ron", &tiny(at + 10, CRASH_OUTPUT));
    let o = run(&[resume.as_os_str(), "--resume".as_ref(), ckpt.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        loss_steps(&out.join("loss.csv")),
        (1..=at + 10).collect::<Vec<_>>(),
        "every step once, no gap"
    );
}

// ---- sizes: refused before the run directory exists -------------------------------------

#[test]
fn overflowing_hidden_channels_are_refused_before_anything_is_written() {
    let tmp = TempDir::new().expect("tempdir");
    let text = tiny(20, TINY_OUTPUT).replace(
        "grid: (",
        "model: (hidden_channels: 18446744073709551615),\n  grid: (",
    );
    let cfg = write(tmp.path(), "huge.ron", &text);
    let out = tmp.path().join("run");
    let o = run(&[cfg.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("hidden_channels"), "{err}");
    assert!(!out.exists(), "a refused run created {}", out.display());
}

#[test]
fn a_grid_beyond_the_memory_limit_is_refused_before_anything_is_written() {
    let tmp = TempDir::new().expect("tempdir");
    let text = tiny(20, TINY_OUTPUT).replace(
        "grid: (height: 8, width: 8)",
        "grid: (height: 100000, width: 100000)",
    );
    let cfg = write(tmp.path(), "huge.ron", &text);
    let out = tmp.path().join("run");
    let o = nca()
        .args([cfg.as_os_str(), "--out".as_ref(), out.as_os_str()])
        .env("RUST_LOG", "warn")
        .env("NCA_MEMORY_LIMIT", "1G")
        .output()
        .expect("runs");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("NCA_MEMORY_LIMIT"), "names the limit: {err}");
    assert!(!out.exists(), "a refused run created {}", out.display());
}
