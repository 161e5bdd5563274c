//! The convolutional-attention transition as dfdx tensor ops.
//!
//! Layout inside a step: cells are rows, `N = B·H·W` of them in `(b, y, x)` order, and the
//! nine neighbours are the outermost axis, so keys and values are `[9, N, D]`.
//!
//! The neighbourhood is gathered from the *state*, not from the projected keys/values:
//! the state is a constant of the tape (gradients are cut between steps), so the gather
//! needs no backward pass, and with zero padding `wk·0 + bk = bk` is exactly the key of an
//! outside neighbour. The fixed position features (zero outside the grid too) and offset
//! one-hot columns are joined to the gathered state, so one `[9N, C+P+9] × [C+P+9, D]`
//! matmul yields all nine key sets at once. (Gathering projected keys instead would need a
//! traced gather, and dfdx 0.13's `slice` backward assigns rather than accumulates.)
//!
//! The gather zero-pads with `concat_along` and stacks nine shifted `slice`s; a dense
//! one-hot shift matrix applied by matmul was measured and rejected (see
//! [`gather_by_slices`] for the numbers).

use dfdx::prelude::*;
// `Param` here is this backend's tensor of one parameter; nca-api's names which one.
use nca_api::Param as ParamId;
use nca_api::{HostTensor, ModelConfig, TensorError, Transition, Weights, NEIGHBOURS};

use crate::trainer::DfdxTrainer;
use crate::Error;

/// The backend's state: a dfdx CPU tensor `[B, C, H, W]` with run-time dimensions.
pub type State = Tensor<(usize, usize, usize, usize), f32, Cpu>;

pub(crate) type T1<T = NoneTape> = Tensor<(usize,), f32, Cpu, T>;
pub(crate) type T2<T = NoneTape> = Tensor<(usize, usize), f32, Cpu, T>;
#[doc(hidden)]
pub type T3<T = NoneTape> = Tensor<(usize, usize, usize), f32, Cpu, T>;
pub(crate) type Traced = OwnedTape<f32, Cpu>;

/// One parameter tensor: a vector (biases) or a matrix (projections, embeddings).
pub(crate) enum Param<T = NoneTape> {
    Vector(T1<T>),
    Matrix(T2<T>),
}

impl<T: Tape<f32, Cpu>> Param<T> {
    fn shape(&self) -> Vec<usize> {
        match self {
            Param::Vector(t) => vec![t.shape().0],
            Param::Matrix(t) => vec![t.shape().0, t.shape().1],
        }
    }
}

impl Param {
    /// The values as a flat buffer (both kinds are kept contiguous).
    pub(crate) fn as_vec(&self) -> Vec<f32> {
        match self {
            Param::Vector(t) => t.as_vec(),
            Param::Matrix(t) => t.as_vec(),
        }
    }

    /// This parameter's gradient as a flat buffer.
    pub(crate) fn grad(&self, grads: &Gradients<f32, Cpu>) -> Vec<f32> {
        match self {
            Param::Vector(t) => grads.get(t).as_vec(),
            Param::Matrix(t) => grads.get(t).as_vec(),
        }
    }

    fn traced(&self) -> Param<Traced> {
        match self {
            Param::Vector(t) => Param::Vector(t.leaky_trace()),
            Param::Matrix(t) => Param::Matrix(t.leaky_trace()),
        }
    }

    fn untraced(&self) -> Param {
        match self {
            Param::Vector(t) => Param::Vector(t.clone()),
            Param::Matrix(t) => Param::Matrix(t.clone()),
        }
    }
}

/// The transition's parameters as dfdx tensors, optionally carrying a gradient tape.
///
/// The list is built from [`ModelConfig::parameters`], so it holds exactly the model's
/// parameters (`pk`/`pv` and `w1`/`b1` only when their option is on) in
/// [`Weights::flatten`] order; the forward pass takes them out by name.
pub(crate) struct Params<T = NoneTape> {
    list: Vec<(ParamId, Param<T>)>,
}

fn rank_error(name: &str, expected: usize, found: Vec<usize>) -> Error {
    TensorError::WrongRank {
        what: name.to_string(),
        expected,
        found,
    }
    .into()
}

fn host<S: Shape>(t: &Tensor<S, f32, Cpu>, shape: &[usize]) -> Result<HostTensor, Error> {
    // `as_vec` returns the raw buffer, so the layout must be the logical one.
    let t = t.clone().try_contiguous()?;
    Ok(HostTensor::new(shape, t.as_vec())?)
}

