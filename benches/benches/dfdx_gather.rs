//! Why nca-dfdx gathers the 3×3 neighbourhood with shifted slices: compared here with a
//! dense one-hot shift matrix applied by one matmul (`cargo bench -p nca-benches --bench
//! dfdx_gather`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dfdx::prelude::Cpu;
use nca_api::{HostTensor, ModelConfig, OptimizerConfig, Transition};
use nca_dfdx::transition::{gather_by_matmul, gather_by_slices};
use nca_dfdx::DfdxTrainer;

fn gather(c: &mut Criterion) {
    let t =
        DfdxTrainer::new(&ModelConfig::default(), &OptimizerConfig::default()).expect("trainer");
    let dev = Cpu::default();
    let mut group = c.benchmark_group("dfdx_gather");
    group.sample_size(10);
    for size in [32usize, 64] {
        let state = t
            .upload(&HostTensor::filled(&[1, 3, size, size], 0.1))
            .expect("state");
        group.throughput(Throughput::Elements((size * size) as u64));
        group.bench_function(BenchmarkId::new("slices", size), |b| {
            b.iter(|| gather_by_slices(&dev, &state).expect("gather"))
        });
        group.bench_function(BenchmarkId::new("dense_matmul", size), |b| {
            b.iter(|| gather_by_matmul(&dev, &state).expect("gather"))
        });
    }
    group.finish();
}

criterion_group!(benches, gather);
criterion_main!(benches);
