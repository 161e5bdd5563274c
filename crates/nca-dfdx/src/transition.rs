//! The convolutional-attention transition as dfdx tensor ops.
//!
//! Layout inside a step: cells are rows, `N = B·H·W` of them in `(b, y, x)` order, and the
//! nine neighbours are the outermost axis, so keys and values are `[9, N, D]`.
//!
//! The neighbourhood is gathered from the *state*, not from the projected keys/values:
//! the state is a constant of the tape (gradients are cut between steps), so the gather
//! needs no backward pass, and with zero padding `wk·0 + bk = bk` is exactly the key of an
//! outside neighbour. One `[9N, C] × [C, D]` matmul then yields all nine key sets at once.
//!
//! The gather zero-pads with `concat_along` and stacks nine shifted `slice`s; a dense
//! one-hot shift matrix applied by matmul was measured and rejected (see
//! [`gather_by_slices`] for the numbers).

use dfdx::prelude::*;
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

/// The transition's parameters as dfdx tensors, optionally carrying a gradient tape.
pub(crate) struct Params<T = NoneTape> {
    pub wq: T2<T>,
    pub bq: T1<T>,
    pub wk: T2<T>,
    pub bk: T1<T>,
    pub wv: T2<T>,
    pub bv: T1<T>,
    pub wo: T2<T>,
    pub bo: T1<T>,
    pub pk: Option<T2<T>>,
    pub pv: Option<T2<T>>,
}

fn upload1(dev: &Cpu, t: &HostTensor) -> Result<T1, Error> {
    Ok(dev.try_tensor_from_vec(t.data().to_vec(), (t.len(),))?)
}

fn upload2(dev: &Cpu, t: &HostTensor) -> Result<T2, Error> {
    match *t.shape() {
        [r, c] => Ok(dev.try_tensor_from_vec(t.data().to_vec(), (r, c))?),
        _ => Err(TensorError::WrongRank {
            what: "weight matrix".into(),
            expected: 2,
            found: t.shape().to_vec(),
        }
        .into()),
    }
}

fn host<S: Shape>(t: &Tensor<S, f32, Cpu>, shape: &[usize]) -> Result<HostTensor, Error> {
    // `as_vec` returns the raw buffer, so the layout must be the logical one.
    let t = t.clone().try_contiguous()?;
    Ok(HostTensor::new(shape, t.as_vec())?)
}

impl Params {
    /// Uploads weights whose shapes were already checked against the model.
    pub(crate) fn upload(dev: &Cpu, w: &Weights) -> Result<Self, Error> {
        let opt = |n: &str| w.get(n).map(|t| upload2(dev, t)).transpose();
        Ok(Self {
            wq: upload2(dev, w.tensor("wq")?)?,
            bq: upload1(dev, w.tensor("bq")?)?,
            wk: upload2(dev, w.tensor("wk")?)?,
            bk: upload1(dev, w.tensor("bk")?)?,
            wv: upload2(dev, w.tensor("wv")?)?,
            bv: upload1(dev, w.tensor("bv")?)?,
            wo: upload2(dev, w.tensor("wo")?)?,
            bo: upload1(dev, w.tensor("bo")?)?,
            pk: opt("pk")?,
            pv: opt("pv")?,
        })
    }

    /// The tensors in [`nca_api::WEIGHT_NAMES`] order (absent embeddings skipped).
    pub(crate) fn flat_views(&self) -> Vec<FlatView<'_>> {
        let mut out = vec![
            FlatView::One(&self.wq),
            FlatView::Two(&self.bq),
            FlatView::One(&self.wk),
            FlatView::Two(&self.bk),
            FlatView::One(&self.wv),
            FlatView::Two(&self.bv),
            FlatView::One(&self.wo),
            FlatView::Two(&self.bo),
        ];
        out.extend(self.pk.iter().map(FlatView::One));
        out.extend(self.pv.iter().map(FlatView::One));
        out
    }

    /// The parameters as plain tensors.
    pub(crate) fn download(&self, model: &ModelConfig) -> Result<Weights, Error> {
        let mut w = Weights::zeros(model);
        let flat: Vec<f32> = self.flat_views().iter().flat_map(|v| v.as_vec()).collect();
        w.unflatten_from(&flat)?;
        Ok(w)
    }

    /// A copy of every parameter starting its own gradient tape.
    pub(crate) fn traced(&self) -> Params<Traced> {
        Params {
            wq: self.wq.leaky_trace(),
            bq: self.bq.leaky_trace(),
            wk: self.wk.leaky_trace(),
            bk: self.bk.leaky_trace(),
            wv: self.wv.leaky_trace(),
            bv: self.bv.leaky_trace(),
            wo: self.wo.leaky_trace(),
            bo: self.bo.leaky_trace(),
            pk: self.pk.as_ref().map(|t| t.leaky_trace()),
            pv: self.pv.as_ref().map(|t| t.leaky_trace()),
        }
    }

    /// A cheap copy (the buffers are shared) without a tape.
    pub(crate) fn untraced(&self) -> Params {
        Params {
            wq: self.wq.clone(),
            bq: self.bq.clone(),
            wk: self.wk.clone(),
            bk: self.bk.clone(),
            wv: self.wv.clone(),
            bv: self.bv.clone(),
            wo: self.wo.clone(),
            bo: self.bo.clone(),
            pk: self.pk.clone(),
            pv: self.pv.clone(),
        }
    }
}

