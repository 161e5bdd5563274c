"""Type stubs of the compiled half of ``nca`` (use it through ``nca``)."""

import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, "os.PathLike[str]"]

class Model:
    """A trained rule: weights, config and target of a checkpoint, run on a backend.

    States are float32 arrays ``(B, C, H, W)``; the first ``V`` channels are the picture.
    """

    @staticmethod
    def load(path: _Path, *, backend: str = "ndarray") -> "Model":
        """Reads a checkpoint (``checkpoint.safetensors`` of a run directory)."""
    def save(self, path: _Path) -> None:
        """Writes the checkpoint atomically; ``nca-cli rollout --checkpoint`` reads it."""
    def with_backend(self, backend: str) -> "Model":
        """The same rule on another backend."""
    @property
    def backend(self) -> str:
        """Name of the backend the rule runs on."""
    @property
    def config(self) -> Dict[str, Any]:
        """The run config the rule was trained with (``nca.train`` accepts it)."""
    @property
    def weights(self) -> Dict[str, npt.NDArray[np.float32]]:
        """The parameters under the checkpoint's tensor names."""
    @property
    def target(self) -> Optional[npt.NDArray[np.float32]]:
        """The target ``(B, V, H, W)`` the rule was trained towards, or None."""
    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)``: channels (visible + hidden), grid height and width."""
    @property
    def visible_channels(self) -> int:
        """Visible channels (3 RGB, 1 grey)."""
    def noise(self, seed: int = 0, batch: int = 1) -> npt.NDArray[np.float32]:
        """N(0, 1) noise ``(batch, C, H, W)``: the start of ``nca-cli rollout --seed``."""
    def step(self, state: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """One step of the rule, clamped as in training, without noise."""
    def rollout(
        self,
        state: npt.ArrayLike,
        steps: int,
        *,
        noise: float = 0.0,
        seed: int = 0,
        every: Optional[int] = None,
    ) -> npt.NDArray[np.float32]:
        """``steps`` steps as ``nca-cli rollout``: the final state ``(B, C, H, W)``, or
        with ``every`` the start and every N-th state stacked ``(K, B, C, H, W)``."""
    def regrowth(
        self,
        target: Optional[npt.ArrayLike] = None,
        steps: int = 100,
        seeds: int = 3,
    ) -> Dict[str, Any]:
        """The regrowth score as in ``summary.json`` (``mean_psnr_db``, ``per_seed``, …)."""
    def to_rgb(self, state: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """The visible channels as pictures ``(B, H, W, 3)`` of uint8."""

def backends() -> List[str]:
    """The backends compiled into this build, default first."""

def _train(
    config_path: Optional[str],
    config_json: Optional[str],
    target: Optional[npt.ArrayLike],
    out: Optional[str],
    backend: str,
    on_step: Optional[Callable[[int, float], Optional[bool]]],
    progress: bool,
    force: bool,
    resume: Optional[str],
) -> Tuple[Model, Dict[str, Any], npt.NDArray[np.float32], Optional[str], List[Tuple[int, float, float]]]: ...
