//! The page's interface: plain `extern "C"` functions over one global [`Sim`].
//!
//! No wasm-bindgen: the page copies the weights file into memory from [`nca_alloc`],
//! calls [`nca_load`], then drives the simulation with numbers and reads pictures through
//! pointers into the wasm memory. Pointers returned here stay valid until the next call
//! that changes the simulation. Functions that fail return a negative number (or NaN) and
//! leave the reason in [`nca_error_ptr`] / [`nca_error_len`].

use std::sync::{Mutex, MutexGuard};

use crate::Sim;

/// The one simulation of this module instance. A wasm module instance is single-threaded;
/// the mutex only makes the global safe to share in native tests.
static SIM: Mutex<Option<Sim>> = Mutex::new(None);

/// The last error's message (UTF-8).
static ERROR: Mutex<String> = Mutex::new(String::new());

fn sim() -> MutexGuard<'static, Option<Sim>> {
    SIM.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_error(message: String) {
    *ERROR.lock().unwrap_or_else(|e| e.into_inner()) = message;
}

/// Runs `f` on the loaded simulation; without one, or when `f` fails, records the error
/// and returns `failed`.
fn with_sim<R>(failed: R, f: impl FnOnce(&mut Sim) -> Result<R, crate::Error>) -> R {
    match sim().as_mut() {
        Some(s) => f(s).unwrap_or_else(|e| {
            set_error(e.to_string());
            failed
        }),
        None => {
            set_error("no rule loaded".to_string());
            failed
        }
    }
}

/// Reserves `len` bytes of memory for the page to write into; free with [`nca_free`].
#[no_mangle]
pub extern "C" fn nca_alloc(len: usize) -> *mut u8 {
    let mut buf = Vec::<u8>::with_capacity(len.max(1));
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

/// Frees memory from [`nca_alloc`].
///
/// # Safety
/// `ptr` and `len` must come from one [`nca_alloc`] call, freed once.
#[no_mangle]
pub unsafe extern "C" fn nca_free(ptr: *mut u8, len: usize) {
    if !ptr.is_null() {
        // SAFETY: the caller passes back what nca_alloc leaked, with its capacity.
        drop(unsafe { Vec::from_raw_parts(ptr, 0, len.max(1)) });
    }
}

/// Loads a rule from the safetensors bytes at `ptr..ptr+len` (see [`Sim::from_bytes`]);
/// 0 on success, -1 on failure (the previous rule is dropped either way).
///
/// # Safety
/// `ptr` must point to `len` initialised bytes.
#[no_mangle]
pub unsafe extern "C" fn nca_load(ptr: *const u8, len: usize) -> i32 {
    let bytes = if ptr.is_null() || len == 0 {
        &[][..]
    } else {
        // SAFETY: the caller guarantees `len` readable bytes at `ptr`.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    };
    let mut guard = sim();
    *guard = None;
    match Sim::from_bytes(bytes) {
        Ok(s) => {
            *guard = Some(s);
            0
        }
        Err(e) => {
            set_error(e.to_string());
            -1
        }
    }
}

/// Address of the last error message (UTF-8, [`nca_error_len`] bytes).
#[no_mangle]
pub extern "C" fn nca_error_ptr() -> *const u8 {
    ERROR.lock().unwrap_or_else(|e| e.into_inner()).as_ptr()
}

/// Length in bytes of the last error message.
#[no_mangle]
pub extern "C" fn nca_error_len() -> usize {
    ERROR.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Dimension `i` of the state's `[B, C, H, W]` (0 without a rule or for `i > 3`).
#[no_mangle]
pub extern "C" fn nca_dim(i: u32) -> u32 {
    with_sim(0, |s| {
        Ok(s.shape()
            .get(i as usize)
            .map_or(0, |&d| u32::try_from(d).unwrap_or(0)))
    })
}

/// Visible channels of the rule (0 without a rule).
#[no_mangle]
pub extern "C" fn nca_visible() -> u32 {
    with_sim(0, |s| {
        Ok(u32::try_from(s.model().visible_channels).unwrap_or(0))
    })
}

/// Starts over from N(0, 1) noise drawn from `seed`; 0 or -1.
#[no_mangle]
pub extern "C" fn nca_reset(seed: u32) -> i32 {
    with_sim(-1, |s| s.reset(u64::from(seed)).map(|()| 0))
}

/// σ of the noise added before every step (NaN without a rule).
#[no_mangle]
pub extern "C" fn nca_sigma() -> f32 {
    with_sim(f32::NAN, |s| Ok(s.sigma()))
}

/// Sets σ of the noise added before every step.
#[no_mangle]
pub extern "C" fn nca_set_sigma(sigma: f32) {
    with_sim((), |s| {
        s.set_sigma(sigma);
        Ok(())
    });
}

/// Runs `n` noisy, clamped steps ([`Sim::step`]); 0 or -1.
#[no_mangle]
pub extern "C" fn nca_step(n: u32) -> i32 {
    with_sim(-1, |s| s.step(n).map(|()| 0))
}

/// One bare `s + f(s)` ([`Sim::step_exact`]); 0 or -1.
#[no_mangle]
pub extern "C" fn nca_step_exact() -> i32 {
    with_sim(-1, |s| s.step_exact().map(|()| 0))
}

/// Steps since the last reset, as a double (exact below 2^53; -1 without a rule).
#[no_mangle]
pub extern "C" fn nca_steps() -> f64 {
    with_sim(-1.0, |s| Ok(s.steps() as f64))
}

/// Zeroes the cells within `radius` of `(x, y)` (in cells); how many, or -1.
#[no_mangle]
pub extern "C" fn nca_erase(x: f32, y: f32, radius: f32) -> i32 {
    with_sim(-1, |s| {
        Ok(i32::try_from(s.erase(x, y, radius)).unwrap_or(i32::MAX))
    })
}

/// Address of the state, `[B, C, H, W]` row-major f32 ([`nca_state_len`] values).
#[no_mangle]
pub extern "C" fn nca_state_ptr() -> *const f32 {
    with_sim(std::ptr::null(), |s| Ok(s.state().as_ptr()))
}

/// Number of f32 values in the state.
#[no_mangle]
pub extern "C" fn nca_state_len() -> usize {
    with_sim(0, |s| Ok(s.state().len()))
}

/// Renders the first batch element and returns the address of its RGBA bytes
/// (`H·W·4`).
#[no_mangle]
pub extern "C" fn nca_render() -> *const u8 {
    with_sim(std::ptr::null(), |s| Ok(s.render().as_ptr()))
}

/// Address of the target's RGBA bytes (`H·W·4`), null without a target.
#[no_mangle]
pub extern "C" fn nca_target_rgba() -> *const u8 {
    with_sim(std::ptr::null(), |s| {
        let t = s.target_rgba();
        Ok(if t.is_empty() {
            std::ptr::null()
        } else {
            t.as_ptr()
        })
    })
}

/// PSNR in dB of the visible channels against the target; NaN without a target.
#[no_mangle]
pub extern "C" fn nca_psnr() -> f64 {
    with_sim(f64::NAN, |s| Ok(s.psnr().unwrap_or(f64::NAN)))
}
