//! The picture features through the real binary: the regrowth score and its files, scores
//! during training, RGBA targets, the aspect-ratio rule, default run directories, bench's
//! model and backend, model mismatches on resume, and checkpoints older than the picture
//! model. Runs are tiny (8×8, tens of steps) to stay fast.

use std::path::Path;
use std::process::Output;

use nca_api::{Checkpoint, HostTensor, ModelConfig, NcaConfig, Progress, Weights};
use tempfile::TempDir;

mod common;
use common::{nca, write};

fn run_in(dir: &Path, args: &[&str]) -> Output {
    nca()
        .current_dir(dir)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("runs")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "failed: {}", text(&o.stderr));
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("json")
}

/// An 8×8 run of `steps` steps; `model` is a RON model section body.
fn tiny(steps: u64, model: &str, extra: &str) -> String {
    format!(
        "(grid: (height: 8, width: 8), model: ({model}), training: (steps: {steps}, \
         learning_rate: 0.01), target: Solid(0.0, 1.0, 0.0), output: (snapshot_every: 10, \
         checkpoint_every: 20, scale: 4){extra})"
    )
}

const PLAIN: &str = "position_octaves: None, mlp_hidden: None";

fn check_score(score: &serde_json::Value, seeds: usize) -> f64 {
    let per = score["per_seed"].as_array().expect("per_seed");
    assert_eq!(per.len(), seeds);
    let mut sum = 0.0;
    for s in per {
        let db = s["psnr_db"].as_f64().expect("psnr");
        let mse = s["mse"].as_f64().expect("mse");
        assert!((0.0..=100.0).contains(&db), "{db}");
        assert!((0.0..=1.0).contains(&mse), "{mse}");
        // The dB value is the MSE's, peak 1.
        assert!((db - (10.0 * (1.0 / mse).log10()).min(100.0)).abs() < 1e-6);
        sum += db;
    }
    let mean = score["mean_psnr_db"].as_f64().expect("mean");
    assert!((mean - sum / seeds as f64).abs() < 1e-9);
    mean
}

#[test]
fn summary_carries_the_regrowth_score_and_rollout_reproduces_it() {
    let tmp = TempDir::new().expect("tempdir");
    write(
        tmp.path(),
        "t.ron",
        &tiny(60, PLAIN, ", evaluation: (steps: 20, seeds: 4)"),
    );
    let o = run_in(tmp.path(), &["t.ron", "--out", "run"]);
    ok(&o);
    assert!(text(&o.stdout).contains("regrowth from fresh noise after 20 steps: PSNR"));
    let out = tmp.path().join("run");
    let s = json(&out.join("summary.json"));
    let mean = check_score(&s["regrowth"], 4);
    assert_eq!(s["regrowth"]["steps"], 20);
    // A solid colour is easy: 60 steps regrow it far better than noise (≈ 5 dB).
    assert!(mean > 15.0, "{mean}");
    let png = image::open(out.join("regrowth.png")).expect("regrowth.png");
    // noise, 1, 2, 4, 8, 16, 20, target: 8 labelled tiles of 32 px.
    assert!(png.width() >= 4 * 32 && png.height() >= 2 * 32);
    image::open(out.join("regrowth.gif")).expect("regrowth.gif decodes");
    image::open(out.join("contact_sheet.png")).expect("contact sheet");
    assert!(
        !out.join("psnr.csv").exists(),
        "no evaluation.every, no curve"
    );

    let o = run_in(
        tmp.path(),
        &[
            "rollout",
            "--checkpoint",
            "run/checkpoint.safetensors",
            "--steps",
            "5",
            "--out",
            "r",
        ],
    );
    ok(&o);
    let r = json(&tmp.path().join("r/rollout.json"));
    assert_eq!(
        r["regrowth"], s["regrowth"],
        "same rule, same starts, same score"
    );
    assert!(tmp.path().join("r/regrowth.png").is_file());
    let o = run_in(
        tmp.path(),
        &[
            "rollout",
            "--checkpoint",
            "run/checkpoint.safetensors",
            "--eval-seeds",
            "0",
            "--out",
            "x",
        ],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--eval-seeds"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn scores_during_training_change_no_loss_and_are_plotted() {
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "a.ron", &tiny(40, "", ""));
    write(
        tmp.path(),
        "b.ron",
        &tiny(40, "", ", evaluation: (steps: 10, every: 15)"),
    );
    ok(&run_in(tmp.path(), &["a.ron", "--out", "a"]));
    let scored = run_in(tmp.path(), &["b.ron", "--out", "b"]);
    ok(&scored);
    let loss = |d: &str| std::fs::read_to_string(tmp.path().join(d).join("loss.csv")).expect("csv");
    assert_eq!(
        loss("a"),
        loss("b"),
        "scoring in between leaves training alone"
    );
    let csv = std::fs::read_to_string(tmp.path().join("b/psnr.csv")).expect("psnr.csv");
    let steps: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap_or(""))
        .collect();
    assert_eq!(steps, ["15", "30", "40"], "{csv}");
    image::open(tmp.path().join("b/psnr.png")).expect("psnr.png");
    // The default (picture) model is scored too.
    check_score(&json(&tmp.path().join("b/summary.json"))["regrowth"], 3);
    // With scores along the way the best-scoring weights are the result
    // (evaluation.keep_best), in best.safetensors; without them, the last weights.
    let kept = &json(&tmp.path().join("b/summary.json"))["kept_step"];
    let step = kept.as_u64().expect("kept_step");
    assert!([15, 30, 40].contains(&step), "{kept}");
    let best = Checkpoint::load(&tmp.path().join("b/best.safetensors"));
    assert_eq!(best.expect("best.safetensors").progress.step, step);
    let stdout = text(&scored.stdout);
    assert!(
        stdout.contains(&format!("kept the weights of step {step}")),
        "{stdout}"
    );
    assert!(json(&tmp.path().join("a/summary.json"))["kept_step"].is_null());
    assert!(!tmp.path().join("a/best.safetensors").exists());
}

