//! The compiled half of the Python package `nca` (`nca._nca`): `Model` and the training
//! call, over the `nca-run` library. The Python half (`nca/__init__.py`) normalises
//! arguments and wraps the training result in `nca.Run`.
//!
//! Every failure becomes a Python exception carrying the CLI's message (ValueError,
//! FileNotFoundError, MemoryError, OSError, RuntimeError); nothing here unwraps. Work
//! that runs the rule releases the GIL.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nca_api::{HostTensor, MemoryLimit};
use nca_run::config::RunConfig;
use nca_run::events::{Event, Events, Level};
use nca_run::model::{self, RolloutSpec};
use nca_run::run::{self, Output, RunSource, Status, TrainRequest};
use nca_run::target::{self, Fit, Pixels, Rgb, Target};
use nca_run::{Backend, ErrorKind};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyReadonlyArrayDyn};
use pyo3::exceptions::{
    PyBlockingIOError, PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyOSError,
    PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// How often a run without `on_step` takes the GIL to look for Ctrl-C and draw progress:
/// taking it every step would wait on other Python threads each time.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The Python exception for a library error, with the whole chain as its message.
fn to_py(e: nca_run::Error) -> PyErr {
    let message = e.report();
    match e.kind() {
        ErrorKind::Invalid => PyValueError::new_err(message),
        ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
        ErrorKind::Io => PyOSError::new_err(message),
        ErrorKind::Memory => PyMemoryError::new_err(message),
        ErrorKind::Busy => PyBlockingIOError::new_err(message),
        ErrorKind::Interrupted => PyKeyboardInterrupt::new_err(message),
        _ => PyRuntimeError::new_err(message),
    }
}

fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

fn memory_limit() -> PyResult<MemoryLimit> {
    MemoryLimit::from_env().map_err(|e| to_py(e.into()))
}

fn parse_backend(name: &str) -> PyResult<Backend> {
    name.parse().map_err(to_py)
}

/// `obj` as a float32 tensor (any array-like; numpy converts), shape and data copied.
fn host_tensor(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<HostTensor> {
    let np = py.import("numpy")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", np.getattr("float32")?)?;
    let arr = np
        .call_method("ascontiguousarray", (obj,), Some(&kwargs))
        .map_err(|e| value_error(format!("{what}: expected a float32 array: {e}")))?;
    let arr: PyReadonlyArrayDyn<'_, f32> = arr.extract()?;
    let view = arr.as_array();
    let shape = view.shape().to_vec();
    let data: Vec<f32> = view.iter().copied().collect();
    HostTensor::new(&shape, data).map_err(|e| value_error(format!("{what}: {e}")))
}

/// A `[B, C, H, W]` state: checked for rank here, for size by the model.
fn state_arg(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<HostTensor> {
    let t = host_tensor(py, obj, "state")?;
    if t.shape().len() != 4 {
        return Err(value_error(format!(
            "state: expected a (B, C, H, W) array, found shape {:?}",
            t.shape()
        )));
    }
    Ok(t)
}

/// A picture `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`: uint8 (divided by 255) or
/// float in [0, 1].
fn pixels_arg(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Pixels> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let is_u8 = arr.getattr("dtype")?.getattr("name")?.extract::<String>()? == "uint8";
    let t = host_tensor(py, &arr, what)?;
    let (height, width, channels) = match *t.shape() {
        [h, w] => (h, w, 1),
        [h, w, c] => (h, w, c),
        _ => {
            return Err(value_error(format!(
                "{what}: expected an (H, W, 3) or (H, W, 4) picture, found shape {:?}",
                t.shape()
            )))
        }
    };
    let mut data = t.into_data();
    if is_u8 {
        for x in &mut data {
            *x /= 255.0;
        }
    }
    Ok(Pixels {
        height,
        width,
        channels,
        data,
    })
}

/// A `numpy.ndarray` of float32 holding `t`.
fn to_numpy<'py>(py: Python<'py>, t: HostTensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape().to_vec();
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), t.into_data())
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(arr.into_pyarray(py).into_any())
}

/// A JSON value as Python objects (through the `json` module, so dicts keep their order).
fn json_to_py<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// The background and fit a picture given as an array gets: the run file's, when its
/// target is an image, else white and crop.
fn picture_settings(target: &Target) -> (Rgb, Fit) {
    match target {
        Target::Image {
            background, fit, ..
        } => (*background, *fit),
        _ => ((1.0, 1.0, 1.0), Fit::Crop),
    }
}

