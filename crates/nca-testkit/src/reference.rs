//! A slow, obviously-correct float64 implementation of the transition and loss, straight
//! from the formulas of `testdata/README.md`, used for finite-difference gradient checks.

use nca_api::{position, HostTensor, ModelConfig, Param, Weights, NEIGHBOURS};

fn to64(t: &HostTensor) -> Vec<f64> {
    t.data().iter().map(|&x| f64::from(x)).collect()
}

/// `m · v + bias` for a row-major `[rows, v.len()]` matrix.
fn affine(m: &[f64], bias: &[f64], v: &[f64]) -> Vec<f64> {
    let cols = v.len();
    bias.iter()
        .enumerate()
        .map(|(i, b)| b + (0..cols).map(|j| m[i * cols + j] * v[j]).sum::<f64>())
        .collect()
}

/// The f64 result of one transition.
pub struct Forward {
    /// `f(s)`, `[B, C, H, W]`.
    pub update: Vec<f64>,
    /// Attention `[B, 9, H, W]`.
    pub attention: Vec<f64>,
    /// MLP pre-activations `w1·[u; x] + b1` of every cell, `[B, H, W, M]` (empty without
    /// the MLP): how far each is from relu's kink at 0.
    pub pre_activations: Vec<f64>,
}

/// Computes `f(s)`, the attention and the MLP pre-activations of `model` in f64.
///
/// Panics when `weights` do not fit `model` or the state is not `[B, C, H, W]`.
pub fn forward(model: &ModelConfig, weights: &Weights, state: &HostTensor) -> Forward {
    weights.check(model).expect("weights must fit the model");
    let get = |p: Param| weights.get(p).map(to64);
    let need = |p: Param| to64(&weights[p]);
    let (wq, bq, wk, bk) = (
        need(Param::Wq),
        need(Param::Bq),
        need(Param::Wk),
        need(Param::Bk),
    );
    let (wv, bv, wo, bo) = (
        need(Param::Wv),
        need(Param::Bv),
        need(Param::Wo),
        need(Param::Bo),
    );
    let (pk, pv) = (get(Param::Pk), get(Param::Pv));
    let mlp = get(Param::W1).zip(get(Param::B1));
    let [b, c, h, wd] = model.check_state(state.shape()).expect("state shape");
    let (d, p) = (model.attention_dim, model.position_features());
    let features = model
        .position_octaves
        .map(|l| to64(&position::features(l, h, wd)));
    let s = to64(state);
    // The cell's input vector [s; p], or all zeros outside the grid.
    let input = |bi: usize, y: isize, x: isize| -> Vec<f64> {
        if y < 0 || x < 0 || y >= h as isize || x >= wd as isize {
            return vec![0.0; c + p];
        }
        let (y, x) = (y as usize, x as usize);
        let mut v: Vec<f64> = (0..c)
            .map(|ch| s[((bi * c + ch) * h + y) * wd + x])
            .collect();
        if let Some(f) = &features {
            v.extend((0..p).map(|i| f[(i * h + y) * wd + x]));
        }
        v
    };
    let mut update = vec![0.0; b * c * h * wd];
    let mut attention = vec![0.0; b * NEIGHBOURS * h * wd];
    let mut pre_activations = Vec::new();
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for y in 0..h {
            for x in 0..wd {
                let centre = input(bi, y as isize, x as isize);
                let q = affine(&wq, &bq, &centre);
                let mut keys = Vec::new();
                let mut values = Vec::new();
                for n in 0..NEIGHBOURS {
                    let (dy, dx) = (n as isize / 3 - 1, n as isize % 3 - 1);
                    let cell = input(bi, y as isize + dy, x as isize + dx);
                    let mut k = affine(&wk, &bk, &cell);
                    let mut v = affine(&wv, &bv, &cell);
                    if let (Some(pk), Some(pv)) = (&pk, &pv) {
                        for i in 0..d {
                            k[i] += pk[n * d + i];
                            v[i] += pv[n * d + i];
                        }
                    }
                    keys.push(k);
                    values.push(v);
                }
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| scale * k.iter().zip(&q).map(|(a, b)| a * b).sum::<f64>())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|z| (z - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                let mut u = vec![0.0; d];
                for n in 0..NEIGHBOURS {
                    let a = exps[n] / total;
                    attention[((bi * NEIGHBOURS + n) * h + y) * wd + x] = a;
                    for i in 0..d {
                        u[i] += a * values[n][i];
                    }
                }
                let hidden = match &mlp {
                    Some((w1, b1)) => {
                        let mut ux = u.clone();
                        ux.extend_from_slice(&centre);
                        let z = affine(w1, b1, &ux);
                        pre_activations.extend_from_slice(&z);
                        z.into_iter().map(|z| z.max(0.0)).collect()
                    }
                    None => u,
                };
                let f = affine(&wo, &bo, &hidden);
                for ch in 0..c {
                    update[((bi * c + ch) * h + y) * wd + x] = f[ch];
                }
            }
        }
    }
    Forward {
        update,
        attention,
        pre_activations,
    }
}

