"""Shared fixtures: the repository root, the `nca-cli` binary and small run configs."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def small_run_file(steps: int = 200, seed: int = 3) -> str:
    """A 16x16 run (disc target) that trains in well under a second."""
    return f"""(
    grid: (height: 16, width: 16),
    training: (steps: {steps}, seed: {seed}),
    target: Disc(radius: 0.6, inside: (1.0, 0.5, 0.0), outside: (0.0, 0.2, 1.0)),
    output: (snapshot_every: 100, checkpoint_every: 100, scale: 2, gif_frames: 10),
    evaluation: (steps: 20, seeds: 2),
)
"""


def small_config(steps: int = 60) -> dict:
    """The same kind of run as a dict."""
    return {
        "grid": {"height": 16, "width": 16},
        "training": {"steps": steps, "seed": 1},
        "target": {"Disc": {"radius": 0.6, "inside": [1.0, 0.5, 0.0], "outside": [0.0, 0.2, 1.0]}},
        "evaluation": {"steps": 10, "seeds": 2},
    }


def read_safetensors(path) -> dict:
    """The float32 tensors of a safetensors file (the format is a JSON header + raw data)."""
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info)
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + start : base + end], dtype="<f4").reshape(info["shape"])
    return out


@pytest.fixture(scope="session")
def cli():
    """Runs `nca-cli` ($NCA_CLI, else the workspace's debug build) and returns its stdout."""
    exe = os.environ.get("NCA_CLI") or str(ROOT / "target" / "debug" / "nca-cli")
    if not os.path.exists(exe):
        pytest.skip(f"nca-cli not built ({exe}); .ci/python builds it")

    def run(*args: str) -> str:
        done = subprocess.run([exe, *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run
