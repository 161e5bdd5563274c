//! A slow, obviously-correct float64 implementation of the transition and loss, used for
//! finite-difference gradient checks.

use nca_api::{HostTensor, Weights, NEIGHBOURS};

/// Weights converted to f64, indexed like the plain tensors.
struct W64 {
    c: usize,
    d: usize,
    wq: Vec<f64>,
    bq: Vec<f64>,
    wk: Vec<f64>,
    bk: Vec<f64>,
    wv: Vec<f64>,
    bv: Vec<f64>,
    wo: Vec<f64>,
    bo: Vec<f64>,
    pk: Option<Vec<f64>>,
    pv: Option<Vec<f64>>,
}

fn to64(t: &HostTensor) -> Vec<f64> {
    t.data().iter().map(|&x| f64::from(x)).collect()
}

impl W64 {
    fn new(w: &Weights) -> Self {
        let get = |n: &str| w.get(n).map(to64).unwrap_or_default();
        let wq = w.get("wq").map_or(&[0, 0][..], |t| t.shape());
        let [d, c] = [wq[0], wq[1]];
        Self {
            c,
            d,
            wq: get("wq"),
            bq: get("bq"),
            wk: get("wk"),
            bk: get("bk"),
            wv: get("wv"),
            bv: get("bv"),
            wo: get("wo"),
            bo: get("bo"),
            pk: w.get("pk").map(to64),
            pv: w.get("pv").map(to64),
        }
    }
}

/// The f64 result of one transition.
pub struct Forward {
    /// `f(s)`, `[B, C, H, W]`.
    pub update: Vec<f64>,
    /// Attention `[B, 9, H, W]`.
    pub attention: Vec<f64>,
}

/// Computes `f(s)` and the attention in f64, straight from the formulas of
/// `testdata/README.md`.
pub fn forward(weights: &Weights, state: &HostTensor) -> Forward {
    let w = W64::new(weights);
    let shape = state.shape();
    let (b, c, h, wd) = (shape[0], shape[1], shape[2], shape[3]);
    assert_eq!(c, w.c, "state channels must match the weights");
    let s = to64(state);
    let d = w.d;
    let at = |bi: usize, ch: usize, y: isize, x: isize| -> f64 {
        if y < 0 || x < 0 || y >= h as isize || x >= wd as isize {
            0.0
        } else {
            s[((bi * c + ch) * h + y as usize) * wd + x as usize]
        }
    };
    let mut update = vec![0.0; b * c * h * wd];
    let mut attention = vec![0.0; b * NEIGHBOURS * h * wd];
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for y in 0..h {
            for x in 0..wd {
                let proj = |m: &[f64], bias: &[f64], cell: &[f64]| -> Vec<f64> {
                    (0..d)
                        .map(|i| bias[i] + (0..c).map(|j| m[i * c + j] * cell[j]).sum::<f64>())
                        .collect()
                };
                let centre: Vec<f64> = (0..c)
                    .map(|ch| at(bi, ch, y as isize, x as isize))
                    .collect();
                let q = proj(&w.wq, &w.bq, &centre);
                let mut keys = Vec::new();
                let mut values = Vec::new();
                for n in 0..NEIGHBOURS {
                    let (dy, dx) = (n as isize / 3 - 1, n as isize % 3 - 1);
                    let cell: Vec<f64> = (0..c)
                        .map(|ch| at(bi, ch, y as isize + dy, x as isize + dx))
                        .collect();
                    let mut k = proj(&w.wk, &w.bk, &cell);
                    let mut v = proj(&w.wv, &w.bv, &cell);
                    if let (Some(pk), Some(pv)) = (&w.pk, &w.pv) {
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
                for ch in 0..c {
                    let f = w.bo[ch] + (0..d).map(|i| w.wo[ch * d + i] * u[i]).sum::<f64>();
                    update[((bi * c + ch) * h + y) * wd + x] = f;
                }
            }
        }
    }
    Forward { update, attention }
}

/// `mean((s + f(s))[:, :V] - target)²` in f64.
pub fn loss(weights: &Weights, state: &HostTensor, target: &HostTensor) -> f64 {
    let f = forward(weights, state).update;
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

/// Central-difference gradient of [`loss`] for every weight, in f64, with step `h`.
pub fn numerical_gradients(
    weights: &Weights,
    state: &HostTensor,
    target: &HostTensor,
    h: f32,
) -> Vec<(&'static str, Vec<f64>)> {
    let mut out = Vec::new();
    for (name, t) in weights.named() {
        let mut grads = Vec::with_capacity(t.len());
        for i in 0..t.len() {
            let mut plus = weights.clone();
            let mut minus = weights.clone();
            bump(&mut plus, name, i, h);
            bump(&mut minus, name, i, -h);
            // The bumped weights are f32; use the exact perturbation actually applied.
            let applied = f64::from(value(&plus, name, i)) - f64::from(value(&minus, name, i));
            grads.push((loss(&plus, state, target) - loss(&minus, state, target)) / applied);
        }
        out.push((name, grads));
    }
    out
}

fn bump(w: &mut Weights, name: &str, i: usize, h: f32) {
    for (n, t) in w.named_mut() {
        if n == name {
            t.data_mut()[i] += h;
        }
    }
}

fn value(w: &Weights, name: &str, i: usize) -> f32 {
    w.named()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or(0.0, |(_, t)| t.data()[i])
}