impl Params {
    /// Uploads `model`'s parameters from weights already checked against the model.
    pub(crate) fn upload(dev: &Cpu, model: &ModelConfig, w: &Weights) -> Result<Self, Error> {
        let mut list = Vec::new();
        for spec in model.parameters() {
            let t = w.tensor(spec.param)?;
            let data = t.data().to_vec();
            let param = match *t.shape() {
                [n] => Param::Vector(dev.try_tensor_from_vec(data, (n,))?),
                [r, c] => Param::Matrix(dev.try_tensor_from_vec(data, (r, c))?),
                _ => {
                    return Err(rank_error(
                        spec.name(),
                        spec.shape.len(),
                        t.shape().to_vec(),
                    ))
                }
            };
            list.push((spec.param, param));
        }
        Ok(Self { list })
    }

    /// The parameters in [`Weights::flatten`] order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Param> {
        self.list.iter().map(|(_, p)| p)
    }

    /// The parameters as plain tensors.
    pub(crate) fn download(&self, model: &ModelConfig) -> Result<Weights, Error> {
        let mut w = Weights::zeros(model);
        let flat: Vec<f32> = self.iter().flat_map(Param::as_vec).collect();
        w.unflatten_from(&flat)?;
        Ok(w)
    }

    /// A copy of every parameter starting its own gradient tape.
    pub(crate) fn traced(&self) -> Params<Traced> {
        Params {
            list: self.list.iter().map(|(n, p)| (*n, p.traced())).collect(),
        }
    }

    /// A cheap copy (the buffers are shared) without a tape.
    pub(crate) fn untraced(&self) -> Params {
        Params {
            list: self.list.iter().map(|(n, p)| (*n, p.untraced())).collect(),
        }
    }
}

impl<T: Tape<f32, Cpu>> Params<T> {
    /// Removes `id` from the list; `None` when the model has no such parameter.
    fn take(&mut self, id: ParamId) -> Option<Param<T>> {
        let i = self.list.iter().position(|(n, _)| *n == id)?;
        Some(self.list.swap_remove(i).1)
    }

    fn opt_matrix(&mut self, id: ParamId) -> Result<Option<T2<T>>, Error> {
        match self.take(id) {
            None => Ok(None),
            Some(Param::Matrix(t)) => Ok(Some(t)),
            Some(p) => Err(rank_error(id.name(), 2, p.shape())),
        }
    }

    fn opt_vector(&mut self, id: ParamId) -> Result<Option<T1<T>>, Error> {
        match self.take(id) {
            None => Ok(None),
            Some(Param::Vector(t)) => Ok(Some(t)),
            Some(p) => Err(rank_error(id.name(), 1, p.shape())),
        }
    }

    fn matrix(&mut self, id: ParamId) -> Result<T2<T>, Error> {
        self.opt_matrix(id)?
            .ok_or_else(|| TensorError::Missing(id.name().to_string()).into())
    }

    fn vector(&mut self, id: ParamId) -> Result<T1<T>, Error> {
        self.opt_vector(id)?
            .ok_or_else(|| TensorError::Missing(id.name().to_string()).into())
    }
}

/// The nine zero-padded neighbours of every cell, `[9, N, C]` with `n = 3·(dy+1) + (dx+1)`.
///
/// Chosen by measurement (`benches/benches/dfdx_gather.rs`; first measured in the dev profile, 2 shared cores, default model,
/// B = 1): this gather takes 0.13 ms at 32×32 and 0.29 ms at 64×64, against 15 ms and
/// 176 ms for a dense one-hot `[9·HW, HW]` shift matrix applied by one matmul (building
/// the matrix included; the matmul alone still grows with (H·W)²). A whole 32×32
/// training step of the plain model (then the default) takes about 3.5–3.7 ms (≈ 270
/// steps/s; 64×64: ≈ 14.5 ms), so the gather is a few percent of it; the picture model's
/// step is about twice as long.
#[doc(hidden)]
pub fn gather_by_slices(dev: &Cpu, s: &State) -> Result<T3, Error> {
    let (b, c, h, w) = *s.shape();
    let cells = s
        .clone()
        .try_permute::<(usize, usize, usize, usize), Axes4<0, 2, 3, 1>>()?;
    let rows = dev.try_zeros_like(&(b, 1, w, c))?;
    let padded = (rows.clone(), cells).try_concat_along(Axis::<1>)?;
    let padded = (padded, rows).try_concat_along(Axis::<1>)?;
    let cols = dev.try_zeros_like(&(b, h + 2, 1, c))?;
    let padded = (cols.clone(), padded).try_concat_along(Axis::<2>)?;
    let padded = (padded, cols).try_concat_along(Axis::<2>)?;
    let mut shifted = Vec::with_capacity(NEIGHBOURS);
    for dy in 0..3 {
        for dx in 0..3 {
            shifted.push(padded.clone().try_slice((.., dy..dy + h, dx..dx + w, ..))?);
        }
    }
    let stacked = shifted.try_stack()?;
    Ok(stacked.try_reshape_like(&(NEIGHBOURS, b * h * w, c))?)
}

