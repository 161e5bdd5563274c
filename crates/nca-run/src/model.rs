//! A trained rule as a value: load or save its checkpoint, draw starting noise, step and
//! roll it out on any backend, score its regrowth and turn states into pictures.
//!
//! This is what the Python package's `nca.Model` wraps, so it does not keep a backend
//! alive between calls: each call builds the backend's transition from the weights
//! (cheap next to the steps it runs), which keeps a [`Model`] plain data that can be
//! shared between threads. Numbers match the CLI: [`Model::noise`] is the start of
//! `nca-cli rollout --seed S` and [`Model::rollout`] runs the same loop
//! ([`nca_api::rollout`]) with the same noise streams.

use std::ops::ControlFlow;
use std::path::Path;

use nca_api::{Checkpoint, HostTensor, MemoryLimit, NcaConfig, RolloutOptions, Trainer};

use crate::backend::{dispatch, Backend, Job};
use crate::config::{EvaluationConfig, RunConfig};
use crate::error::{bail, BackendResult, Error, Result, ResultExt};
use crate::files;
use crate::preflight::state_bytes;
use crate::rollout::{unbox, MAX_ROLLOUT_NOISE};
use crate::score;

/// A trained rule: the checkpoint's weights, config, target and run file.
#[derive(Clone, Debug)]
pub struct Model {
    checkpoint: Checkpoint,
}

/// Settings of [`Model::rollout`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RolloutSpec {
    /// Steps to run.
    pub steps: u64,
    /// Noise σ added before every step (0: deterministic).
    pub sigma: f32,
    /// Seed of the per-step noise (the stream `nca-cli rollout --seed` uses).
    pub seed: u64,
    /// Keep the start and the state after every this many steps; `None` keeps only the end.
    pub every: Option<u64>,
}

impl Model {
    /// The rule of an already read checkpoint.
    pub fn from_checkpoint(checkpoint: Checkpoint) -> Self {
        Self { checkpoint }
    }

    /// Reads a checkpoint within `limit` (usually [`MemoryLimit::from_env`]).
    pub fn load(path: &Path, limit: &MemoryLimit) -> Result<Self> {
        let checkpoint = Checkpoint::load_limited(path, limit)
            .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
        Ok(Self { checkpoint })
    }

    /// Writes the checkpoint atomically; `nca-cli rollout --checkpoint` reads it.
    pub fn save(&self, path: &Path) -> Result<()> {
        files::write_checkpoint(&self.checkpoint, path)
    }

    /// The checkpoint behind the rule.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Grid, model, noise and training settings the rule was trained with.
    pub fn config(&self) -> &NcaConfig {
        &self.checkpoint.config
    }

    /// The run file the rule was trained from (`None` when the checkpoint holds none or
    /// this version cannot read it).
    pub fn run_config(&self) -> Option<RunConfig> {
        files::stored_run_config(&self.checkpoint, Path::new("checkpoint"))
    }

    /// The `[B, V, H, W]` target stored with the rule, if any.
    pub fn target(&self) -> Option<&HostTensor> {
        self.checkpoint.target.as_ref()
    }

    /// `[batch, C, H, W]` of a state of this rule.
    pub fn state_shape(&self, batch: usize) -> [usize; 4] {
        let cfg = self.config();
        [batch, cfg.model.channels(), cfg.grid.height, cfg.grid.width]
    }

    /// N(0, 1) noise `[batch, C, H, W]` from `seed`: the start of `nca-cli rollout --seed
    /// seed` (and of training with `training.seed = seed` when `batch` is `grid.batch`).
    /// The size is checked against `limit` before anything is allocated.
    pub fn noise(&self, seed: u64, batch: usize, limit: &MemoryLimit) -> Result<HostTensor> {
        if batch == 0 {
            bail!("batch must be at least 1, found 0");
        }
        self.check_run_size(batch, 1, limit)?;
        Ok(nca_api::initial_noise(self.state_shape(batch), seed))
    }

    /// Checks that `state` is a finite `[B, C, H, W]` state of this rule; returns `B`.
    pub fn check_state(&self, state: &HostTensor) -> Result<usize> {
        let [_, c, h, w] = self.state_shape(1);
        let fits = matches!(*state.shape(), [b, sc, sh, sw] if b >= 1 && (sc, sh, sw) == (c, h, w));
        if !fits {
            bail!(
                "state has shape {:?}, the rule needs [B, {c}, {h}, {w}] (batch, channels, \
                 height, width)",
                state.shape()
            );
        }
        if let Some(at) = state.data().iter().position(|x| !x.is_finite()) {
            bail!("state holds NaN or inf values (the first at element {at})");
        }
        Ok(state.shape()[0])
    }

