//! Fuzz-style property tests of the safetensors and checkpoint readers: arbitrary bytes,
//! and arbitrary mutations of a valid checkpoint (byte flips, truncation, header-length
//! edits, hostile metadata, NaN tensors), never panic and never allocate more than the
//! memory limit they are given.
//!
//! A counting global allocator measures the peak of live bytes while each reader runs.
//! `cargo test -p nca-api --test fuzz_readers` runs 2,000 cases; the ignored
//! `readers_survive_100k_cases` runs 100,000 (`-- --ignored`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nca_api::checkpoint::{META_ADAM_STEP, META_CONFIG, STATE_TENSOR};
use nca_api::{
    AdamState, Checkpoint, HostTensor, MemoryLimit, NcaConfig, Progress, TensorFile, Weights,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Counts live heap bytes and their peak, for every thread of this test binary.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` comes from the caller's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests share the counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The limit the readers get: small, yet enough for the valid checkpoint below (whose
/// training estimate includes the program's fixed allowance).
const LIMIT: u64 = 128 << 20;

/// What the readers may allocate beyond the limit: the estimates are of tensors and
/// parsed headers, not of every small string and map node.
const SLACK: usize = 8 << 20;

/// Runs `read` and fails when it allocated more than `LIMIT + SLACK` on top of what
/// was live before.
fn within_limit<T>(read: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = read();
    let extra = PEAK.load(Ordering::SeqCst).saturating_sub(before);
    prop_assert!(
        extra <= LIMIT as usize + SLACK,
        "a reader allocated {extra} bytes under a limit of {LIMIT}"
    );
    Ok(out)
}

fn valid_checkpoint() -> Checkpoint {
    let mut config = NcaConfig::default();
    config.grid.height = 6;
    config.grid.width = 5;
    config.grid.batch = 2;
    config.model.hidden_channels = 2;
    config.model.mlp_hidden = Some(16);
    let mut adam = AdamState::new(&config.model);
    adam.step = 40;
    Checkpoint {
        weights: Weights::init(&config.model, 5),
        training_weights: None,
        adam: Some(adam),
        progress: Progress {
            step: 40,
            spikes: 3,
            first_below_epsilon: Some(30),
            last_spike: Some(38),
            average: None,
        },
        state: Some(HostTensor::filled(&config.state_shape(), 0.25)),
        backend: "fuzz".into(),
        target: None,
        run_file: None,
        config,
    }
}

/// Reads `bytes` with both readers; errors are fine, panics and over-allocation are not.
fn read_both(bytes: &[u8]) -> Result<(), TestCaseError> {
    let limit = MemoryLimit::new(LIMIT);
    within_limit(|| TensorFile::from_bytes_limited(bytes, &limit).is_ok())?;
    let loaded =
        within_limit(|| Checkpoint::from_bytes(bytes, Path::new("fuzz.safetensors"), &limit))?;
    if let Ok(ckpt) = loaded {
        // What a caller does next must not panic either.
        let _ = ckpt.first_non_finite();
        let _ = nca_api::training_bytes(&ckpt.config);
    }
    Ok(())
}

/// A hostile edit of the checkpoint's metadata or tensors, made before serialising.
#[derive(Clone, Debug)]
enum Edit {
    None,
    Grid(usize, usize),
    Batch(usize),
    HiddenChannels(usize),
    AdamStep(String),
    ConfigJson(String),
    NonFinite(usize, f32),
    StateShape(Vec<usize>),
    RemoveTensor(usize),
}

fn huge() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(100_000),
        Just(1_000_000_000),
        Just(4_294_967_296),
        Just(usize::MAX),
        any::<usize>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        Just(Edit::None),
        (huge(), huge()).prop_map(|(h, w)| Edit::Grid(h, w)),
        huge().prop_map(Edit::Batch),
        huge().prop_map(Edit::HiddenChannels),
        prop_oneof![
            Just(u64::MAX.to_string()),
            any::<u64>().prop_map(|s| s.to_string()),
            "\\PC{0,12}",
        ]
        .prop_map(Edit::AdamStep),
        "\\PC{0,40}".prop_map(Edit::ConfigJson),
        (
            any::<usize>(),
            prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-f32::INFINITY)]
        )
            .prop_map(|(i, x)| Edit::NonFinite(i, x)),
        proptest::collection::vec(0usize..12, 0..6).prop_map(Edit::StateShape),
        any::<usize>().prop_map(Edit::RemoveTensor),
    ]
}

fn apply(edit: &Edit, file: &mut TensorFile) {
    let mut config: serde_json::Value = file
        .metadata
        .get(META_CONFIG)
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or_default();
    let mut set_config = |path: [&str; 2], value: usize| {
        config[path[0]][path[1]] = serde_json::json!(value);
        config.to_string()
    };
    match edit {
        Edit::None => {}
        Edit::Grid(h, w) => {
            set_config(["grid", "height"], *h);
            let json = set_config(["grid", "width"], *w);
            file.metadata.insert(META_CONFIG.into(), json);
        }
        Edit::Batch(b) => {
            let json = set_config(["grid", "batch"], *b);
            file.metadata.insert(META_CONFIG.into(), json);
        }
        Edit::HiddenChannels(c) => {
            let json = set_config(["model", "hidden_channels"], *c);
            file.metadata.insert(META_CONFIG.into(), json);
        }
        Edit::AdamStep(step) => {
            file.metadata.insert(META_ADAM_STEP.into(), step.clone());
        }
        Edit::ConfigJson(json) => {
            file.metadata.insert(META_CONFIG.into(), json.clone());
        }
        Edit::NonFinite(i, x) => {
            let n = file.tensors.len().max(1);
            if let Some(t) = file.tensors.values_mut().nth(i % n) {
                let len = t.len().max(1);
                if let Some(v) = t.data_mut().get_mut(i % len) {
                    *v = *x;
                }
            }
        }
        Edit::StateShape(shape) => {
            let elements = shape.iter().product::<usize>();
            if let Ok(t) = HostTensor::new(shape, vec![0.5; elements]) {
                file.tensors.insert(STATE_TENSOR.into(), t);
            }
        }
        Edit::RemoveTensor(i) => {
            let n = file.tensors.len().max(1);
            if let Some(name) = file.tensors.keys().nth(i % n).cloned() {
                file.tensors.remove(&name);
            }
        }
    }
}

/// A byte-level mutation of the serialised file.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    HeaderLength(u64),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop_oneof![
            Just(u64::MAX),
            Just(100_000_000u64),
            Just(99_999_999u64),
            0u64..100_000,
            any::<u64>(),
        ]
        .prop_map(Mutation::HeaderLength),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match m {
        Mutation::Flip(i, x) => {
            if let Some(b) = bytes.get_mut(i % len) {
                *b ^= x;
            }
        }
        Mutation::Truncate(i) => bytes.truncate(i % len),
        Mutation::HeaderLength(n) => {
            if let Some(head) = bytes.get_mut(..8) {
                head.copy_from_slice(&n.to_le_bytes());
            }
        }
        Mutation::Insert(i, extra) => {
            let at = i % (bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
    }
}

fn run_cases(cases: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let valid = valid_checkpoint().to_file();
    let valid_bytes = valid.to_bytes().expect("the valid checkpoint serialises");
    // The valid file must load, or the mutations below would only test the first check.
    Checkpoint::from_bytes(&valid_bytes, Path::new("valid"), &MemoryLimit::new(LIMIT))
        .expect("the unmutated checkpoint loads under the fuzz limit");

    let mut runner = TestRunner::new(config.clone());
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            read_both(&bytes)
        })
        .expect("arbitrary bytes");

    let mut runner = TestRunner::new(config);
    runner
        .run(
            &(edit(), proptest::collection::vec(mutation(), 0..4)),
            |(edit, mutations)| {
                let mut file = valid.clone();
                apply(&edit, &mut file);
                let Ok(mut bytes) = file.to_bytes() else {
                    return Ok(());
                };
                for m in &mutations {
                    mutate(&mut bytes, m);
                }
                read_both(&bytes)
            },
        )
        .expect("mutated checkpoints");
}

#[test]
fn readers_survive_arbitrary_and_mutated_files() {
    run_cases(2_000);
}

#[test]
#[ignore = "100,000 cases: about a minute; run with -- --ignored"]
fn readers_survive_100k_cases() {
    run_cases(100_000);
}
