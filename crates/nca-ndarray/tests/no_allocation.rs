//! A training step on an unchanged grid reuses its buffers: nothing proportional to the
//! grid is allocated. The only allocations left are rayon's own: its global job queue
//! grows in small blocks (about one per 63 parallel calls made from outside the pool).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nca_api::{HostTensor, ModelConfig, NcaConfig, OptimizerConfig, Trainer, Transition};
use nca_ndarray::NdarrayTrainer;

/// Counts every allocation in the process (all threads, rayon's workers included).
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_training_step_does_not_allocate() {
    // One test, two models in turn: the global counters are shared by every test in the
    // binary, so the models must not run concurrently.
    for model in [ModelConfig::plain(), ModelConfig::default()] {
        check(model);
    }
}

/// 200 training steps of `model` on a 2×128×96 grid allocate (almost) nothing.
// Part of the test above: any failure should panic, as unwrap does inside `#[test]`.
#[allow(clippy::unwrap_used)]
fn check(model: ModelConfig) {
    let mut cfg = NcaConfig {
        model,
        ..NcaConfig::default()
    };
    cfg.grid.height = 128;
    cfg.grid.width = 96;
    cfg.grid.batch = 2;
    let model: &ModelConfig = &cfg.model;
    let mut t = NdarrayTrainer::new(model, &OptimizerConfig::default()).unwrap();
    let target = HostTensor::filled(&cfg.target_shape(), 0.5);
    let mut state = nca_api::start(&mut t, &cfg, &target).unwrap();
    let step = |t: &mut NdarrayTrainer, state: &mut _, i: u64| {
        t.add_noise(state, 0.01, i).unwrap();
        t.train_step(state).unwrap();
        t.clamp(state, 3.0).unwrap();
    };
    for i in 0..5 {
        step(&mut t, &mut state, i);
    }
    let (count, bytes) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    );
    LARGEST.store(0, Ordering::SeqCst);
    let steps = 200;
    for i in 5..5 + steps {
        step(&mut t, &mut state, i);
    }
    let count = ALLOCATIONS.load(Ordering::SeqCst) - count;
    let bytes = BYTES.load(Ordering::SeqCst) - bytes;
    let largest = LARGEST.load(Ordering::SeqCst);
    let state_bytes = cfg.state_shape().iter().product::<usize>() * 4;
    eprintln!(
        "{:?}/{:?}: {count} allocations, {bytes} bytes, largest {largest} in {steps} steps",
        cfg.model.position_octaves, cfg.model.mlp_hidden
    );
    assert!(
        count <= steps as usize / 10,
        "{count} allocations in {steps} steps"
    );
    assert!(
        largest < state_bytes / 16,
        "allocated {largest} bytes at once (state is {state_bytes})"
    );
}
