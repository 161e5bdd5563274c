//! The two neighbourhood gathers compared in `benches/benches/dfdx_gather.rs` agree.
#![allow(clippy::unwrap_used)]

use dfdx::prelude::*;
use nca_api::{HostTensor, ModelConfig, OptimizerConfig, Transition};
use nca_dfdx::transition::{gather_by_matmul, gather_by_slices};
use nca_dfdx::DfdxTrainer;

#[test]
fn slices_and_dense_shift_matrix_gather_the_same_neighbours() {
    let t = DfdxTrainer::new(&ModelConfig::default(), &OptimizerConfig::default()).unwrap();
    let data: Vec<f32> = (0..2 * 3 * 5 * 7).map(|i| (i as f32 * 0.7).sin()).collect();
    let state = t
        .upload(&HostTensor::new(&[2, 3, 5, 7], data).unwrap())
        .unwrap();
    let dev = Cpu::default();
    let a = gather_by_slices(&dev, &state).unwrap().as_vec();
    let b = gather_by_matmul(&dev, &state).unwrap().as_vec();
    assert_eq!(a, b);
    assert!(a.iter().any(|&x| x != 0.0));
}
