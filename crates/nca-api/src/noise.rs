//! Reproducible Gaussian noise and the original design's constant noise schedule.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::config::NoiseConfig;
use crate::traits::NoiseSchedule;

/// Elements per independently seeded block in [`fill_gaussian`]; backends that draw
/// noise in parallel split on this boundary to get the same numbers.
pub const NOISE_BLOCK: usize = 1 << 14;

/// What a derived seed is for, so streams never overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// The initial N(0, 1) state.
    Init = 1,
    /// The small noise added before a step.
    Small = 2,
    /// The spike added after a step whose loss fell below ε.
    Spike = 3,
    /// Noise added during a rollout.
    Rollout = 4,
    /// The run seed of the held-out regrowth score (see `eval::held_out_run_seed`).
    HeldOut = 5,
}

/// A seed for `stream` at `step`, derived from the run seed.
///
/// Noise is counter-based rather than drawn from one long RNG so that a resumed run sees
/// exactly the noise an uninterrupted run would have, with no RNG state to checkpoint.
pub fn stream_seed(seed: u64, step: u64, stream: Stream) -> u64 {
    splitmix(splitmix(seed ^ splitmix(stream as u64)) ^ step)
}

/// Fills `out` with `sigma · N(0, 1)` samples reproducibly from `seed`.
///
/// ```
/// let mut a = vec![0.0; 100];
/// let mut b = vec![0.0; 100];
/// nca_api::noise::fill_gaussian(&mut a, 0.5, 42);
/// nca_api::noise::fill_gaussian(&mut b, 0.5, 42);
/// assert_eq!(a, b);
/// ```
pub fn fill_gaussian(out: &mut [f32], sigma: f32, seed: u64) {
    out.fill(0.0);
    add_gaussian(out, sigma, seed);
}

/// Adds `sigma · N(0, 1)` samples to `out`, the same samples [`fill_gaussian`] writes.
pub fn add_gaussian(out: &mut [f32], sigma: f32, seed: u64) {
    for (block, chunk) in out.chunks_mut(NOISE_BLOCK).enumerate() {
        add_gaussian_block(chunk, sigma, seed, block as u64);
    }
}

/// Adds block number `block` (of [`NOISE_BLOCK`] elements) of an [`add_gaussian`] call;
/// lets a backend add noise to blocks in parallel and still match the host numbers.
pub fn add_gaussian_block(out: &mut [f32], sigma: f32, seed: u64, block: u64) {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(splitmix(seed ^ splitmix(block)));
    for x in out {
        let z: f32 = StandardNormal.sample(&mut rng);
        *x += sigma * z;
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The original design's schedule: constant σ_small every step, a σ_large spike whenever the
/// loss drops below ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConstantNoise {
    /// Noise before every step.
    pub sigma_small: f32,
    /// Spike size.
    pub sigma_large: f32,
    /// Spike threshold on the loss.
    pub epsilon: f32,
}

impl From<&NoiseConfig> for ConstantNoise {
    fn from(c: &NoiseConfig) -> Self {
        Self {
            sigma_small: c.sigma_small,
            sigma_large: c.sigma_large,
            epsilon: c.epsilon,
        }
    }
}

impl NoiseSchedule for ConstantNoise {
    fn sigma_small(&self, _step: u64) -> f32 {
        self.sigma_small
    }

    fn sigma_large(&self, _step: u64) -> f32 {
        self.sigma_large
    }

    fn should_spike(&self, loss: f32, _step: u64) -> bool {
        loss < self.epsilon
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_and_steps_give_different_seeds() {
        let a = stream_seed(1, 5, Stream::Small);
        assert_ne!(a, stream_seed(1, 5, Stream::Spike));
        assert_ne!(a, stream_seed(1, 6, Stream::Small));
        assert_ne!(a, stream_seed(2, 5, Stream::Small));
        assert_eq!(a, stream_seed(1, 5, Stream::Small));
    }

    #[test]
    fn blocks_are_independent_of_the_split() {
        let mut whole = vec![0.0; NOISE_BLOCK * 2 + 10];
        fill_gaussian(&mut whole, 1.0, 9);
        let mut tail = vec![0.0; 10];
        add_gaussian_block(&mut tail, 1.0, 9, 2);
        assert_eq!(&whole[NOISE_BLOCK * 2..], &tail[..]);
    }
}