/// The same gather as a dense one-hot shift matrix; kept for the measurement above.
#[doc(hidden)]
pub fn gather_by_matmul(dev: &Cpu, s: &State) -> Result<T3, Error> {
    let (b, c, h, w) = *s.shape();
    let hw = h * w;
    let mut shift = vec![0.0f32; NEIGHBOURS * hw * hw];
    for n in 0..NEIGHBOURS {
        let (dy, dx) = (n / 3, n % 3);
        for y in 0..h {
            for x in 0..w {
                let (sy, sx) = ((y + dy).wrapping_sub(1), (x + dx).wrapping_sub(1));
                if sy < h && sx < w {
                    shift[(n * hw + y * w + x) * hw + sy * w + sx] = 1.0;
                }
            }
        }
    }
    let shift: T2 = dev.try_tensor_from_vec(shift, (NEIGHBOURS * hw, hw))?;
    let planes = s.clone().try_reshape_like(&(b * c, hw))?;
    // [9·HW, HW] × [HW, B·C] → [9·HW, B·C], then reorder to [9, B, HW, C].
    let out = shift.try_matmul(planes.try_permute::<(usize, usize), Axes2<1, 0>>()?)?;
    let out = out
        .try_reshape_like(&(NEIGHBOURS, hw, b, c))?
        .try_permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>()?
        .try_contiguous()?;
    Ok(out.try_reshape_like(&(NEIGHBOURS, b * hw, c))?)
}

/// What one forward pass produces.
pub(crate) struct Forward<T> {
    /// Softmax weights `[9, N]`.
    pub attention: T2,
    /// The update `f(s)` per cell, `[N, C]`.
    pub update: T2<T>,
}

/// `bias` broadcast to `[9, D]`, plus the per-offset embedding when there is one.
fn offset_bias<T: Tape<f32, Cpu>>(
    bias: T1<T>,
    embedding: Option<T2<T>>,
    d: usize,
) -> Result<T2<T>, Error> {
    let bias = bias.try_broadcast_like::<_, Axis<0>>(&(NEIGHBOURS, d))?;
    Ok(match embedding {
        Some(e) => bias.try_add(e)?,
        None => bias,
    })
}

/// The projections' input: each neighbour's input vector `x = [s; p]` (zero outside the
/// grid) followed by a one-hot of its offset, `[9·N, C + P + 9]` rows in `(n, b, y, x)`
/// order; a constant of the tape.
///
/// The one-hot columns fold the biases and per-offset embeddings into the projection
/// matmuls (`[wᵀ; b + p_n]`), instead of broadcast-adding them to the `[9, N, D]` keys and
/// values: dfdx's broadcasting binary ops (and their backward) were the largest item of
/// a training step's profile. The centre rows (`n = 4`) are the cells' own inputs, so the
/// same rows feed the query and the MLP (whose bias `b1` rides on the one-hot likewise).
pub(crate) struct Neighbourhood {
    pub rows: T2,
    pub cells: usize,
}

/// `[wᵀ; bias]`: a `[K + 9, D]` projection acting on rows `[input (K); one-hot (9)]`.
fn projection<T: Tape<f32, Cpu>>(w: T2<T>, bias: T2<T>) -> Result<T2<T>, Error> {
    let wt = w.try_permute::<(usize, usize), Axes2<1, 0>>()?;
    Ok((wt, bias).try_concat_along(Axis::<0>)?)
}

