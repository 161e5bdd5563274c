//! Shared setup for the backend benchmarks: the workloads and a constructor per compiled
//! backend, so the criterion bench and `bench-table` agree on names.
#![warn(missing_docs)]

use nca_api::{HostTensor, ModelConfig, NcaConfig, OptimizerConfig, SizedDefaults};

/// Which model a workload trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// No position inputs, linear output ([`ModelConfig::plain`]).
    Plain,
    /// The default model: position inputs (L = 6) and the MLP update (M = 128).
    Picture,
    /// The picture model a run file that gives only the grid trains
    /// ([`SizedDefaults::for_grid`]: L = 7, M = 512 at 128×128; L = 8, M = 512 at
    /// 256×256).
    Sized,
}

impl Model {
    /// Short name used in benchmark labels.
    pub fn name(&self) -> &'static str {
        match self {
            Model::Plain => "plain",
            Model::Picture => "picture",
            Model::Sized => "sized",
        }
    }

    /// The model config (C = 3, D = 16) on a `side`×`side` grid.
    pub fn config(&self, side: usize) -> ModelConfig {
        match self {
            Model::Plain => ModelConfig::plain(),
            Model::Picture => ModelConfig::default(),
            Model::Sized => {
                let sized = SizedDefaults::for_grid(side, side);
                ModelConfig {
                    position_octaves: sized.position_octaves,
                    mlp_hidden: sized.mlp_hidden,
                    ..ModelConfig::default()
                }
            }
        }
    }
}

/// One benchmarked grid: `batch` trajectories of `size`×`size` cells of one model.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Grid side in cells.
    pub size: usize,
    /// Batch size.
    pub batch: usize,
    /// The model trained.
    pub model: Model,
}

impl Workload {
    /// Cells updated per step (the throughput unit, with steps).
    pub fn cells(&self) -> u64 {
        (self.size * self.size * self.batch) as u64
    }

    /// The criterion parameter label, e.g. `128x128x8` (the model is in the group name).
    pub fn label(&self) -> String {
        format!("{}x{}x{}", self.size, self.size, self.batch)
    }

    /// The run config: C = 3, D = 16, the workload's model, defaults otherwise.
    pub fn config(&self) -> NcaConfig {
        let mut cfg = NcaConfig {
            model: self.model.config(self.size),
            ..NcaConfig::default()
        };
        cfg.grid.height = self.size;
        cfg.grid.width = self.size;
        cfg.grid.batch = self.batch;
        cfg
    }

    /// A solid-red target of the right shape.
    pub fn target(&self) -> HostTensor {
        let cfg = self.config();
        let mut t = HostTensor::zeros(&cfg.target_shape());
        let plane = self.size * self.size;
        for b in 0..self.batch {
            t.data_mut()[b * 3 * plane..b * 3 * plane + plane].fill(1.0);
        }
        t
    }
}

/// The workloads of the full run for `model`: sides 32–256, batch 1 and 8; the sized
/// model only where it differs from the default one (128 and 256, batch 1, the way a
/// picture is trained).
pub fn full_workloads(model: Model) -> Vec<Workload> {
    if model == Model::Sized {
        return [128, 256]
            .into_iter()
            .map(|size| Workload {
                size,
                batch: 1,
                model,
            })
            .collect();
    }
    let mut out = Vec::new();
    for size in [32, 64, 128, 256] {
        for batch in [1, 8] {
            out.push(Workload { size, batch, model });
        }
    }
    out
}

/// The workloads of the quick mode (`NCA_BENCH_QUICK=1`) for `model`: the two target
/// sizes (128×128×1 for the sized model).
pub fn quick_workloads(model: Model) -> Vec<Workload> {
    if model == Model::Sized {
        return vec![Workload {
            size: 128,
            batch: 1,
            model,
        }];
    }
    vec![
        Workload {
            size: 32,
            batch: 1,
            model,
        },
        Workload {
            size: 128,
            batch: 8,
            model,
        },
    ]
}

/// Optimiser settings used by every benchmark (the defaults).
pub fn optim() -> OptimizerConfig {
    NcaConfig::default().training.optimizer()
}
