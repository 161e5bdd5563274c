//! The golden vectors through the code the page runs: `Sim` and the `extern "C"` functions
//! the `.wasm` exports, natively. (`web/test/wasm-golden.test.mjs` runs the same files
//! through the real `.wasm` under Node.)
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use nca_api::{HostTensor, NcaConfig, Param, TensorFile, Weights};
use nca_web::{ffi, Sim};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(name)
}

const GOLDEN: [&str; 7] = [
    "golden_5x5_pos.safetensors",
    "golden_6x7_nopos.safetensors",
    "golden_4x9_hidden.safetensors",
    "golden_5x6_pe_mlp.safetensors",
    "golden_4x7_pe.safetensors",
    "golden_6x5_mlp.safetensors",
    "golden_1x8_pe_mlp.safetensors",
];

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_golden_next_state_through_sim() {
    for name in GOLDEN {
        let bytes = std::fs::read(testdata(name)).unwrap();
        let file = TensorFile::from_bytes(&bytes).unwrap();
        let mut sim = Sim::from_bytes(&bytes).unwrap();
        sim.step_exact().unwrap();
        let want = file.tensors["next_state"].data();
        let d = max_diff(sim.state(), want);
        assert!(d < 1e-5, "{name}: max |Δ| = {d}");
    }
}

/// One test for everything that goes through `ffi`: its simulation is a global, and the
/// test harness runs tests on parallel threads.
#[test]
fn the_exported_functions_match_the_golden_files_and_report_errors() {
    for name in GOLDEN {
        let bytes = std::fs::read(testdata(name)).unwrap();
        let want = TensorFile::from_bytes(&bytes).unwrap().tensors["next_state"].clone();
        let ptr = ffi::nca_alloc(bytes.len());
        // SAFETY: ptr has room for bytes.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        // SAFETY: the bytes were just written.
        assert_eq!(unsafe { ffi::nca_load(ptr, bytes.len()) }, 0, "{name}");
        // SAFETY: same pointer and length as allocated.
        unsafe { ffi::nca_free(ptr, bytes.len()) };
        let dims: Vec<usize> = (0..4).map(|i| ffi::nca_dim(i) as usize).collect();
        assert_eq!(dims, want.shape(), "{name}");
        assert_eq!(ffi::nca_step_exact(), 0);
        let len = ffi::nca_state_len();
        // SAFETY: the state has `len` values until the next call that changes it.
        let got = unsafe { std::slice::from_raw_parts(ffi::nca_state_ptr(), len) };
        let d = max_diff(got, want.data());
        assert!(d < 1e-5, "{name}: max |Δ| = {d}");
    }

    // A broken file leaves an error message and no rule.
    let bad = b"definitely not safetensors";
    // SAFETY: a valid slice.
    assert_eq!(unsafe { ffi::nca_load(bad.as_ptr(), bad.len()) }, -1);
    // SAFETY: the message has nca_error_len bytes.
    let msg = unsafe { std::slice::from_raw_parts(ffi::nca_error_ptr(), ffi::nca_error_len()) };
    let msg = String::from_utf8_lossy(msg);
    assert!(msg.contains("safetensors"), "{msg}");
    assert_eq!(
        ffi::nca_step(1),
        -1,
        "no rule is left loaded after a failed load"
    );

    // A file of the right format whose weights do not fit its config.
    let mut file = TensorFile::from_bytes(&std::fs::read(testdata(GOLDEN[3])).unwrap()).unwrap();
    file.tensors.remove("w1");
    let err = Sim::from_bytes(&file.to_bytes().unwrap()).err().unwrap();
    assert!(err.to_string().contains("w1"), "{err}");
}

/// A web file as `nca-cli web` writes it: config metadata, weights, target, no state.
fn web_file(cfg: &NcaConfig, weights: &Weights, target: &HostTensor) -> Vec<u8> {
    let mut file = TensorFile::default();
    for (name, t) in weights.named() {
        file.tensors.insert(name.to_string(), t.clone());
    }
    file.tensors.insert("target".into(), target.clone());
    file.metadata.insert(
        nca_api::checkpoint::META_CONFIG.into(),
        serde_json::to_string(cfg).unwrap(),
    );
    file.to_bytes().unwrap()
}

#[test]
fn a_config_file_starts_from_the_runs_noise_and_matches_rollout() {
    let mut cfg = NcaConfig::default();
    cfg.grid.height = 6;
    cfg.grid.width = 7;
    cfg.training.seed = 5;
    let mut weights = Weights::init(&cfg.model, 3);
    // Init has a zero output layer: give it one so that steps change the state.
    for x in weights[Param::Wo].data_mut() {
        *x = 0.05;
    }
    let target = HostTensor::filled(&[1, 3, 6, 7], 0.5);
    let bytes = web_file(&cfg, &weights, &target);
    let mut sim = Sim::from_bytes(&bytes).unwrap();
    assert_eq!(sim.shape(), [1, 3, 6, 7]);
    assert_eq!(sim.sigma(), cfg.noise.sigma_small);
    sim.reset(5).unwrap();
    assert_eq!(sim.state(), nca_api::initial_state(&cfg).data());

    // The page's steps are nca_api::rollout's, noise and clamp included.
    use nca_api::{RolloutOptions, Transition};
    let mut t = nca_ndarray::NdarrayTrainer::new(&cfg.model, &Default::default()).unwrap();
    t.set_weights(&weights).unwrap();
    let mut s = t.upload(&nca_api::initial_state(&cfg)).unwrap();
    let options = RolloutOptions {
        steps: 7,
        sigma: cfg.noise.sigma_small,
        state_clamp: cfg.model.state_clamp,
        seed: 5,
        first_step: 0,
    };
    nca_api::rollout::<_, nca_ndarray::Error>(&mut t, &mut s, &options, |_, _, _| Ok(())).unwrap();
    sim.step(3).unwrap();
    sim.step(4).unwrap();
    assert_eq!(sim.steps(), 7);
    assert_eq!(sim.state(), t.download(&s).unwrap().data());

    // Erasing zeroes cells; PSNR against a flat 0.5 target is then 10·log10(1/0.25).
    let n = sim.erase(3.5, 3.0, 100.0);
    assert_eq!(n, 42);
    assert!(sim.state().iter().all(|&x| x == 0.0));
    let psnr = sim.psnr().unwrap();
    assert!((psnr - 10.0 * 4f64.log10()).abs() < 1e-6, "{psnr}");
    assert!(sim.render().chunks(4).all(|p| p == [0, 0, 0, 255]));
    assert!(sim
        .target_rgba()
        .chunks(4)
        .all(|p| p == [128, 128, 128, 255]));
    // A small brush erases only cells whose centre is inside it.
    sim.reset(1).unwrap();
    assert_eq!(sim.erase(1.0, 1.0, 0.75), 4);
}
