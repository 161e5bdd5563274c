"""Neural Cellular Automata with convolutional attention, from Python.

Train a rule that grows a picture from noise, load trained rules and run them::

    import nca
    run = nca.train("examples/cat.ron")          # or a dict, or target=an (H, W, 3) array
    print(run.summary["regrowth"]["mean_psnr_db"])
    frames = run.model.rollout(run.model.noise(seed=1), 100, every=10)
    pictures = run.model.to_rgb(frames[-1])      # (B, H, W, 3) uint8

The numbers are the command-line tool's (``nca-cli``): the same run file, backend and
seed give the same weights, and ``Model.rollout`` is ``nca-cli rollout``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from ._nca import Model, __version__, _train, backends

__all__ = ["Model", "Run", "train", "backends", "__version__"]

#: A run config: a path to a RON run file, or a dict with the same structure.
Config = Union[str, "os.PathLike[str]", Dict[str, Any]]


class Run:
    """A finished training run (completed, stopped by ``on_step`` or Ctrl-C).

    Attributes:
        model: the trained rule (:class:`Model`): the weights ``summary["regrowth"]``
            scores, i.e. the best-scoring ones of ``summary["kept_step"]`` when
            ``evaluation.keep_best`` chose them from periodic scores, else the last.
        summary: what ``summary.json`` holds (``status``, ``final_loss``, ``regrowth``, …).
        losses: the loss of every step, ``np.float32`` of shape ``(steps,)``.
        out: the run directory, or None when nothing was written.
        psnr: ``(step, mean PSNR dB, mean MSE)`` of every regrowth score taken.
    """

    model: Model
    summary: Dict[str, Any]
    losses: np.ndarray
    out: Optional[str]
    psnr: List[Tuple[int, float, float]]

    def __init__(
        self,
        model: Model,
        summary: Dict[str, Any],
        losses: np.ndarray,
        out: Optional[str],
        psnr: List[Tuple[int, float, float]],
    ) -> None:
        self.model = model
        self.summary = summary
        self.losses = losses
        self.out = out
        self.psnr = psnr

    @property
    def status(self) -> str:
        """How the run ended: ``completed``, ``max_spikes`` or ``interrupted``."""
        return str(self.summary.get("status"))

    def __repr__(self) -> str:
        regrowth = self.summary.get("regrowth") or {}
        psnr = regrowth.get("mean_psnr_db")
        score = f", regrowth {psnr:.1f} dB" if isinstance(psnr, (int, float)) else ""
        return (
            f"nca.Run({self.status} at step {self.summary.get('final_step')}, "
            f"final loss {self.summary.get('final_loss')}{score}, out={self.out!r})"
        )


def train(
    config: Config,
    *,
    target: Optional[np.ndarray] = None,
    out: Optional[Union[str, "os.PathLike[str]"]] = None,
    backend: str = "ndarray",
    on_step: Optional[Callable[[int, float], Optional[bool]]] = None,
    progress: bool = True,
    force: bool = False,
    resume: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> Run:
    """Trains one run and returns it.

    Args:
        config: path to a RON run file (image paths relative to it), or a dict with the
            same structure (image paths relative to the current directory); fields left
            out take the command line's defaults, sized to the grid. Enums are written
            as ``{"Image": {"path": "cat.png"}}`` or ``{"Solid": [1.0, 0.0, 0.0]}``.
        target: a picture ``(H, W, 3)`` or ``(H, W, 4)`` (also ``(H, W)`` grey), uint8 or
            float in [0, 1], replacing the config's target; fitted to the grid as an image
            file is (alpha over the background, centre crop, Lanczos resize).
        out: None trains in memory and writes nothing; a directory gets what ``nca-cli``
            writes (snapshots, checkpoint, plots, ``summary.json``).
        backend: "ndarray" (always compiled), or "dfdx" / "candle" when compiled in (see
            :func:`backends`).
        on_step: called as ``on_step(step, loss)`` after every step; returning ``False``
            stops the run (it is still scored and returned, status ``interrupted``).
        progress: print a progress line and scores to stderr.
        force: replace the results of an earlier run in ``out``.
        resume: continue from this checkpoint.

    Ctrl-C stops the run after the current step, like ``nca-cli``'s: the run so far is
    returned (and written to ``out``) with status ``interrupted``. Training releases the
    GIL, so other Python threads run meanwhile.

    Raises:
        ValueError: a config field, the target or an argument is invalid (the message
            names the field, what was found and what was expected).
        FileNotFoundError: the run file, an image or the checkpoint does not exist.
        MemoryError: the run needs more than the memory limit (``$NCA_MEMORY_LIMIT``,
            default half of physical memory).
        OSError: reading or writing failed.
        RuntimeError: the backend failed or the loss diverged.
    """
    config_path: Optional[str] = None
    config_json: Optional[str] = None
    if isinstance(config, dict):
        settings = dict(config)
        if target is not None and "target" not in settings:
            # The array replaces the target; the config still needs one to be complete.
            settings["target"] = {"Solid": [0.0, 0.0, 0.0]}
        try:
            config_json = json.dumps(settings)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config: cannot be written as JSON: {e}") from None
    elif isinstance(config, (str, os.PathLike)):
        config_path = os.fspath(config)
    else:
        raise TypeError(
            f"config: expected a path to a run file or a dict, found {type(config).__name__}"
        )
    if on_step is not None and not callable(on_step):
        raise TypeError("on_step: expected a callable on_step(step, loss)")
    model, summary, losses, out_dir, psnr = _train(
        config_path,
        config_json,
        target,
        None if out is None else os.fspath(out),
        backend,
        on_step,
        bool(progress),
        bool(force),
        None if resume is None else os.fspath(resume),
    )
    return Run(model, summary, losses, out_dir, [tuple(row) for row in psnr])