#[test]
fn trajectory_gif_has_its_own_frame_rate() {
    let tmp = TempDir::new().expect("tempdir");
    write(
        tmp.path(),
        "t.ron",
        &tiny(50, PLAIN, "").replace("scale: 4)", "scale: 4, gif_frames: 25)"),
    );
    ok(&run_in(tmp.path(), &["t.ron", "--out", "run"]));
    let frames = std::fs::read_dir(tmp.path().join("run/frames"))
        .expect("frames")
        .count();
    assert_eq!(frames, 26, "step 0 and every 2nd step");
    let snaps = std::fs::read_dir(tmp.path().join("run/snapshots"))
        .expect("snaps")
        .count();
    assert_eq!(snaps, 6);
}

fn image_run(dir: &Path, png: &str, fit: &str) -> Output {
    let text = format!(
        "(grid: (height: 8, width: 8), model: ({PLAIN}), training: (steps: 3), \
         target: Image(path: \"{png}\"{fit}), output: (scale: 1))"
    );
    write(dir, "img.ron", &text);
    run_in(dir, &["img.ron", "--out", "run", "--force"])
}

fn target_pixel(dir: &Path, x: u32, y: u32) -> [u8; 3] {
    let img = image::open(dir.join("run/target.png"))
        .expect("target.png")
        .to_rgb8();
    img.get_pixel(x, y).0
}

#[test]
fn rgba_targets_are_composited_over_the_background() {
    let tmp = TempDir::new().expect("tempdir");
    let mut img = image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 255]));
    for x in 0..8 {
        img.put_pixel(x, 0, image::Rgba([255, 0, 0, 0]));
        img.put_pixel(x, 1, image::Rgba([0, 0, 0, 128]));
    }
    img.save(tmp.path().join("rgba.png")).expect("png");
    let o = image_run(tmp.path(), "rgba.png", "");
    ok(&o);
    assert!(
        text(&o.stderr).contains("compositing"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        target_pixel(tmp.path(), 3, 0),
        [255, 255, 255],
        "white by default"
    );
    assert_eq!(target_pixel(tmp.path(), 3, 1), [127, 127, 127]);
    assert_eq!(
        target_pixel(tmp.path(), 3, 5),
        [255, 0, 0],
        "opaque pixels stay"
    );
    ok(&image_run(
        tmp.path(),
        "rgba.png",
        ", background: (0.0, 0.0, 1.0)",
    ));
    assert_eq!(target_pixel(tmp.path(), 3, 0), [0, 0, 255]);
}