    /// Refuses work whose states (`kept` of them, batch `batch`) and backend workspace do
    /// not fit `limit`.
    fn check_run_size(&self, batch: usize, kept: u64, limit: &MemoryLimit) -> Result<()> {
        let [b, c, h, w] = self.state_shape(batch);
        let states = state_bytes(b, c, h, w).and_then(|s| s.checked_mul(kept));
        let need = states.and_then(|s| s.checked_add(nca_api::rollout_bytes(self.config(), b)?));
        limit.check(
            &format!("running the rule on a batch of {batch} ({kept} states kept)"),
            need,
            "use a smaller batch or keep fewer states",
        )?;
        Ok(())
    }

    /// Refuses weights holding NaN or inf, as `nca-cli rollout` does.
    fn check_weights(&self) -> Result<()> {
        if let Some(param) = self.checkpoint.weights.first_non_finite() {
            bail!(
                "weight `{}` holds NaN or inf values, so the rule cannot be run (it was \
                 probably written by a run that diverged)",
                param.name()
            );
        }
        Ok(())
    }

    /// Builds the rule on `backend` and runs `job` on it.
    fn on<J: RuleJob>(&self, backend: Backend, job: J) -> Result<J::Output> {
        self.check_weights()?;
        let cfg = self.config();
        backend.check_model(&cfg.model)?;
        dispatch(
            backend,
            &cfg.model,
            &cfg.training.optimizer(),
            WithWeights { model: self, job },
        )
    }

    /// One step of the rule from `state`, without noise, clamped as in training.
    pub fn step(
        &self,
        backend: Backend,
        state: &HostTensor,
        limit: &MemoryLimit,
    ) -> Result<HostTensor> {
        let spec = RolloutSpec {
            steps: 1,
            sigma: 0.0,
            seed: 0,
            every: None,
        };
        let mut out = self.rollout(backend, state, &spec, limit, &mut |_| {
            ControlFlow::Continue(())
        })?;
        out.pop()
            .ok_or_else(|| Error::Invalid("the step produced no state".into()))
    }

    /// Rolls the rule out from `state` as `nca-cli rollout` does (noise σ before every
    /// step from the rollout stream of `spec.seed`, clamp after it). Returns the final
    /// state, or with `spec.every` the start and every `every`-th state (the final one
    /// too when `steps` is not a multiple). `on_step(step)` may stop early: the states so
    /// far are returned, the last one being where it stopped.
    pub fn rollout(
        &self,
        backend: Backend,
        state: &HostTensor,
        spec: &RolloutSpec,
        limit: &MemoryLimit,
        on_step: &mut dyn FnMut(u64) -> ControlFlow<()>,
    ) -> Result<Vec<HostTensor>> {
        if !(spec.sigma.is_finite() && (0.0..=MAX_ROLLOUT_NOISE).contains(&spec.sigma)) {
            bail!(
                "noise must be a finite value from 0 to {MAX_ROLLOUT_NOISE}, found {}",
                spec.sigma
            );
        }
        if spec.every == Some(0) {
            bail!("every must be at least 1, found 0");
        }
        let batch = self.check_state(state)?;
        let kept = match spec.every {
            Some(every) => spec.steps / every + 2,
            None => 1,
        };
        self.check_run_size(batch, kept, limit)?;
        let options = RolloutOptions {
            steps: spec.steps,
            sigma: spec.sigma,
            state_clamp: self.config().model.state_clamp,
            seed: spec.seed,
            first_step: 0,
        };
        self.on(
            backend,
            Rollout {
                state,
                options,
                every: spec.every,
                on_step,
            },
        )
    }