/// The attention rule (and the MLP update when the model has one) on a gathered
/// neighbourhood.
pub(crate) fn forward<T: Tape<f32, Cpu>>(
    mut p: Params<T>,
    nb: &Neighbourhood,
) -> Result<Forward<T>, Error> {
    let n = nb.cells;
    let (wq, bq) = (p.matrix(ParamId::Wq)?, p.vector(ParamId::Bq)?);
    let (wk, bk) = (p.matrix(ParamId::Wk)?, p.vector(ParamId::Bk)?);
    let (wv, bv) = (p.matrix(ParamId::Wv)?, p.vector(ParamId::Bv)?);
    let (pk, pv) = (p.opt_matrix(ParamId::Pk)?, p.opt_matrix(ParamId::Pv)?);
    let (wo, bo) = (p.matrix(ParamId::Wo)?, p.vector(ParamId::Bo)?);
    let mlp = match (p.opt_matrix(ParamId::W1)?, p.opt_vector(ParamId::B1)?) {
        (Some(w1), Some(b1)) => Some((w1, b1)),
        (None, None) => None,
        (Some(_), None) => return Err(TensorError::Missing(ParamId::B1.name().into()).into()),
        (None, Some(_)) => return Err(TensorError::Missing(ParamId::W1.name().into()).into()),
    };
    let d = wq.shape().0;
    let c = wo.shape().0;
    // The constants go on the left only because dfdx merges tapes from the left operand.
    let centre = nb.rows.clone().try_slice((4 * n..5 * n, ..))?;
    let wq = projection(wq, bq.try_broadcast_like::<_, Axis<0>>(&(NEIGHBOURS, d))?)?;
    let q = centre
        .clone()
        .retaped::<T>()
        .try_matmul(wq.try_mul(1.0 / (d as f32).sqrt())?)?;

    let big = (NEIGHBOURS, n, d);
    let k = nb
        .rows
        .retaped::<T>()
        .try_matmul(projection(wk, offset_bias(bk, pk, d)?)?)?
        .try_reshape_like(&big)?;
    let scores = k
        .try_mul(q.try_broadcast_like::<_, Axis<0>>(&big)?)?
        .try_sum::<(usize, usize), Axis<2>>()?;
    let a = scores.try_softmax::<Axis<0>>()?;
    let attention = a.retaped::<NoneTape>();

    let v = nb
        .rows
        .retaped::<T>()
        .try_matmul(projection(wv, offset_bias(bv, pv, d)?)?)?
        .try_reshape_like(&big)?;
    let u = v
        .try_mul(a.try_broadcast_like::<_, Axis<2>>(&big)?)?
        .try_sum::<(usize, usize), Axis<0>>()?;
    // With the MLP, `h = relu(w1·[u; x_c] + b1)` for all cells as one matmul: the rows
    // `[u | x_c | one-hot]` against `[w1ᵀ; b1 …]` (w1's columns are already u, then x).
    let h = match mlp {
        Some((w1, b1)) => {
            let m = w1.shape().0;
            let input = (u, centre.retaped::<T>()).try_concat_along(Axis::<1>)?;
            let w1 = projection(w1, b1.try_broadcast_like::<_, Axis<0>>(&(NEIGHBOURS, m))?)?;
            input.try_matmul(w1)?.try_relu()?
        }
        None => u,
    };
    let f = h.try_matmul(wo.try_permute::<(usize, usize), Axes2<1, 0>>()?)?;
    let f = f.try_add(bo.try_broadcast_like::<_, Axis<0>>(&(n, c))?)?;
    Ok(Forward {
        attention,
        update: f,
    })
}

/// `[N, C]` cell rows back to a `[B, C, H, W]` state.
pub(crate) fn cells_to_state(
    cells: T2,
    shape: (usize, usize, usize, usize),
) -> Result<State, Error> {
    let (b, c, h, w) = shape;
    Ok(cells
        .try_reshape_like(&(b, h, w, c))?
        .try_permute::<(usize, usize, usize, usize), Axes4<0, 3, 1, 2>>()?
        .try_contiguous()?)
}

impl DfdxTrainer {
    /// Checks that `state` is `[B, C, H, W]` for this model with a non-empty grid.
    pub(crate) fn check_state(&self, shape: (usize, usize, usize, usize)) -> Result<(), Error> {
        let (b, c, h, w) = shape;
        self.model.check_state(&[b, c, h, w])?;
        Ok(())
    }