#[test]
fn other_aspect_ratios_are_cropped_or_stretched_with_a_warning() {
    let tmp = TempDir::new().expect("tempdir");
    // 24×8: red left third, green middle third, blue right third.
    let img = image::RgbImage::from_fn(24, 8, |x, _| match x / 8 {
        0 => image::Rgb([255, 0, 0]),
        1 => image::Rgb([0, 255, 0]),
        _ => image::Rgb([0, 0, 255]),
    });
    img.save(tmp.path().join("wide.png")).expect("png");
    let o = image_run(tmp.path(), "wide.png", "");
    ok(&o);
    assert!(
        text(&o.stderr).contains("centred 8x8 part"),
        "{}",
        text(&o.stderr)
    );
    for x in [0, 7] {
        assert_eq!(
            target_pixel(tmp.path(), x, 4),
            [0, 255, 0],
            "crop keeps the middle"
        );
    }
    let o = image_run(tmp.path(), "wide.png", ", fit: Stretch");
    ok(&o);
    assert!(
        text(&o.stderr).contains("aspect ratio"),
        "{}",
        text(&o.stderr)
    );
    let left = target_pixel(tmp.path(), 0, 4);
    assert!(
        left[0] > 200 && left[1] < 60,
        "stretch keeps the red third: {left:?}"
    );
}

#[test]
fn a_second_run_without_out_goes_to_the_next_free_directory() {
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "cat.ron", &tiny(3, PLAIN, ""));
    ok(&run_in(tmp.path(), &["cat.ron"]));
    let o = run_in(tmp.path(), &["cat.ron"]);
    ok(&o);
    assert!(
        text(&o.stdout).contains("results in runs/cat-2"),
        "{}",
        text(&o.stdout)
    );
    assert!(tmp.path().join("runs/cat/summary.json").is_file());
    assert!(tmp.path().join("runs/cat-2/summary.json").is_file());
    // An explicit --out is still refused without --force.
    ok(&run_in(tmp.path(), &["cat.ron", "--out", "mine"]));
    let o = run_in(tmp.path(), &["cat.ron", "--out", "mine"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--force"));
}

#[test]
fn bench_names_the_model_and_honours_backend() {
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "plain.ron", &tiny(3, PLAIN, ""));
    let o = run_in(
        tmp.path(),
        &["bench", "--config", "plain.ron", "--seconds", "0.1"],
    );
    ok(&o);
    let out = text(&o.stdout);
    assert!(out.contains("model: plain model D=16 C=3"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ndarray") && l.contains("8x8x1")),
        "{out}"
    );
    let o = run_in(
        tmp.path(),
        &[
            "bench",
            "--sizes",
            "8",
            "--batches",
            "1",
            "--seconds",
            "0.1",
        ],
    );
    ok(&o);
    assert!(text(&o.stdout).contains("picture model L=6 M=128 D=16 C=3"));
    // --backend picks the backend (the test build has dfdx compiled in, see Cargo.toml's
    // dev-dependencies): dfdx is measured, ndarray is not.
    let o = run_in(
        tmp.path(),
        &[
            "bench",
            "--backend",
            "dfdx",
            "--sizes",
            "8",
            "--batches",
            "1",
            "--seconds",
            "0.1",
        ],
    );
    ok(&o);
    let out = text(&o.stdout);
    assert!(out.lines().any(|l| l.starts_with("dfdx")), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("ndarray")), "{out}");
    assert!(!out.contains("not compiled"), "{out}");
}

