//! Drives the real `nca-cli` binary: the happy path, resume, rollout, Ctrl-C, divergence
//! and every bad input a user can hit.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use image::AnimationDecoder;
use nca_api::{Checkpoint, TensorFile, WEIGHT_NAMES};
use nca_run::config::RunConfig;
use tempfile::TempDir;

mod common;
use common::{nca, stderr, write};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// A tiny, fast run file: 8×8 grid, `steps` steps, green target.
fn tiny(steps: u64, extra_training: &str) -> String {
    format!(
        "(\n  grid: (height: 8, width: 8),\n  training: (steps: {steps}, learning_rate: 0.01{extra_training}),\n  \
         target: Solid(0.0, 1.0, 0.0),\n  output: (snapshot_every: 10, checkpoint_every: 20, scale: 4),\n)\n"
    )
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    nca()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs")
}

/// Runs and expects failure whose stderr contains every `needle`.
fn fails_with(args: &[&std::ffi::OsStr], needles: &[&str]) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("json file");
    serde_json::from_str(&text).expect("valid json")
}

fn gif_frames(path: &Path) -> usize {
    let dec = image::codecs::gif::GifDecoder::new(BufReader::new(File::open(path).expect("gif")))
        .expect("gif header");
    dec.into_frames().count()
}

#[test]
fn happy_path_writes_every_file_and_they_decode() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "tiny.ron", &tiny(40, ""));
    let out = tmp.path().join("run");
    let o = run(&[os(&cfg), os("--out"), os(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("completed: 40 steps"));

    let resolved = std::fs::read_to_string(out.join("config.ron")).expect("config.ron");
    let back = RunConfig::from_ron(&resolved, "config.ron").expect("config.ron parses");
    assert_eq!(back.training.steps, 40);
    assert_eq!(back.output.dir.as_deref(), Some(out.as_path()));

    for step in [0, 10, 20, 30, 40] {
        let p = out.join(format!("snapshots/step_{step:06}.png"));
        let img = image::open(&p).expect("snapshot decodes");
        // One 8×8 state tile and the target beside it, 4× upscaled, 4 px apart.
        assert_eq!(img.width(), 8 * 4 * 2 + 4, "{}", p.display());
    }
    for png in ["target.png", "loss.png", "contact_sheet.png"] {
        image::open(out.join(png)).expect("png decodes");
    }
    // output.gif_frames (100) over 40 steps: step 0 and every step.
    assert_eq!(gif_frames(&out.join("trajectory.gif")), 41);

    let csv = std::fs::read_to_string(out.join("loss.csv")).expect("loss.csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("step,loss,spiked,spikes"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 40);
    assert!(rows[39].starts_with("40,"));

    let ckpt_path = out.join("checkpoint.safetensors");
    let ckpt = Checkpoint::load(&ckpt_path).expect("checkpoint loads");
    assert_eq!(ckpt.progress.step, 40);
    assert!(ckpt.adam.is_some() && ckpt.state.is_some());
    let file = TensorFile::read(&ckpt_path).expect("safetensors");
    for name in WEIGHT_NAMES {
        assert!(file.tensors.contains_key(name), "tensor {name}");
    }
    assert_eq!(file.tensors["target"].shape(), &[1, 3, 8, 8]);

    let s = json(&out.join("summary.json"));
    assert_eq!(s["backend"], "ndarray");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["steps_run"], 40);
    assert_eq!(s["final_step"], 40);
    assert!(s["final_loss"].as_f64().is_some());
    assert!(s["spikes"].is_u64());
    assert!(s.get("first_step_below_epsilon").is_some());
    assert!(s["wall_seconds"].as_f64().expect("seconds") > 0.0);
    assert!(s["steps_per_second"].as_f64().expect("rate") > 0.0);
}

#[test]
fn red_example_reaches_epsilon_and_rollout_regrows_it_deterministically() {
    let tmp = TempDir::new().expect("tempdir");
    let out = tmp.path().join("red");
    let o = run(&[os(&examples().join("red.ron")), os("--out"), os(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["final_step"], 1000);
    let first = s["first_step_below_epsilon"].as_u64().expect("reached ε");
    assert!(first < 1000);
    assert_eq!(
        std::fs::read_dir(out.join("snapshots"))
            .expect("dir")
            .count(),
        11
    );

    let ckpt = out.join("checkpoint.safetensors");
    let mut finals = Vec::new();
    for name in ["a", "b"] {
        let r = tmp.path().join(name);
        let o = run(&[
            os("rollout"),
            os("--checkpoint"),
            os(&ckpt),
            os("--steps"),
            os("60"),
            os("--noise"),
            os("0"),
            os("--out"),
            os(&r),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let summary = json(&r.join("rollout.json"));
        let loss = summary["final_loss"].as_f64().expect("loss");
        assert!(loss < 1e-3, "rollout from noise regrows red: loss {loss}");
        assert!(gif_frames(&r.join("rollout.gif")) > 10);
        let state = TensorFile::read(&r.join("final.safetensors")).expect("final");
        assert_eq!(state.tensors["state"].shape(), &[1, 3, 32, 32]);
        finals.push(state.tensors["state"].clone());
    }
    assert_eq!(finals[0], finals[1], "--noise 0 is deterministic");

    // Continue from a given state, then refuse one of the wrong shape.
    let o = run(&[
        os("rollout"),
        os("--checkpoint"),
        os(&ckpt),
        os("--init"),
        os(&tmp.path().join("a/final.safetensors")),
        os("--steps"),
        os("5"),
        os("--out"),
        os(&tmp.path().join("c")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut bad = TensorFile::default();
    bad.tensors
        .insert("state".into(), nca_api::HostTensor::zeros(&[1, 3, 8, 8]));
    let bad_path = tmp.path().join("bad_state.safetensors");
    bad.write(&bad_path).expect("write");
    fails_with(
        &[
            os("rollout"),
            os("--checkpoint"),
            os(&ckpt),
            os("--init"),
            os(&bad_path),
            os("--out"),
            os(&tmp.path().join("d")),
        ],
        &["[1, 3, 8, 8]", "[B, 3, 32, 32]"],
    );
    assert!(
        !tmp.path().join("d").exists(),
        "nothing written on bad input"
    );
}

#[test]
fn resume_continues_exactly() {
    let tmp = TempDir::new().expect("tempdir");
    // A constant rate and a written moving average: the schedule and the average chosen
    // for a small grid are fitted to `steps`, so the 25-step run would not be the first
    // 25 steps of the 40-step one.
    let constant = ", lr_schedule: Constant, ema_decay: 0.9";
    let c40 = write(tmp.path(), "c40.ron", &tiny(40, constant));
    let c25 = write(tmp.path(), "c25.ron", &tiny(25, constant));
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    assert!(run(&[os(&c40), os("--out"), os(&full)]).status.success());
    assert!(run(&[os(&c25), os("--out"), os(&part)]).status.success());
    let ckpt = part.join("checkpoint.safetensors");
    let o = run(&[os(&c40), os("--resume"), os(&ckpt)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read_to_string(full.join("loss.csv")).expect("csv");
    let b = std::fs::read_to_string(part.join("loss.csv")).expect("csv");
    assert_eq!(a, b, "a resumed run sees the same noise and Adam state");
    let s = json(&part.join("summary.json"));
    assert_eq!(s["resumed_from_step"], 25);
    assert_eq!(s["steps_run"], 15);
    let (x, y) = (
        Checkpoint::load(&full.join("checkpoint.safetensors")).expect("load"),
        Checkpoint::load(&ckpt).expect("load"),
    );
    assert_eq!(x.weights, y.weights);
    assert_eq!(x.progress, y.progress);
    // The moving average of the weights (`training.ema_decay`) is the rule; the latest
    // weights beside it are what training resumed from, and both continue exactly.
    assert!(x.training_weights.is_some());
    assert_ne!(x.training_weights.as_ref(), Some(&x.weights));
    assert_eq!(x.training_weights, y.training_weights);

    // Nothing left to do is an error, not a silent success.
    fails_with(
        &[os(&c25), os("--resume"), os(&ckpt)],
        &["already at step 40", "training.steps"],
    );
}

#[test]
fn divergence_names_the_step_and_keeps_the_last_good_checkpoint() {
    let tmp = TempDir::new().expect("tempdir");
    let good = write(tmp.path(), "good.ron", &tiny(20, ""));
    let run_dir = tmp.path().join("run");
    assert!(run(&[os(&good), os("--out"), os(&run_dir)])
        .status
        .success());
    let ckpt = run_dir.join("checkpoint.safetensors");
    let wild = tiny(200, "").replace("learning_rate: 0.01", "learning_rate: 1e30");
    let wild = wild.replace("grid: (", "model: (state_clamp: None),\n  grid: (");
    let wild = write(tmp.path(), "wild.ron", &wild);
    let err = fails_with(
        &[os(&wild), os("--resume"), os(&ckpt)],
        &[
            "at step 2",
            "lower learning rate",
            "grad_clip",
            "last good checkpoint (step 20)",
        ],
    );
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    let kept = Checkpoint::load(&ckpt).expect("last good checkpoint still loads");
    assert_eq!(kept.progress.step, 20);
    assert!(kept.weights.is_finite());
    let s = json(&run_dir.join("summary.json"));
    assert_eq!(s["status"], "diverged");
    let csv = std::fs::read_to_string(run_dir.join("loss.csv")).expect("csv");
    let last = csv.lines().last().expect("rows");
    assert!(last.contains("NaN") || last.contains("inf"), "{last}");
    assert!(run_dir.join("loss.png").is_file());
}

/// Starts a long run, sends it `signal` (a `kill` option such as `-INT`) once its
/// snapshot of step 50 exists, and checks that it stopped like Ctrl-C: exit status
/// `code` (128 + the signal), status `interrupted`, a checkpoint of the last step, the
/// plots; then that `--resume` continues from it with every step once in `loss.csv`.
#[cfg(unix)]
fn stops_cleanly_on(signal: &str, code: i32) {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "long.ron", &tiny(10_000_000, ""));
    let out = tmp.path().join("run");
    let mut child = std::process::Command::new(common::binary())
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let started = Instant::now();
    while !out.join("snapshots/step_000050.png").exists() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            child.wait().ok();
            panic!("no snapshot after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // std has no way to send a signal; the `kill` program does it without a libc
    // dependency (it is part of every Unix this runs on: its absence is a failure).
    let sent = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let sent = match sent {
        Ok(status) => status,
        Err(e) => {
            child.kill().ok();
            child.wait().ok();
            panic!("cannot run `kill {signal}`: {e}");
        }
    };
    assert!(sent.success(), "kill {signal}");
    let status = child.wait().expect("exits");
    assert_eq!(status.code(), Some(code), "kill {signal}");
    let s = json(&out.join("summary.json"));
    assert_eq!(s["status"], "interrupted", "kill {signal}");
    let step = s["final_step"].as_u64().expect("step");
    let ckpt = out.join("checkpoint.safetensors");
    assert_eq!(
        Checkpoint::load(&ckpt).expect("checkpoint").progress.step,
        step
    );
    for f in ["loss.png", "trajectory.gif", "contact_sheet.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let more = write(tmp.path(), "more.ron", &tiny(step + 5, ""));
    let o = run(&[os(&more), os("--resume"), os(&ckpt)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(out.join("loss.csv")).expect("loss.csv");
    let steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("step")
        })
        .collect();
    assert_eq!(steps, (1..=step + 5).collect::<Vec<_>>(), "every step once");
    assert_eq!(json(&out.join("summary.json"))["status"], "completed");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_and_still_writes_everything() {
    stops_cleanly_on("-INT", 130);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_like_ctrl_c_and_the_run_resumes() {
    stops_cleanly_on("-TERM", 143);
}

#[cfg(unix)]
#[test]
fn sighup_stops_like_ctrl_c_and_the_run_resumes() {
    stops_cleanly_on("-HUP", 129);
}

#[test]
fn existing_output_dir_is_refused_unless_forced() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "tiny.ron", &tiny(10, ""));
    let out = tmp.path().join("run");
    assert!(run(&[os(&cfg), os("--out"), os(&out)]).status.success());
    let before = std::fs::read(out.join("summary.json")).expect("summary");
    fails_with(
        &[os(&cfg), os("--out"), os(&out)],
        &["already exists", "--force"],
    );
    assert_eq!(
        std::fs::read(out.join("summary.json")).expect("summary"),
        before
    );
    let o = run(&[os(&cfg), os("--out"), os(&out), os("--force")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn default_output_dir_is_runs_slash_stem() {
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "my-run.ron", &tiny(5, ""));
    let o = nca()
        .current_dir(tmp.path())
        .arg("my-run.ron")
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tmp.path().join("runs/my-run/summary.json").is_file());
}

#[test]
fn misspelled_field_shows_line_and_column() {
    let tmp = TempDir::new().expect("tempdir");
    let text = tiny(10, "").replace("steps: 10", "stpes: 10");
    let cfg = write(tmp.path(), "bad.ron", &text);
    let out = tmp.path().join("out");
    fails_with(&[os(&cfg), os("--out"), os(&out)], &["bad.ron:3:", "stpes"]);
    assert!(!out.exists());
}

#[test]
fn unknown_target_kind_is_reported() {
    let tmp = TempDir::new().expect("tempdir");
    let text = tiny(10, "").replace("Solid(", "Solidd(");
    let cfg = write(tmp.path(), "bad.ron", &text);
    fails_with(&[os(&cfg)], &["bad.ron:4:", "Solidd"]);
}

#[test]
fn missing_config_file_is_reported() {
    fails_with(
        &[os("/nonexistent/run.ron")],
        &["cannot read config file", "/nonexistent/run.ron"],
    );
}

fn image_config(dir: &Path, png: &str, visible: usize) -> PathBuf {
    let text = format!(
        "(grid: (height: 8, width: 8), model: (visible_channels: {visible}), training: (steps: 5), \
         target: Image(path: \"{png}\"))"
    );
    write(dir, "img.ron", &text)
}

#[test]
fn missing_image_is_reported() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = image_config(tmp.path(), "nope.png", 3);
    fails_with(&[os(&cfg)], &["cannot open target image", "nope.png"]);
}

#[test]
fn unreadable_image_is_reported() {
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "junk.png", "this is not a png");
    let cfg = image_config(tmp.path(), "junk.png", 3);
    fails_with(&[os(&cfg)], &["cannot decode target image", "junk.png"]);
}

#[test]
fn colour_image_with_one_visible_channel_is_rejected() {
    let tmp = TempDir::new().expect("tempdir");
    image::RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]))
        .save(tmp.path().join("red.png"))
        .expect("png");
    let cfg = image_config(tmp.path(), "red.png", 1);
    fails_with(&[os(&cfg)], &["colour image", "visible_channels is 1"]);
}

#[test]
fn transparent_image_trains_over_a_background() {
    let tmp = TempDir::new().expect("tempdir");
    image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 10]))
        .save(tmp.path().join("glass.png"))
        .expect("png");
    let cfg = image_config(tmp.path(), "glass.png", 3);
    let o = run(&[os(&cfg), os("--out"), os(&tmp.path().join("run"))]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn wrong_size_image_is_resized_with_a_warning() {
    let tmp = TempDir::new().expect("tempdir");
    image::GrayImage::from_pixel(20, 12, image::Luma([200]))
        .save(tmp.path().join("grey.png"))
        .expect("png");
    let cfg = image_config(tmp.path(), "grey.png", 3);
    let o = nca()
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resizing"), "{}", stderr(&o));
}

fn bad_value(replace: (&str, &str), field: &str) {
    let tmp = TempDir::new().expect("tempdir");
    let text = "(grid: (height: 8, width: 8), noise: (sigma_small: 0.01, epsilon: 0.001), \
         training: (steps: 10, learning_rate: 0.01), target: Solid(0.0, 1.0, 0.0))"
        .replace(replace.0, replace.1);
    let cfg = write(tmp.path(), "bad.ron", &text);
    let out = tmp.path().join("out");
    fails_with(&[os(&cfg), os("--out"), os(&out)], &[field, "bad.ron"]);
    assert!(!out.exists(), "nothing is written for a bad config");
}

#[test]
fn negative_sigma_is_rejected() {
    bad_value(
        ("sigma_small: 0.01", "sigma_small: -0.5"),
        "noise.sigma_small",
    );
}

#[test]
fn non_positive_epsilon_is_rejected() {
    bad_value(("epsilon: 0.001", "epsilon: 0.0"), "noise.epsilon");
}

#[test]
fn non_positive_learning_rate_is_rejected() {
    bad_value(
        ("learning_rate: 0.01", "learning_rate: -0.001"),
        "training.learning_rate",
    );
}

#[test]
fn zero_steps_are_rejected() {
    bad_value(("steps: 10", "steps: 0"), "training.steps");
}

#[test]
fn empty_grid_is_rejected() {
    bad_value(("height: 8", "height: 0"), "grid.height");
}

#[test]
fn checkpoint_with_other_shapes_is_rejected() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "tiny.ron", &tiny(10, ""));
    let out = tmp.path().join("run");
    assert!(run(&[os(&cfg), os("--out"), os(&out)]).status.success());
    let other = tiny(20, "").replace("height: 8, width: 8", "height: 12, width: 8");
    let other = write(tmp.path(), "other.ron", &other);
    fails_with(
        &[
            os(&other),
            os("--resume"),
            os(&out.join("checkpoint.safetensors")),
        ],
        &["shapes differ", "grid.height: checkpoint 8, config 12"],
    );
    fails_with(
        &[
            os(&cfg),
            os("--resume"),
            os(&tmp.path().join("missing.safetensors")),
        ],
        &["cannot resume from", "missing.safetensors"],
    );
}

#[test]
fn unknown_backend_is_rejected() {
    let o = run(&[os("--backend"), os("tpu"), os("x.ron")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("possible values: ndarray"),
        "{}",
        stderr(&o)
    );
}

#[cfg(not(feature = "candle-cuda"))]
#[test]
fn backend_not_compiled_in_names_its_feature() {
    let tmp = TempDir::new().expect("tempdir");
    let cfg = write(tmp.path(), "tiny.ron", &tiny(5, ""));
    let out = tmp.path().join("run");
    fails_with(
        &[
            os("--backend"),
            os("candle-cuda"),
            os(&cfg),
            os("--out"),
            os(&out),
        ],
        &[
            "not compiled",
            "cargo run -p nca-cli --features candle-cuda --",
        ],
    );
    assert!(!out.exists());
}

#[test]
fn rollout_rejects_negative_noise_and_missing_checkpoint() {
    let tmp = TempDir::new().expect("tempdir");
    let out = tmp.path().join("r");
    fails_with(
        &[
            os("rollout"),
            os("--checkpoint"),
            os("missing.safetensors"),
            os("--out"),
            os(&out),
        ],
        &["cannot load checkpoint", "missing.safetensors"],
    );
    fails_with(
        &[
            os("rollout"),
            os("--checkpoint"),
            os("missing.safetensors"),
            os("--noise"),
            os("-1"),
            os("--out"),
            os(&out),
        ],
        &["--noise"],
    );
    assert!(!out.exists());
}

#[test]
fn every_example_parses_validates_and_renders_its_target() {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples()).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("ron") {
            continue;
        }
        let cfg = RunConfig::load(&path).expect("example loads");
        cfg.target
            .render(&cfg.nca(), &examples())
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        seen += 1;
    }
    assert!(seen >= 5, "found {seen} examples");
}

#[test]
fn bench_reports_positive_throughput_for_the_default_backend() {
    let o = run(&[
        os("bench"),
        os("--backends"),
        os("ndarray"),
        os("--sizes"),
        os("8,16"),
        os("--batches"),
        os("2"),
        os("--seconds"),
        os("0.2"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "bench failed: {}", stderr(&o));
    for grid in ["8x8x2", "16x16x2"] {
        let line = out
            .lines()
            .find(|l| l.contains(grid))
            .unwrap_or_else(|| panic!("no {grid} row in: {out}"));
        let steps: f64 = line
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no steps/s in {line:?}"));
        assert!(steps > 0.0 && line.starts_with("ndarray"), "{line}");
    }
    fails_with(&[os("bench"), os("--seconds"), os("0")], &["--seconds"]);
}

#[test]
fn bench_with_a_run_file_measures_the_model_that_run_would_train() {
    // examples/cat128.ron leaves the model to the sizing rule; a 128x128 run trains
    // L = 7, M = 512, so that is what the bench must measure, not the 32x32 default.
    let o = run(&[
        os("bench"),
        os("--backends"),
        os("ndarray"),
        os("--config"),
        &examples().join("cat128.ron").into_os_string(),
        os("--sizes"),
        os("16"),
        os("--seconds"),
        os("0.1"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "bench failed: {}", stderr(&o));
    assert!(
        out.lines()
            .any(|l| l.starts_with("model: picture model L=7 M=512")),
        "{out}"
    );
}

#[test]
fn bench_skips_a_backend_that_cannot_start_once_and_measures_the_rest() {
    // candle-cuda is either not compiled in or has no GPU here; on a GPU machine it
    // measures both grids instead.
    let o = run(&[
        os("bench"),
        os("--backends"),
        os("candle-cuda,ndarray"),
        os("--sizes"),
        os("8,16"),
        os("--batches"),
        os("1"),
        os("--seconds"),
        os("0.1"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "bench failed: {}", stderr(&o));
    let rows = |prefix: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
    let skipped = out.lines().filter(|l| l.contains("skipped")).count();
    assert!(
        (skipped == 1 && rows("candle-cuda") == 1) || (skipped == 0 && rows("candle-cuda") == 2),
        "candle-cuda must be skipped once or measured twice: {out}"
    );
    assert_eq!(rows("ndarray"), 2, "{out}");
}