    /// The regrowth score (as in `summary.json`): `seeds` fresh-noise starts rolled out
    /// `steps` steps without noise and compared with `target` (the stored target when
    /// `None`).
    pub fn regrowth(
        &self,
        backend: Backend,
        target: Option<&HostTensor>,
        steps: u64,
        seeds: usize,
        limit: &MemoryLimit,
    ) -> Result<nca_api::RegrowthScore> {
        let evaluation = EvaluationConfig {
            steps,
            seeds,
            ..EvaluationConfig::default()
        };
        evaluation.validate_as("steps", "seeds")?;
        let target = match target.or(self.target()) {
            Some(t) => t,
            None => bail!(
                "the checkpoint holds no target to score against; pass one (an (H, W, 3) \
                 picture)"
            ),
        };
        let cfg = self.config();
        let [_, v, h, w] = cfg.target_shape();
        let fits =
            matches!(*target.shape(), [b, tv, th, tw] if b >= 1 && (tv, th, tw) == (v, h, w));
        if !fits {
            bail!(
                "target has shape {:?}, the rule needs [B, {v}, {h}, {w}]",
                target.shape()
            );
        }
        self.check_run_size(seeds, 1, limit)?;
        self.on(
            backend,
            Score {
                target,
                evaluation,
                run_seed: cfg.training.seed,
                clamp: cfg.model.state_clamp,
            },
        )
    }
}

/// Pictures of a `[B, C, H, W]` state's first `visible` channels (1 grey, 3 RGB) as
/// `[B, H, W, 3]` bytes, drawn as snapshots are (clamped to [0, 1], NaN black).
pub fn to_rgb(state: &HostTensor, visible: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let [b, c, h, w] = state.dims4("state")?;
    if !(visible == 1 || visible == 3) || visible > c {
        bail!("cannot draw {visible} visible channels of a {c}-channel state");
    }
    let plane = h * w;
    let data = state.data();
    let byte = |x: f32| -> u8 {
        let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        (x * 255.0).round() as u8
    };
    let mut out = Vec::with_capacity(b * plane * 3);
    for bi in 0..b {
        let base = bi * c * plane;
        for p in 0..plane {
            for ch in 0..3 {
                let ch = if visible == 1 { 0 } else { ch };
                out.push(byte(data[base + ch * plane + p]));
            }
        }
    }
    Ok((vec![b, h, w, 3], out))
}

/// Work with a backend's transition that already holds the rule's weights.
trait RuleJob {
    type Output;
    fn run<T: Trainer>(self, t: &mut T) -> Result<Self::Output>;
}

/// Sets the weights, then runs the job.
struct WithWeights<'a, J> {
    model: &'a Model,
    job: J,
}

impl<J: RuleJob> Job for WithWeights<'_, J> {
    type Output = J::Output;

    fn run<T: Trainer>(self, mut t: T, _backend: Backend) -> Result<J::Output> {
        t.set_weights(&self.model.checkpoint.weights).backend()?;
        self.job.run(&mut t)
    }
}

struct Rollout<'a> {
    state: &'a HostTensor,
    options: RolloutOptions,
    every: Option<u64>,
    on_step: &'a mut dyn FnMut(u64) -> ControlFlow<()>,
}