#[test]
fn resuming_with_other_model_options_names_the_fields() {
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "plain.ron", &tiny(10, PLAIN, ""));
    write(tmp.path(), "picture.ron", &tiny(20, "", ""));
    ok(&run_in(tmp.path(), &["plain.ron", "--out", "run"]));
    let o = run_in(
        tmp.path(),
        &["picture.ron", "--resume", "run/checkpoint.safetensors"],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    for needle in [
        "model.position_octaves: checkpoint None, config Some(6)",
        "model.mlp_hidden: checkpoint None, config Some(128)",
    ] {
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn a_checkpoint_from_before_the_picture_model_loads_as_plain_and_rolls_out() {
    let tmp = TempDir::new().expect("tempdir");
    let mut cfg = NcaConfig {
        model: ModelConfig::plain(),
        ..NcaConfig::default()
    };
    cfg.grid.height = 8;
    cfg.grid.width = 8;
    let ckpt = Checkpoint {
        config: cfg.clone(),
        weights: Weights::init(&cfg.model, 3),
        adam: None,
        training_weights: None,
        progress: Progress::default(),
        state: None,
        backend: "ndarray".into(),
        target: None,
        run_file: None,
    };
    let mut file = ckpt.to_file();
    // The stored config as the old code wrote it: no position_octaves, no mlp_hidden.
    let mut value = serde_json::to_value(&cfg).expect("json");
    let model = value["model"].as_object_mut().expect("model");
    model.remove("position_octaves");
    model.remove("mlp_hidden");
    file.metadata
        .insert(nca_api::checkpoint::META_CONFIG.into(), value.to_string());
    for key in ["position_octaves", "mlp_hidden"] {
        file.metadata.remove(key);
    }
    file.tensors
        .insert("target".into(), HostTensor::filled(&[1, 3, 8, 8], 0.5));
    let path = tmp.path().join("old.safetensors");
    file.write(&path).expect("write");
    assert_eq!(
        Checkpoint::load(&path).expect("loads").config.model,
        ModelConfig::plain()
    );
    let o = run_in(
        tmp.path(),
        &[
            "rollout",
            "--checkpoint",
            "old.safetensors",
            "--steps",
            "5",
            "--out",
            "r",
        ],
    );
    ok(&o);
    check_score(&json(&tmp.path().join("r/rollout.json"))["regrowth"], 3);
}

/// The losses of a run's first steps, from its `loss.csv`.
fn first_losses(run: &Path, count: usize) -> Vec<f64> {
    let csv = std::fs::read_to_string(run.join("loss.csv")).expect("loss.csv");
    csv.lines()
        .skip(1)
        .take(count)
        .map(|row| {
            row.split(',')
                .nth(1)
                .and_then(|l| l.parse().ok())
                .unwrap_or_else(|| panic!("no loss in {row:?}"))
        })
        .collect()
}

#[test]
fn every_cpu_backend_trains_the_picture_model_through_the_cli() {
    // The same run file on each backend: the same weights and noise, so the first steps'
    // losses agree (up to float summation order) before the trajectories drift apart; each
    // checkpoint then rolls out on ndarray, the backend a user is most likely to load it on.
    let tmp = TempDir::new().expect("tempdir");
    write(
        tmp.path(),
        "t.ron",
        &tiny(20, "", ", evaluation: (steps: 5, seeds: 1)"),
    );
    ok(&run_in(tmp.path(), &["t.ron", "--out", "ndarray"]));
    let reference = first_losses(&tmp.path().join("ndarray"), 3);
    for backend in ["dfdx", "candle"] {
        let o = run_in(
            tmp.path(),
            &["--backend", backend, "t.ron", "--out", backend],
        );
        ok(&o);
        let run = tmp.path().join(backend);
        assert_eq!(json(&run.join("summary.json"))["status"], "completed");
        let losses = first_losses(&run, 3);
        for (step, (got, want)) in losses.iter().zip(&reference).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1e-3),
                "{backend} step {}: loss {got}, ndarray {want}",
                step + 1
            );
        }
        let ckpt = format!("{backend}/checkpoint.safetensors");
        let rolled = format!("{backend}-rollout");
        let o = run_in(
            tmp.path(),
            &[
                "rollout",
                "--backend",
                "ndarray",
                "--checkpoint",
                &ckpt,
                "--steps",
                "5",
                "--out",
                &rolled,
            ],
        );
        ok(&o);
        // The rollout scores as many starts as the run was scored with (1 here).
        check_score(
            &json(&tmp.path().join(&rolled).join("rollout.json"))["regrowth"],
            1,
        );
    }
}