/// A trained rule: weights, config and target of a checkpoint, run on a backend.
///
/// Load one with ``Model.load(path)`` or take ``run.model`` after ``nca.train``.
/// States are float32 arrays ``(B, C, H, W)``: the first ``V`` channels are the visible
/// picture (``V`` = 3 RGB or 1 grey), the others hidden. Every method that runs the rule
/// releases the GIL.
#[pyclass(name = "Model", module = "nca", frozen)]
struct PyModel {
    inner: model::Model,
    backend: Backend,
}

#[pymethods]
impl PyModel {
    /// Reads a checkpoint (``checkpoint.safetensors`` of a run directory) to run on
    /// ``backend`` ("ndarray", or "dfdx"/"candle" when compiled in).
    #[staticmethod]
    #[pyo3(signature = (path, *, backend = "ndarray"))]
    fn load(py: Python<'_>, path: PathBuf, backend: &str) -> PyResult<Self> {
        let backend = parse_backend(backend)?;
        let limit = memory_limit()?;
        let inner = py
            .detach(|| model::Model::load(&path, &limit))
            .map_err(to_py)?;
        Ok(Self { inner, backend })
    }

    /// Writes the checkpoint atomically; ``nca-cli rollout --checkpoint PATH`` reads it.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(to_py)
    }

    /// The same rule on another backend.
    fn with_backend(&self, backend: &str) -> PyResult<Self> {
        Ok(Self {
            inner: self.inner.clone(),
            backend: parse_backend(backend)?,
        })
    }

    /// Name of the backend the rule runs on.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// The run config the rule was trained with, as a dict (``nca.train`` accepts it);
    /// the grid, model, noise and training sections alone for checkpoints without one.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.inner.run_config() {
            Some(rc) => json_to_py(py, &rc),
            None => json_to_py(py, self.inner.config()),
        }
    }

    /// The parameters as a dict of float32 arrays under the checkpoint's tensor names.
    #[getter]
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (param, t) in self.inner.checkpoint().weights.named() {
            out.set_item(param.name(), to_numpy(py, t.clone())?)?;
        }
        Ok(out)
    }

    /// The target ``(B, V, H, W)`` the rule was trained towards, or None.
    #[getter]
    fn target<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.inner
            .target()
            .map(|t| to_numpy(py, t.clone()))
            .transpose()
    }

    /// ``(C, H, W)``: channels (visible + hidden), grid height and width.
    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let [_, c, h, w] = self.inner.state_shape(1);
        (c, h, w)
    }

    /// Visible channels (3 RGB, 1 grey).
    #[getter]
    fn visible_channels(&self) -> usize {
        self.inner.config().model.visible_channels
    }

    /// N(0, 1) noise ``(batch, C, H, W)`` from ``seed``: the start ``nca-cli rollout
    /// --seed SEED`` uses (and training, for batch = grid.batch and the run's seed).
    #[pyo3(signature = (seed = 0, batch = 1))]
    fn noise<'py>(&self, py: Python<'py>, seed: u64, batch: usize) -> PyResult<Bound<'py, PyAny>> {
        let limit = memory_limit()?;
        let t = py
            .detach(|| self.inner.noise(seed, batch, &limit))
            .map_err(to_py)?;
        to_numpy(py, t)
    }

    /// One step of the rule, ``s + f(s)`` clamped as in training, without noise.
    fn step<'py>(&self, py: Python<'py>, state: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let state = state_arg(py, state)?;
        let limit = memory_limit()?;
        let backend = self.backend;
        let t = py
            .detach(|| self.inner.step(backend, &state, &limit))
            .map_err(to_py)?;
        to_numpy(py, t)
    }

    /// Runs ``steps`` steps from ``state`` as ``nca-cli rollout`` does: ``noise`` σ added
    /// before every step from the noise stream of ``seed``, clamped after it.
    ///
    /// Returns the final state ``(B, C, H, W)``; with ``every=N`` the start and every
    /// N-th state (and the last), stacked ``(K, B, C, H, W)``. Ctrl-C stops early and
    /// returns what was reached.
    #[pyo3(signature = (state, steps, *, noise = 0.0, seed = 0, every = None))]
    fn rollout<'py>(
        &self,
        py: Python<'py>,
        state: &Bound<'py, PyAny>,
        steps: u64,
        noise: f32,
        seed: u64,
        every: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let state = state_arg(py, state)?;
        let limit = memory_limit()?;
        let spec = RolloutSpec {
            steps,
            sigma: noise,
            seed,
            every,
        };
        let backend = self.backend;
        let mut poll = Poll::new();
        let kept = py
            .detach(|| {
                self.inner
                    .rollout(backend, &state, &spec, &limit, &mut |_| poll.check())
            })
            .map_err(to_py)?;
        if let Some(e) = poll.error.take() {
            // Ctrl-C: the states so far are returned, the interrupt is not swallowed
            // silently.
            warn(py, &format!("rollout interrupted ({e})"))?;
        }
        match every {
            None => {
                let last = kept
                    .into_iter()
                    .last()
                    .ok_or_else(|| PyRuntimeError::new_err("the rollout kept no state"))?;
                to_numpy(py, last)
            }
            Some(_) => {
                let shape = kept.first().map(|t| t.shape().to_vec()).unwrap_or_default();
                let mut stacked_shape = vec![kept.len()];
                stacked_shape.extend(shape);
                let data: Vec<f32> = kept.into_iter().flat_map(HostTensor::into_data).collect();
                let t = HostTensor::new(&stacked_shape, data)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                to_numpy(py, t)
            }
        }
    }

    /// The regrowth score as in ``summary.json``: ``seeds`` fresh-noise starts rolled out
    /// ``steps`` steps without noise, compared with ``target`` (a picture ``(H, W, 3)``,
    /// uint8 or float in [0, 1], fitted to the grid like a training target; the stored
    /// target when None). Returns a dict with ``mean_psnr_db``, ``mean_mse``,
    /// ``per_seed``, ``steps`` and ``run_seed``.
    #[pyo3(signature = (target = None, steps = 100, seeds = 3))]
    fn regrowth<'py>(
        &self,
        py: Python<'py>,
        target: Option<&Bound<'py, PyAny>>,
        steps: u64,
        seeds: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let limit = memory_limit()?;
        let target = match target {
            Some(obj) if !obj.is_none() => {
                let pixels = pixels_arg(py, obj, "target")?;
                let mut notes = Notes::default();
                let t = target::fit_pixels(
                    &pixels,
                    self.inner.config(),
                    (1.0, 1.0, 1.0),
                    Fit::Crop,
                    "target",
                    &mut notes,
                )
                .map_err(to_py)?;
                notes.flush(py, false)?;
                Some(t)
            }
            _ => None,
        };
        let backend = self.backend;
        let score = py
            .detach(|| {
                self.inner
                    .regrowth(backend, target.as_ref(), steps, seeds, &limit)
            })
            .map_err(to_py)?;
        json_to_py(py, &score)
    }

    /// The visible channels of a state ``(B, C, H, W)`` (or a target ``(B, V, H, W)``) as
    /// pictures ``(B, H, W, 3)`` of uint8, drawn as the run's snapshots are.
    fn to_rgb<'py>(
        &self,
        py: Python<'py>,
        state: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let state = state_arg(py, state)?;
        let v = self.inner.config().model.visible_channels;
        let (shape, bytes) = model::to_rgb(&state, v).map_err(to_py)?;
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), bytes)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(arr.into_pyarray(py).into_any())
    }

    fn __repr__(&self) -> String {
        let cfg = self.inner.config();
        format!(
            "nca.Model(grid {}x{}, {} channels ({} visible), step {}, backend {})",
            cfg.grid.height,
            cfg.grid.width,
            cfg.model.channels(),
            cfg.model.visible_channels,
            self.inner.checkpoint().progress.step,
            self.backend.name()
        )
    }
}