/// `mean((s + f(s))[:, :V] - target)²` in f64.
pub fn loss(
    model: &ModelConfig,
    weights: &Weights,
    state: &HostTensor,
    target: &HostTensor,
) -> f64 {
    let f = forward(model, weights, state).update;
    let shape = state.shape();
    let (b, c, plane) = (shape[0], shape[1], shape[2] * shape[3]);
    let v = target.shape()[1];
    let t = target.data();
    let s = state.data();
    let mut sum = 0.0;
    for bi in 0..b {
        for ch in 0..v {
            for p in 0..plane {
                let i = (bi * c + ch) * plane + p;
                let diff = f64::from(s[i]) + f[i] - f64::from(t[(bi * v + ch) * plane + p]);
                sum += diff * diff;
            }
        }
    }
    sum / (b * v * plane) as f64
}

/// Which MLP pre-activations of [`forward`] are positive: a central difference is only
/// valid between weights where these agree (no relu kink crossed).
pub fn relu_signs(model: &ModelConfig, weights: &Weights, state: &HostTensor) -> Vec<bool> {
    forward(model, weights, state)
        .pre_activations
        .iter()
        .map(|&z| z > 0.0)
        .collect()
}

/// Central-difference gradient of [`loss`] for every weight, in f64, with step `h`.
///
/// Panics when a bump moves any MLP pre-activation across relu's kink at 0: a central
/// difference across a kink measures neither side's derivative, so such a test point must
/// be replaced (another seed, a smaller `h`), never accepted with a looser tolerance.
pub fn numerical_gradients(
    model: &ModelConfig,
    weights: &Weights,
    state: &HostTensor,
    target: &HostTensor,
    h: f32,
) -> Vec<(Param, Vec<f64>)> {
    let signs = |w: &Weights| relu_signs(model, w, state);
    let base = signs(weights);
    let mut out = Vec::new();
    for (name, t) in weights.named() {
        let mut grads = Vec::with_capacity(t.len());
        for i in 0..t.len() {
            let mut plus = weights.clone();
            let mut minus = weights.clone();
            bump(&mut plus, name, i, h);
            bump(&mut minus, name, i, -h);
            if !base.is_empty() {
                assert!(
                    signs(&plus) == base && signs(&minus) == base,
                    "bumping {name}[{i}] by ±{h} crosses a relu kink: pick another test point"
                );
            }
            // The bumped weights are f32; use the exact perturbation actually applied.
            let applied = f64::from(value(&plus, name, i)) - f64::from(value(&minus, name, i));
            grads.push(
                (loss(model, &plus, state, target) - loss(model, &minus, state, target)) / applied,
            );
        }
        out.push((name, grads));
    }
    out
}

fn bump(w: &mut Weights, param: Param, i: usize, h: f32) {
    w[param].data_mut()[i] += h;
}

fn value(w: &Weights, param: Param, i: usize) -> f32 {
    w[param].data()[i]
}