/// A parameter tensor of either rank, seen as a flat buffer.
pub(crate) enum FlatView<'a> {
    One(&'a T2),
    Two(&'a T1),
}

impl FlatView<'_> {
    pub(crate) fn as_vec(&self) -> Vec<f32> {
        match self {
            FlatView::One(t) => t.as_vec(),
            FlatView::Two(t) => t.as_vec(),
        }
    }

    pub(crate) fn grad(&self, grads: &Gradients<f32, Cpu>) -> Vec<f32> {
        match self {
            FlatView::One(t) => grads.get(*t).as_vec(),
            FlatView::Two(t) => grads.get(*t).as_vec(),
        }
    }
}

/// The nine zero-padded neighbours of every cell, `[9, N, C]` with `n = 3·(dy+1) + (dx+1)`.
///
/// Chosen by measurement (`benches/benches/dfdx_gather.rs`; first measured in the dev profile, 2 shared cores, default model,
/// B = 1): this gather takes 0.13 ms at 32×32 and 0.29 ms at 64×64, against 15 ms and
/// 176 ms for a dense one-hot `[9·HW, HW]` shift matrix applied by one matmul (building
/// the matrix included; the matmul alone still grows with (H·W)²). A whole 32×32
/// training step takes about 3.5–3.7 ms (≈ 270 steps/s; 64×64: ≈ 14.5 ms), so the gather
/// is a few percent of it.
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

/// The projections' input: each neighbour's state followed by a one-hot of its offset,
/// `[9·N, C + 9]` rows in `(n, b, y, x)` order; a constant of the tape.
///
/// The one-hot columns fold the biases and per-offset embeddings into the projection
/// matmuls (`[wᵀ; b + p_n]`), instead of broadcast-adding them to the `[9, N, D]` keys and
/// values: dfdx's broadcasting binary ops (and their backward) were the largest item of
/// a training step's profile.
pub(crate) struct Neighbourhood {
    pub rows: T2,
    pub cells: usize,
}

/// `[wᵀ; bias]`: a `[C + 9, D]` projection acting on [`Neighbourhood`] rows.
fn projection<T: Tape<f32, Cpu>>(w: T2<T>, bias: T2<T>) -> Result<T2<T>, Error> {
    let wt = w.try_permute::<(usize, usize), Axes2<1, 0>>()?;
    Ok((wt, bias).try_concat_along(Axis::<0>)?)
}

/// The attention rule on a gathered neighbourhood.
pub(crate) fn forward<T: Tape<f32, Cpu>>(
    p: Params<T>,
    nb: &Neighbourhood,
) -> Result<Forward<T>, Error> {
    let n = nb.cells;
    let c = p.wo.shape().0;
    let d = p.wq.shape().0;
    // The constants go on the left only because dfdx merges tapes from the left operand.
    let centre = nb.rows.clone().try_slice((4 * n..5 * n, ..))?;
    let wq = projection(
        p.wq,
        p.bq.try_broadcast_like::<_, Axis<0>>(&(NEIGHBOURS, d))?,
    )?;
    let q = centre
        .retaped::<T>()
        .try_matmul(wq.try_mul(1.0 / (d as f32).sqrt())?)?;

    let big = (NEIGHBOURS, n, d);
    let k = nb
        .rows
        .retaped::<T>()
        .try_matmul(projection(p.wk, offset_bias(p.bk, p.pk, d)?)?)?
        .try_reshape_like(&big)?;
    let scores = k
        .try_mul(q.try_broadcast_like::<_, Axis<0>>(&big)?)?
        .try_sum::<(usize, usize), Axis<2>>()?;
    let a = scores.try_softmax::<Axis<0>>()?;
    let attention = a.retaped::<NoneTape>();

    let v = nb
        .rows
        .retaped::<T>()
        .try_matmul(projection(p.wv, offset_bias(p.bv, p.pv, d)?)?)?
        .try_reshape_like(&big)?;
    let u = v
        .try_mul(a.try_broadcast_like::<_, Axis<2>>(&big)?)?
        .try_sum::<(usize, usize), Axis<0>>()?;
    let f = u.try_matmul(p.wo.try_permute::<(usize, usize), Axes2<1, 0>>()?)?;
    let f = f.try_add(p.bo.try_broadcast_like::<_, Axis<0>>(&(n, c))?)?;
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
        self.check_state(*state.shape())?;
        let nb = gather_by_slices(&self.dev, state)?;
        let (_, n, c) = *nb.shape();
        let one_hot = match &self.one_hot {
            Some(t) if t.shape().0 == NEIGHBOURS * n => t.clone(),
            _ => {
                let mut data = vec![0.0; NEIGHBOURS * n * NEIGHBOURS];
                for (row, x) in data.chunks_exact_mut(NEIGHBOURS).enumerate() {
                    x[row / n] = 1.0;
                }
                let t = self
                    .dev
                    .try_tensor_from_vec(data, (NEIGHBOURS * n, NEIGHBOURS))?;
                self.one_hot = Some(t.clone());
                t
            }
        };
        let rows = nb.try_reshape_like(&(NEIGHBOURS * n, c))?;
        Ok(Neighbourhood {
            rows: (rows, one_hot).try_concat_along(Axis::<1>)?,
            cells: n,
        })
    }
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
        self.params = Params::upload(&self.dev, weights)?;
        Ok(())
    }
}