/// `warnings.warn(message)`.
fn warn(py: Python<'_>, message: &str) -> PyResult<()> {
    py.import("warnings")?.call_method1(
        "warn",
        (message, py.get_type::<pyo3::exceptions::PyUserWarning>(), 2),
    )?;
    Ok(())
}

/// Notes collected while the GIL is released, shown afterwards: warnings as Python
/// warnings, information on stderr when `progress`.
#[derive(Default)]
struct Notes(Vec<(Level, String)>);

impl Notes {
    fn flush(&mut self, py: Python<'_>, progress: bool) -> PyResult<()> {
        for (level, message) in self.0.drain(..) {
            match level {
                Level::Warn => warn(py, &message)?,
                _ if progress => {
                    let err = py.import("sys")?.getattr("stderr")?;
                    err.call_method1("write", (format!("{message}\n"),))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Events for Notes {
    fn on_event(&mut self, event: &Event<'_>) -> ControlFlow<()> {
        if let Event::Note { level, message } = event {
            self.0.push((*level, (*message).to_string()));
        }
        ControlFlow::Continue(())
    }
}

/// Looks for Ctrl-C every [`POLL_EVERY`] while the GIL is released.
struct Poll {
    last: Instant,
    error: Option<PyErr>,
}

impl Poll {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            error: None,
        }
    }

    fn check(&mut self) -> ControlFlow<()> {
        if self.last.elapsed() < POLL_EVERY {
            return ControlFlow::Continue(());
        }
        self.last = Instant::now();
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        }
    }
}

/// A training run's events seen from Python: `on_step` every step, Ctrl-C, warnings
/// for notes and a progress line on stderr.
struct PyEvents {
    on_step: Option<Py<PyAny>>,
    progress: bool,
    total: u64,
    last_poll: Instant,
    last_draw: Option<Instant>,
    /// An exception raised by `on_step` or a warning filter: re-raised after the run.
    error: Option<PyErr>,
    /// Ctrl-C arrived: the run stopped and is returned with status interrupted.
    interrupted: Option<PyErr>,
    /// Whether a progress line is on screen without its newline.
    line_open: bool,
}

impl PyEvents {
    fn stderr(&mut self, py: Python<'_>, text: &str) -> PyResult<()> {
        let err = py.import("sys")?.getattr("stderr")?;
        err.call_method1("write", (text,))?;
        err.call_method0("flush")?;
        Ok(())
    }

    /// Ends an open progress line so that the next output starts on its own line.
    fn close_line(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.line_open {
            self.line_open = false;
            self.stderr(py, "\n")?;
        }
        Ok(())
    }

    fn handle(&mut self, py: Python<'_>, event: &Event<'_>) -> PyResult<ControlFlow<()>> {
        match event {
            Event::Note { level, message } => {
                self.close_line(py)?;
                match level {
                    Level::Warn => warn(py, message)?,
                    _ if self.progress => self.stderr(py, &format!("{message}\n"))?,
                    _ => {}
                }
            }
            Event::Started(s) => {
                self.total = s.total_steps;
                if self.progress {
                    let chosen: Vec<String> = s
                        .chosen
                        .iter()
                        .map(|c| format!("{} {}", c.field, c.value))
                        .collect();
                    let mut line = format!(
                        "training {}x{} on {} from step {} to {}",
                        s.grid.0, s.grid.1, s.backend, s.start_step, s.total_steps
                    );
                    if !chosen.is_empty() {
                        line.push_str(&format!(" (chosen for the grid: {})", chosen.join(", ")));
                    }
                    self.stderr(py, &format!("{line}\n"))?;
                }
            }
            Event::Step(info) => {
                py.check_signals()?;
                if let Some(f) = &self.on_step {
                    let answer = f.call1(py, (info.step, info.loss))?;
                    // Only `False` stops: None (no return value) and anything else go on.
                    if matches!(answer.bind(py).extract::<bool>(), Ok(false)) {
                        return Ok(ControlFlow::Break(()));
                    }
                }
                let due = self.last_draw.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
                if self.progress && (due || info.step == self.total) {
                    self.last_draw = Some(Instant::now());
                    self.line_open = true;
                    let line = format!(
                        "\rstep {}/{} loss {:.3e} spikes {}",
                        info.step, self.total, info.loss, info.spikes
                    );
                    self.stderr(py, &line)?;
                }
            }
            Event::Evaluation { score, .. } if self.progress => {
                self.close_line(py)?;
                self.stderr(py, &format!("{}\n", nca_run::score::line(score)))?;
            }
            _ => {}
        }
        Ok(ControlFlow::Continue(()))
    }
}

impl Events for PyEvents {
    fn on_event(&mut self, event: &Event<'_>) -> ControlFlow<()> {
        // Ctrl-C seen while handling an event whose stop the run does not act on (a note
        // during setup) has been taken from Python already: stop at the next event.
        if self.interrupted.is_some() {
            return ControlFlow::Break(());
        }
        // Steps without a callback take the GIL only now and then (see POLL_EVERY).
        if let Event::Step(info) = event {
            let quiet = self.on_step.is_none();
            let recent = self.last_poll.elapsed() < POLL_EVERY;
            // The last step is always drawn, so the progress line ends at the total.
            if quiet && recent && info.step != self.total {
                return ControlFlow::Continue(());
            }
            self.last_poll = Instant::now();
        }
        Python::attach(|py| match self.handle(py, event) {
            Ok(flow) => flow,
            Err(e) if e.is_instance_of::<PyKeyboardInterrupt>(py) => {
                self.interrupted = Some(e);
                ControlFlow::Break(())
            }
            Err(e) => {
                self.error = Some(e);
                ControlFlow::Break(())
            }
        })
    }
}

/// Trains one run; the Python function ``nca.train`` normalises its arguments and calls
/// this. Returns ``(model, summary_json, losses, out, psnr_rows)``.
#[pyfunction]
#[pyo3(signature = (config_path, config_json, target, out, backend, on_step, progress, force, resume))]
#[allow(clippy::too_many_arguments)]
fn _train<'py>(
    py: Python<'py>,
    config_path: Option<PathBuf>,
    config_json: Option<String>,
    target: Option<&Bound<'py, PyAny>>,
    out: Option<PathBuf>,
    backend: &str,
    on_step: Option<Py<PyAny>>,
    progress: bool,
    force: bool,
    resume: Option<PathBuf>,
) -> PyResult<Bound<'py, PyTuple>> {
    let backend = parse_backend(backend)?;
    let (source, settings) = match (config_path, config_json) {
        (Some(path), None) => {
            // Read here only to fit an array target to its grid; the run reads it again.
            let settings = match target {
                Some(_) => Some(RunConfig::load(&path).map_err(to_py)?),
                None => None,
            };
            (RunSource::File(path), settings)
        }
        (None, Some(json)) => {
            let (config, chosen) = RunConfig::from_json_sized(&json, "config").map_err(to_py)?;
            let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            let settings = Some(config.clone());
            let source = RunSource::Config {
                config: Box::new(config),
                chosen,
                origin: "config".into(),
                base,
            };
            (source, settings)
        }
        _ => return Err(value_error("give either a run file path or a config dict")),
    };
    let mut notes = Notes::default();
    let target = match (target, &settings) {
        (Some(obj), Some(cfg)) => {
            let pixels = pixels_arg(py, obj, "target")?;
            let (background, fit) = picture_settings(&cfg.target);
            let nca = cfg.nca();
            Some(
                target::fit_pixels(&pixels, &nca, background, fit, "target", &mut notes)
                    .map_err(to_py)?,
            )
        }
        _ => None,
    };
    notes.flush(py, progress)?;
    let request = TrainRequest {
        source,
        target,
        output: out.map_or(Output::Nothing, Output::Dir),
        resume,
        force,
        backend,
    };
    let mut events = PyEvents {
        on_step,
        progress,
        total: 0,
        last_poll: Instant::now(),
        last_draw: None,
        error: None,
        interrupted: None,
        line_open: false,
    };
    let result = py.detach(|| run::train(&request, &mut events));
    events.close_line(py)?;
    if let Some(e) = events.error.take() {
        return Err(e);
    }
    let result = result.map_err(to_py)?;
    if result.status == Status::Interrupted && events.interrupted.is_some() {
        warn(
            py,
            &format!(
                "training interrupted at step {}; the run so far is returned{}",
                result.summary.final_step,
                result
                    .out
                    .as_ref()
                    .map(|o| format!(" and saved in {}", o.display()))
                    .unwrap_or_default()
            ),
        )?;
    }
    let losses: Vec<f32> = result.losses.iter().map(|r| r.loss).collect();
    let losses = losses.into_pyarray(py).into_any();
    let summary = json_to_py(py, &result.summary)?;
    let out = result.out.as_ref().map(|p| p.display().to_string());
    let psnr = result.psnr.clone();
    let model = PyModel {
        // The rule the summary scores: the kept weights when `evaluation.keep_best` chose them.
        inner: model::Model::from_checkpoint(result.kept.unwrap_or(result.checkpoint)),
        backend,
    };
    let model = Bound::new(py, model)?.into_any();
    PyTuple::new(
        py,
        [
            model,
            summary,
            losses,
            out.into_pyobject(py)?.into_any(),
            psnr.into_pyobject(py)?.into_any(),
        ],
    )
}

/// The backends compiled into this build, default first.
#[pyfunction]
fn backends() -> Vec<&'static str> {
    Backend::compiled().into_iter().map(Backend::name).collect()
}

/// The compiled half of the Python package `nca`.
#[pymodule]
fn _nca(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(_train, m)?)?;
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
