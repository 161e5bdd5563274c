"""Bad input raises the right exception with the CLI's message; nothing crashes."""

import numpy as np
import pytest

import nca
from conftest import small_config


@pytest.fixture(scope="module")
def model():
    return nca.train(small_config(steps=3), progress=False).model


def test_a_bad_field_names_the_field():
    cfg = small_config()
    cfg["grid"]["height"] = 0
    with pytest.raises(ValueError, match="grid.height"):
        nca.train(cfg, progress=False)


def test_a_misspelt_field_is_refused():
    cfg = small_config()
    cfg["training"]["stpes"] = 3
    with pytest.raises(ValueError, match="stpes"):
        nca.train(cfg, progress=False)


def test_missing_files_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ron"):
        nca.train(tmp_path / "nope.ron", progress=False)
    with pytest.raises(FileNotFoundError):
        nca.Model.load(tmp_path / "nope.safetensors")
    cfg = small_config()
    cfg["target"] = {"Image": {"path": str(tmp_path / "missing.png")}}
    with pytest.raises(FileNotFoundError, match="missing.png"):
        nca.train(cfg, progress=False)


def test_a_file_that_is_not_a_checkpoint_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="bad.safetensors"):
        nca.Model.load(bad)


def test_unknown_backend_lists_the_known_ones(model):
    with pytest.raises(ValueError, match="ndarray"):
        nca.train(small_config(), backend="cuda", progress=False)
    with pytest.raises(ValueError, match="unknown backend"):
        model.with_backend("tpu")


def test_the_memory_limit_raises_memory_error(monkeypatch, model):
    monkeypatch.setenv("NCA_MEMORY_LIMIT", "1M")
    cfg = small_config()
    cfg["grid"] = {"height": 512, "width": 512}
    with pytest.raises(MemoryError, match="NCA_MEMORY_LIMIT"):
        nca.train(cfg, progress=False)
    with pytest.raises(MemoryError):
        model.noise(batch=100_000)
    monkeypatch.setenv("NCA_MEMORY_LIMIT", "lots")
    with pytest.raises(MemoryError, match="NCA_MEMORY_LIMIT"):
        model.noise()


def test_bad_states_and_targets(model):
    c, h, w = model.shape
    with pytest.raises(ValueError, match=r"\[B, %d, %d, %d\]" % (c, h, w)):
        model.step(np.zeros((1, c + 1, h, w), np.float32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.step(np.zeros((c, h, w), np.float32))
    nan = model.noise()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.rollout(nan, 3)
    with pytest.raises(ValueError, match="noise"):
        model.rollout(model.noise(), 3, noise=-1.0)
    with pytest.raises(ValueError, match="every"):
        model.rollout(model.noise(), 3, every=0)
    with pytest.raises(ValueError, match="steps"):
        model.regrowth(steps=0)
    with pytest.raises(ValueError, match="picture"):
        model.regrowth(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nca.train(small_config(), target=np.full((8, 8, 3), 2.0), progress=False)
    with pytest.raises(ValueError, match="1, 3 or 4"):
        nca.train(small_config(), target=np.zeros((8, 8, 2)), progress=False)
    with pytest.raises(TypeError):
        nca.train(42, progress=False)