    /// Forward pass with the current weights and no tape.
    pub(crate) fn forward_untraced(&mut self, state: &State) -> Result<Forward<NoneTape>, Error> {
        let nb = self.neighbourhood(state)?;
        forward(self.params.untraced(), &nb)
    }

    /// Checks `state` and gathers its [`Neighbourhood`].
    pub(crate) fn neighbourhood(&mut self, state: &State) -> Result<Neighbourhood, Error> {
        let (b, _, h, w) = *state.shape();
        self.check_state(*state.shape())?;
        let nb = gather_by_slices(&self.dev, state)?;
        let (_, n, c) = *nb.shape();
        let constant = match &self.constant_columns {
            Some((key, t)) if *key == (b, h, w) => t.clone(),
            _ => {
                // The allocation cache holds buffers sized for the previous grid (a training
                // step's tape, say, when a score rolls out three starts); they fit no buffer
                // of this one, so they go back to the system instead of staying beside it.
                self.constant_columns = None;
                self.dev.try_empty_cache()?;
                let t = constant_columns(&self.dev, &self.model, b, h, w)?;
                self.constant_columns = Some(((b, h, w), t.clone()));
                t
            }
        };
        let rows = nb.try_reshape_like(&(NEIGHBOURS * n, c))?;
        Ok(Neighbourhood {
            rows: (rows, constant).try_concat_along(Axis::<1>)?,
            cells: n,
        })
    }
}

/// The columns of [`Neighbourhood`] rows that do not depend on the state: each
/// neighbour's position features (zero outside the grid, like its state) and the one-hot
/// of its offset, `[9·N, P + 9]`. Built on the host once per grid size.
fn constant_columns(
    dev: &Cpu,
    model: &ModelConfig,
    b: usize,
    h: usize,
    w: usize,
) -> Result<T2, Error> {
    let p = model.position_features();
    let features = model
        .position_octaves
        .map(|l| nca_api::position::features(l, h, w));
    let (plane, n) = (h * w, b * h * w);
    let width = p + NEIGHBOURS;
    let mut data = vec![0.0; NEIGHBOURS * n * width];
    for (row, out) in data.chunks_exact_mut(width).enumerate() {
        let (offset, cell) = (row / n, row % n);
        out[p + offset] = 1.0;
        let (y, x) = ((cell % plane) / w, cell % w);
        let sy = (y + offset / 3).wrapping_sub(1);
        let sx = (x + offset % 3).wrapping_sub(1);
        if let (Some(f), true) = (&features, sy < h && sx < w) {
            for (i, v) in out[..p].iter_mut().enumerate() {
                *v = f.data()[i * plane + sy * w + sx];
            }
        }
    }
    Ok(dev.try_tensor_from_vec(data, (NEIGHBOURS * n, width))?)
}

impl Transition for DfdxTrainer {
    type State = State;
    type Error = Error;

    fn model(&self) -> &ModelConfig {
        &self.model
    }

    fn upload(&self, host: &HostTensor) -> Result<State, Error> {
        let [b, c, h, w] = host.dims4("state")?;
        self.check_state((b, c, h, w))?;
        Ok(self
            .dev
            .try_tensor_from_vec(host.data().to_vec(), (b, c, h, w))?)
    }

    fn download(&self, state: &State) -> Result<HostTensor, Error> {
        let (b, c, h, w) = *state.shape();
        host(state, &[b, c, h, w])
    }

    fn update(&mut self, state: &State) -> Result<State, Error> {
        let f = self.forward_untraced(state)?.update;
        cells_to_state(f, *state.shape())
    }

    fn step(&mut self, state: &State) -> Result<State, Error> {
        let f = self.update(state)?;
        Ok(state.clone().try_add(f)?)
    }

    fn attention(&mut self, state: &State) -> Result<HostTensor, Error> {
        let (b, _, h, w) = *state.shape();
        let a = self.forward_untraced(state)?.attention;
        let a = a
            .try_reshape_like(&(NEIGHBOURS, b, h * w))?
            .try_permute::<(usize, usize, usize), Axes3<1, 0, 2>>()?;
        host(&a, &[b, NEIGHBOURS, h, w])
    }

    fn weights(&self) -> Result<Weights, Error> {
        self.params.download(&self.model)
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<(), Error> {
        weights.check(&self.model)?;
        self.params = Params::upload(&self.dev, &self.model, weights)?;
        Ok(())
    }
}
