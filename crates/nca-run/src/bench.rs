//! A quick training-throughput check of every compiled backend (`nca-cli bench`), so a
//! user can pick one without reading criterion output.
//!
//! Each measurement runs the real training loop (`nca_api::train`: noise, step, Adam,
//! spike check, clamp) on a solid-red target for a fixed wall time after a short warm-up,
//! with the default model or a run file's (`--config`), which it names in its output.
//! The criterion benches in `benches/` are the careful version of this.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::error::{BackendResult, Error, Result, ResultExt};
use nca_api::{
    training_bytes, ConstantNoise, HostTensor, LoopOptions, MemoryLimit, ModelConfig, NcaConfig,
    Progress, StepContext, Trainer,
};

use crate::backend::{dispatch, Backend, Job};

/// Settings of one `bench` invocation.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Backends to measure.
    pub backends: Vec<Backend>,
    /// Model, noise and optimiser settings measured (the default config, or a run file's).
    pub base: NcaConfig,
    /// Grids `(height, width)` to measure.
    pub grids: Vec<(usize, usize)>,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Wall time per measurement.
    pub seconds: f64,
    /// What one workload may allocate (usually [`MemoryLimit::from_env`]).
    pub memory: MemoryLimit,
}

impl BenchArgs {
    /// Every workload's config, checked (validation and memory) before any is measured:
    /// a workload too large for the machine would abort the whole process, not fail.
    pub fn workloads(&self) -> Result<Vec<NcaConfig>> {
        let mut out = Vec::new();
        for &(height, width) in &self.grids {
            for &batch in &self.batches {
                let mut cfg = self.base.clone();
                cfg.grid.height = height;
                cfg.grid.width = width;
                cfg.grid.batch = batch;
                // Long enough never to stop on `steps`; the observer stops on time.
                cfg.training.steps = u64::MAX;
                let what = format!("benchmark workload {height}x{width} batch {batch}");
                cfg.validate().with_context(|| what.clone())?;
                self.memory.check(
                    &format!("training the {what}"),
                    training_bytes(&cfg),
                    "choose smaller --sizes or --batches",
                )?;
                out.push(cfg);
            }
        }
        Ok(out)
    }
}

/// One measured workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Backend name.
    pub backend: &'static str,
    /// Grid `(height, width)`.
    pub grid: (usize, usize),
    /// Batch size.
    pub batch: usize,
    /// Training steps per second.
    pub steps_per_second: f64,
}

impl Measurement {
    /// Cells updated per second (steps/s × B·H·W).
    pub fn cells_per_second(&self) -> f64 {
        self.steps_per_second * (self.grid.0 * self.grid.1 * self.batch) as f64
    }
}

struct Measure {
    cfg: NcaConfig,
    budget: Duration,
}

impl Job for Measure {
    type Output = f64;

    fn run<T: Trainer>(self, mut trainer: T, _backend: Backend) -> Result<f64> {
        let cfg = self.cfg;
        let mut target = HostTensor::zeros(&cfg.target_shape());
        let plane = cfg.grid.height * cfg.grid.width;
        for b in 0..cfg.grid.batch {
            let at = b * cfg.model.visible_channels * plane;
            target.data_mut()[at..at + plane].fill(1.0);
        }
        let mut state = nca_api::start(&mut trainer, &cfg, &target).backend()?;
        let schedule = ConstantNoise::from(&cfg.noise);
        let options = LoopOptions::from_config(&cfg);
        let mut progress = Progress::default();
        // Runs the real loop until `done` holds, then waits for queued device work.
        let mut run_until = |done: &dyn Fn(&StepContext<'_, T>) -> bool| -> Result<()> {
            let mut observer = |ctx: &StepContext<'_, T>| {
                Ok::<_, std::convert::Infallible>(if done(ctx) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            };
            nca_api::train(
                &mut trainer,
                &mut state,
                &schedule,
                &options,
                &mut progress,
                &mut observer,
            )?;
            trainer.synchronize().backend()?;
            Ok(())
        };
        // Warm-up: buffers, caches, device kernels.
        run_until(&|ctx| ctx.info.step >= 3)?;
        let start = Instant::now();
        let budget = self.budget;
        run_until(&|_| start.elapsed() >= budget)?;
        let steps = progress.step - 3;
        Ok(steps as f64 / start.elapsed().as_secs_f64())
    }
}

/// The model in words, as bench and the training log print it: "picture model L=6 M=128
/// D=16 C=3" or "plain model D=16 C=3" (C = visible + hidden channels).
pub fn describe_model(m: &ModelConfig) -> String {
    let kind = match (m.position_octaves, m.mlp_hidden) {
        (None, None) => "plain model".to_string(),
        (Some(l), Some(h)) => format!("picture model L={l} M={h}"),
        (Some(l), None) => format!("model with position inputs L={l}"),
        (None, Some(h)) => format!("model with MLP M={h}"),
    };
    let pos = if m.position_embeddings {
        ""
    } else {
        " no-pk/pv"
    };
    format!("{kind} D={} C={}{pos}", m.attention_dim, m.channels())
}

/// What one measurement of [`bench()`] gave.
#[derive(Debug)]
pub enum BenchLine {
    /// A workload was measured.
    Measured(Measurement),
    /// A backend's first workload failed (e.g. no GPU); the backend is skipped.
    Skipped {
        /// The backend.
        backend: Backend,
        /// Why.
        error: Error,
    },
    /// A later workload failed (e.g. too large); the next one is tried.
    Failed {
        /// The backend.
        backend: Backend,
        /// The workload `(height, width, batch)`.
        workload: (usize, usize, usize),
        /// Why.
        error: Error,
    },
}

/// Measures every backend × workload, telling `report` each result as it comes. A
/// failure is reported and the next workload tried (a large grid may not fit in memory),
/// except that a backend whose first workload fails (e.g. no GPU) is skipped as a whole.
pub fn bench(args: &BenchArgs, report: &mut dyn FnMut(BenchLine)) -> Result<Vec<Measurement>> {
    let workloads = args.workloads()?;
    let mut out = Vec::new();
    'backends: for &backend in &args.backends {
        let mut measured_any = false;
        for cfg in &workloads {
            let (height, width, batch) = (cfg.grid.height, cfg.grid.width, cfg.grid.batch);
            let job = Measure {
                cfg: cfg.clone(),
                budget: Duration::from_secs_f64(args.seconds),
            };
            match dispatch(backend, &cfg.model, &cfg.training.optimizer(), job) {
                Ok(steps_per_second) => {
                    let m = Measurement {
                        backend: backend.name(),
                        grid: (height, width),
                        batch,
                        steps_per_second,
                    };
                    report(BenchLine::Measured(m.clone()));
                    out.push(m);
                    measured_any = true;
                }
                Err(error) if !measured_any => {
                    report(BenchLine::Skipped { backend, error });
                    continue 'backends;
                }
                Err(error) => report(BenchLine::Failed {
                    backend,
                    workload: (height, width, batch),
                    error,
                }),
            }
        }
    }
    Ok(out)
}
