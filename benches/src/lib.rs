//! Shared setup for the backend benchmarks: the workloads and a constructor per compiled
//! backend, so the criterion bench and `bench-table` agree on names.
#![warn(missing_docs)]

use nca_api::{HostTensor, ModelConfig, NcaConfig, OptimizerConfig};

/// One benchmarked grid: `batch` trajectories of `size`×`size` cells.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Grid side in cells.
    pub size: usize,
    /// Batch size.
    pub batch: usize,
}

impl Workload {
    /// Cells updated per step (the throughput unit, with steps).
    pub fn cells(&self) -> u64 {
        (self.size * self.size * self.batch) as u64
    }

    /// The criterion parameter label, e.g. `128x128x8`.
    pub fn label(&self) -> String {
        format!("{}x{}x{}", self.size, self.size, self.batch)
    }

    /// The run config: C = 3, D = 16, defaults otherwise.
    pub fn config(&self) -> NcaConfig {
        let mut cfg = NcaConfig::default();
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

/// The workloads of the full run: sides 32–256, batch 1 and 8.
pub fn full_workloads() -> Vec<Workload> {
    let mut out = Vec::new();
    for size in [32, 64, 128, 256] {
        for batch in [1, 8] {
            out.push(Workload { size, batch });
        }
    }
    out
}

/// The workloads of the quick mode (`NCA_BENCH_QUICK=1`): the two target sizes.
pub fn quick_workloads() -> Vec<Workload> {
    vec![
        Workload { size: 32, batch: 1 },
        Workload {
            size: 128,
            batch: 8,
        },
    ]
}

/// Model and optimiser settings used by every benchmark.
pub fn model_and_optim() -> (ModelConfig, OptimizerConfig) {
    let cfg = NcaConfig::default();
    (cfg.model.clone(), cfg.training.optimizer())
}