impl RuleJob for Rollout<'_> {
    type Output = Vec<HostTensor>;

    fn run<T: Trainer>(self, t: &mut T) -> Result<Vec<HostTensor>> {
        let mut state = t.upload(self.state).backend()?;
        let mut kept = Vec::new();
        if self.every.is_some() {
            kept.push(self.state.clone());
        }
        let (every, on_step) = (self.every, self.on_step);
        let (mut done, mut last_kept) = (0, 0);
        let result = nca_api::rollout(t, &mut state, &self.options, |step, t, s| {
            done = step;
            if every.is_some_and(|e| step % e == 0) {
                kept.push(t.download(s)?);
                last_kept = step;
            }
            if on_step(step).is_break() {
                return Err(Error::Interrupted.into());
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .map_err(unbox);
        match result {
            // A stop asked for by `on_step` keeps the states so far.
            Ok(()) | Err(Error::Interrupted) => {}
            Err(e) => return Err(e),
        }
        if every.is_none() || last_kept != done {
            kept.push(t.download(&state).backend()?);
        }
        Ok(kept)
    }
}

struct Score<'a> {
    target: &'a HostTensor,
    evaluation: EvaluationConfig,
    run_seed: u64,
    clamp: Option<f32>,
}

impl RuleJob for Score<'_> {
    type Output = nca_api::RegrowthScore;

    fn run<T: Trainer>(self, t: &mut T) -> Result<nca_api::RegrowthScore> {
        let r = score::run(
            t,
            self.target,
            &self.evaluation,
            self.run_seed,
            self.clamp,
            false,
        )?;
        Ok(r.score)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nca_api::{GridConfig, ModelConfig, Weights};

    fn model() -> Model {
        let mut config = NcaConfig {
            grid: GridConfig {
                height: 6,
                width: 5,
                batch: 2,
            },
            ..NcaConfig::default()
        };
        config.model = ModelConfig {
            hidden_channels: 2,
            ..ModelConfig::default()
        };
        let mut weights = Weights::init(&config.model, 3);
        // Fresh weights have a zero output projection (f = 0); give the rule an update.
        for (_, t) in weights.named_mut() {
            for (i, x) in t.data_mut().iter_mut().enumerate() {
                *x += 0.01 * ((i % 7) as f32 - 3.0);
            }
        }
        let target = HostTensor::filled(&config.target_shape(), 0.5);
        Model::from_checkpoint(Checkpoint {
            config,
            weights,
            adam: None,
            training_weights: None,
            progress: Default::default(),
            state: None,
            backend: "test".into(),
            target: Some(target),
            run_file: None,
        })
    }

    fn limit() -> MemoryLimit {
        MemoryLimit::new(1 << 30)
    }

    #[test]
    fn noise_is_the_cli_rollout_start() {
        let m = model();
        let n = m.noise(7, 2, &limit()).unwrap();
        let mut seeded = m.config().clone();
        seeded.training.seed = 7;
        assert_eq!(n, nca_api::initial_state(&seeded));
        assert!(m.noise(7, 0, &limit()).is_err());
        let err = m.noise(7, usize::MAX, &limit()).expect_err("too large");
        assert_eq!(err.kind(), crate::ErrorKind::Memory, "{err}");
    }

    #[test]
    fn rollout_keeps_the_start_every_nth_state_and_the_end() {
        let m = model();
        let start = m.noise(1, 1, &limit()).unwrap();
        let spec = |steps, every| RolloutSpec {
            steps,
            sigma: 0.0,
            seed: 0,
            every,
        };
        let go = |s: &RolloutSpec| {
            m.rollout(Backend::Ndarray, &start, s, &limit(), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap()
        };
        let end = go(&spec(5, None));
        assert_eq!(end.len(), 1);
        let kept = go(&spec(5, Some(2)));
        assert_eq!(kept.len(), 4, "steps 0, 2, 4 and 5");
        assert_eq!(kept[0], start);
        assert_eq!(kept[3], end[0]);
        assert_ne!(kept[1], start, "the rule changes the state");
        assert_eq!(go(&spec(4, Some(2))).len(), 3, "steps 0, 2, 4");
        let one = m.step(Backend::Ndarray, &start, &limit()).unwrap();
        assert_eq!(one, go(&spec(1, None))[0]);
        let mut stop = |step| {
            if step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let stopped = m
            .rollout(
                Backend::Ndarray,
                &start,
                &spec(5, None),
                &limit(),
                &mut stop,
            )
            .unwrap();
        assert_eq!(stopped[0], go(&spec(2, None))[0]);
    }

    #[test]
    fn bad_states_and_settings_name_what_is_wrong() {
        let m = model();
        let wrong = HostTensor::zeros(&[1, 3, 6, 5]);
        let err = m
            .step(Backend::Ndarray, &wrong, &limit())
            .expect_err("shape");
        assert!(err.to_string().contains("[B, 5, 6, 5]"), "{err}");
        let mut nan = m.noise(0, 1, &limit()).unwrap();
        nan.data_mut()[3] = f32::NAN;
        let err = m.step(Backend::Ndarray, &nan, &limit()).expect_err("nan");
        assert!(err.to_string().contains("element 3"), "{err}");
        let err = m
            .regrowth(Backend::Ndarray, None, 0, 3, &limit())
            .expect_err("steps");
        assert!(
            err.report().starts_with("invalid steps"),
            "{}",
            err.report()
        );
    }

    #[test]
    fn regrowth_scores_every_seed_reproducibly() {
        let m = model();
        let r = m.regrowth(Backend::Ndarray, None, 4, 2, &limit()).unwrap();
        assert_eq!((r.steps, r.per_seed.len()), (4, 2));
        let again = m.regrowth(Backend::Ndarray, None, 4, 2, &limit()).unwrap();
        assert_eq!(r, again, "reproducible");
    }

    #[test]
    fn pictures_clamp_and_grey_is_repeated() {
        let state = HostTensor::new(&[1, 2, 1, 2], vec![-1.0, 0.5, 2.0, f32::NAN]).unwrap();
        let (shape, bytes) = to_rgb(&state, 1).unwrap();
        assert_eq!(shape, vec![1, 1, 2, 3]);
        assert_eq!(bytes, vec![0, 0, 0, 128, 128, 128]);
        assert!(to_rgb(&state, 3).is_err(), "3 visible channels of 2");
    }
}
