//! Fuzz-style property tests of two readers of hostile input: the RON run
//! file (`RunConfig::from_ron` + `validate`, then `preflight::check_run`) and the
//! `--init` state reader (`rollout::read_init_state`). Arbitrary text or bytes and
//! mutations of valid files must never panic, and must never allocate more than the
//! memory limit: a counting global allocator measures the peak each call reaches.
//!
//! About 2,000 cases per reader run by default in seconds; the `#[ignore]`d variants
//! run 100,000 (`cargo test -p nca-run --test fuzz_inputs -- --ignored`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use nca_api::{HostTensor, MemoryLimit, NcaConfig, TensorFile};
use nca_run::backend::Backend;
use nca_run::config::RunConfig;
use nca_run::preflight::check_run;
use nca_run::rollout::read_init_state;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Counts the bytes the current thread holds and the most it held, so that tests running
/// on other threads do not disturb a measurement.
struct Counting;

thread_local! {
    static HELD: Cell<u64> = const { Cell::new(0) };
    static PEAK: Cell<u64> = const { Cell::new(0) };
}

fn add(bytes: usize) {
    let _ = HELD.try_with(|held| {
        let now = held.get().saturating_add(bytes as u64);
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn sub(bytes: usize) {
    let _ = HELD.try_with(|held| held.set(held.get().saturating_sub(bytes as u64)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// thread-local cells without destructors, so counting never allocates or re-enters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        let out = unsafe { System.realloc(ptr, layout, new_size) };
        sub(layout.size());
        out
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the most bytes this thread allocated beyond what
/// it held before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = HELD.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let out = f();
    let peak = PEAK.with(Cell::get).saturating_sub(before);
    (out, peak)
}

/// The limit every accepted config is checked against.
const RUN_LIMIT: u64 = 64 << 20;

/// The limit for `--init` files (larger than any generated input).
const INIT_LIMIT: u64 = 1 << 20;

/// The RON examples shipped with the project, as mutation seeds.
fn examples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ron"))
        .map(|p| std::fs::read_to_string(p).expect("example"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "examples/*.ron exist");
    out
}

/// One edit of a text or byte string.
#[derive(Clone, Debug)]
enum Edit {
    /// Insert this piece at a fraction of the length.
    Insert(f64, Vec<u8>),
    /// Delete `n` bytes at a fraction of the length.
    Delete(f64, usize),
    /// Replace the number nearest a fraction of the length by this one.
    Number(f64, String),
    /// Flip one byte.
    Flip(f64, u8),
}

/// Numbers hostile to sizes and arithmetic.
fn hostile_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("18446744073709551615".to_string()),
        Just("4294967296".to_string()),
        Just("100000".to_string()),
        Just("1e30".to_string()),
        Just("-1".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f32>().prop_map(|x| format!("{x:?}")),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0.0..1.0f64, proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Edit::Insert(at, b)),
        (0.0..1.0f64, 1..16usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (0.0..1.0f64, hostile_number()).prop_map(|(at, n)| Edit::Number(at, n)),
        (0.0..1.0f64, any::<u8>()).prop_map(|(at, b)| Edit::Flip(at, b)),
    ]
}

/// Applies `edits` to `bytes`.
fn mutate(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len);
    for e in edits {
        match e {
            Edit::Insert(f, piece) => {
                let i = at(*f, bytes.len());
                bytes.splice(i..i, piece.iter().copied());
            }
            Edit::Delete(f, n) => {
                let i = at(*f, bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Edit::Number(f, n) => {
                let i = at(*f, bytes.len());
                let start = bytes[..i]
                    .iter()
                    .rposition(|b| !b.is_ascii_digit())
                    .map_or(0, |p| p + 1);
                let end = bytes[i..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(bytes.len(), |p| i + p);
                bytes.splice(start..end, n.bytes());
            }
            Edit::Flip(f, b) => {
                if !bytes.is_empty() {
                    let i = at(*f, bytes.len() - 1);
                    bytes[i] ^= b | 1;
                }
            }
        }
    }
    bytes
}

/// Reads `text` as a run file; an accepted one goes through `check_run`, which must
/// refuse it or pass it without allocating more than the limit, and a passed one must
/// really fit.
fn run_file_case(text: &str, accepted: &Cell<u32>) -> Result<(), TestCaseError> {
    let limit = MemoryLimit::new(RUN_LIMIT);
    let (parsed, peak) = peak_of(|| RunConfig::from_ron(text, "fuzz.ron"));
    prop_assert!(
        peak <= RUN_LIMIT,
        "parsing allocated {peak} bytes: {text:?}"
    );
    let Ok(cfg) = parsed else {
        return Ok(());
    };
    accepted.set(accepted.get() + 1);
    let nca = cfg.nca();
    let (checked, peak) = peak_of(|| check_run(&cfg, &nca, Backend::Ndarray, &limit));
    prop_assert!(
        peak <= RUN_LIMIT,
        "check_run allocated {peak} bytes for {text:?}"
    );
    if checked.is_ok() {
        let need = nca_api::training_bytes(&nca);
        prop_assert!(
            need.is_some_and(|n| n <= RUN_LIMIT),
            "check_run passed a run that needs {need:?} bytes: {text:?}"
        );
    }
    Ok(())
}

fn run_file_property(cases: u32) {
    let seeds = examples();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let mutated =
        (0..seeds.len(), proptest::collection::vec(edit(), 1..6)).prop_map(move |(i, edits)| {
            String::from_utf8_lossy(&mutate(seeds[i].clone().into_bytes(), &edits)).into_owned()
        });
    let strategy = prop_oneof![
        3 => mutated,
        1 => ".{0,200}",
        1 => "\\(grid: \\(height: [0-9]{1,20}, width: [0-9]{1,20}, batch: [0-9]{1,20}\\), \
              target: Solid\\(1.0, 0.0, 0.0\\)\\)",
    ];
    let accepted = Cell::new(0);
    runner
        .run(&strategy, |text| run_file_case(&text, &accepted))
        .expect("no run file panics or allocates beyond the limit");
    // The property says something only if many cases get past the parser.
    assert!(
        accepted.get() >= cases / 10,
        "only {} of {cases} cases parsed",
        accepted.get()
    );
}

#[test]
fn run_files_never_panic_nor_allocate_beyond_the_limit() {
    run_file_property(2_000);
}

#[test]
#[ignore = "100,000 cases: run with --ignored"]
fn run_files_never_panic_nor_allocate_beyond_the_limit_100k() {
    run_file_property(100_000);
}

/// A valid `--init` file for an 8×8 grid of the default model, as bytes.
fn valid_init_bytes(batch: usize) -> Vec<u8> {
    let mut file = TensorFile::default();
    let mut state = HostTensor::zeros(&[batch, 3, 8, 8]);
    for (i, x) in state.data_mut().iter_mut().enumerate() {
        *x = (i % 7) as f32 / 7.0;
    }
    file.tensors.insert("state".into(), state);
    file.to_bytes().expect("serialise")
}

fn init_config() -> NcaConfig {
    let mut cfg = NcaConfig::default();
    cfg.grid.height = 8;
    cfg.grid.width = 8;
    cfg
}

fn init_property(cases: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("init.safetensors");
    let cfg = init_config();
    let limit = MemoryLimit::new(INIT_LIMIT);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let mutated = (1..4usize, proptest::collection::vec(edit(), 1..6))
        .prop_map(|(batch, edits)| mutate(valid_init_bytes(batch), &edits));
    let strategy = prop_oneof![
        3 => mutated,
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ];
    runner
        .run(&strategy, |bytes| {
            std::fs::write(&path, &bytes).expect("write case");
            let (read, peak) = peak_of(|| read_init_state(&path, &cfg, &limit));
            prop_assert!(
                peak <= INIT_LIMIT,
                "reading {} bytes allocated {peak}",
                bytes.len()
            );
            if let Ok(state) = read {
                prop_assert_eq!(&state.shape()[1..], &[3, 8, 8]);
                prop_assert!(state.is_finite());
            }
            Ok(())
        })
        .expect("no --init file panics or allocates beyond the limit");
}

#[test]
fn init_states_never_panic_nor_allocate_beyond_the_limit() {
    init_property(2_000);
}

#[test]
#[ignore = "100,000 cases: run with --ignored"]
fn init_states_never_panic_nor_allocate_beyond_the_limit_100k() {
    init_property(100_000);
}

#[test]
fn the_allocation_counter_sees_a_large_allocation() {
    let (v, peak) = peak_of(|| vec![0u8; 3 << 20]);
    assert_eq!(v.len(), 3 << 20);
    assert!(peak >= 3 << 20, "peak {peak}");
}

#[test]
fn a_header_claiming_a_huge_state_is_refused_within_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.safetensors");
    let header =
        r#"{"state":{"dtype":"F32","shape":[1000000000,3,8,8],"data_offsets":[0,768000000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let (read, peak) =
        peak_of(|| read_init_state(&path, &init_config(), &MemoryLimit::new(INIT_LIMIT)));
    let msg = format!("{:#}", read.expect_err("refused"));
    assert!(msg.contains("huge.safetensors"), "{msg}");
    assert!(peak <= INIT_LIMIT, "allocated {peak}");
}
