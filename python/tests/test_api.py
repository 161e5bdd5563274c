"""The Python API: shapes, dtypes, dicts, a short real training and what it returns."""

import json

import numpy as np
import pytest

import nca
from conftest import small_config


@pytest.fixture(scope="module")
def run():
    return nca.train(small_config(steps=80), progress=False)


def test_run_holds_the_summary_losses_and_model(run):
    assert isinstance(run, nca.Run)
    assert run.out is None
    assert run.status == "completed"
    for key in ("backend", "status", "final_step", "final_loss", "regrowth", "steps_run", "spikes"):
        assert key in run.summary, key
    assert run.summary["final_step"] == 80
    assert run.losses.dtype == np.float32 and run.losses.shape == (80,)
    assert run.summary["final_loss"] == pytest.approx(float(run.losses[-1]), rel=1e-6)
    assert run.psnr and run.psnr[-1][0] == 80
    assert "completed" in repr(run)


def test_a_short_training_learns(run):
    first, last = float(run.losses[:5].mean()), float(run.losses[-5:].mean())
    assert last < first / 5, (first, last)


def test_model_shapes_and_dtypes(run):
    m = run.model
    c, h, w = m.shape
    assert (h, w) == (16, 16) and m.visible_channels == 3 and c >= 3
    assert m.backend == "ndarray"
    weights = m.weights
    assert "wq" in weights and all(a.dtype == np.float32 for a in weights.values())
    s = m.noise(seed=2, batch=3)
    assert s.shape == (3, c, 16, 16) and s.dtype == np.float32
    assert np.array_equal(s, m.noise(seed=2, batch=3))
    assert not np.array_equal(s, m.noise(seed=3, batch=3))
    nxt = m.step(s)
    assert nxt.shape == s.shape and nxt.dtype == np.float32
    assert not np.array_equal(nxt, s)
    assert np.array_equal(m.rollout(s, 1), nxt)
    final = m.rollout(s, 7)
    frames = m.rollout(s, 7, every=3)
    assert frames.shape == (4, 3, c, 16, 16)  # start, 3, 6 and 7
    assert np.array_equal(frames[0], s) and np.array_equal(frames[-1], final)
    noisy = m.rollout(s, 7, noise=0.05, seed=1)
    assert not np.array_equal(noisy, final)
    assert np.array_equal(noisy, m.rollout(s, 7, noise=0.05, seed=1))
    rgb = m.to_rgb(final)
    assert rgb.shape == (3, 16, 16, 3) and rgb.dtype == np.uint8
    # float64 and lists are converted.
    assert np.array_equal(m.step(s.astype(np.float64)), nxt)
    assert m.target.shape == (1, 3, 16, 16)


def test_regrowth_is_the_summary_score(run):
    score = run.model.regrowth(steps=10, seeds=2)
    assert score == run.summary["regrowth"]
    assert set(score) >= {"mean_psnr_db", "mean_mse", "per_seed", "steps", "run_seed"}
    picture = (run.model.to_rgb(run.model.target)[0]).astype(np.uint8)
    # The stored target drawn as a picture and fitted back scores (almost) the same.
    again = run.model.regrowth(picture, steps=10, seeds=2)
    assert again["mean_psnr_db"] == pytest.approx(score["mean_psnr_db"], abs=0.5)


def test_config_is_a_dict_that_trains_again(run, tmp_path):
    cfg = run.model.config
    assert cfg["grid"]["height"] == 16 and cfg["training"]["steps"] == 80
    json.dumps(cfg)
    cfg["training"]["steps"] = 5
    cfg["output"]["dir"] = None
    again = nca.train(cfg, progress=False)
    assert again.summary["final_step"] == 5


def test_save_and_load_round_trip(run, tmp_path):
    path = tmp_path / "rule.safetensors"
    run.model.save(path)
    back = nca.Model.load(path)
    for name, w in run.model.weights.items():
        assert np.array_equal(back.weights[name], w), name
    s = back.noise(seed=5)
    assert np.array_equal(back.rollout(s, 5), run.model.rollout(s, 5))
    assert "16x16" in repr(back)


def test_an_array_target_replaces_the_config_target(tmp_path):
    yy, xx = np.mgrid[0:40, 0:40]
    picture = np.zeros((40, 40, 4), np.uint8)
    picture[..., 0] = 255
    picture[..., 3] = np.where((yy - 20) ** 2 + (xx - 20) ** 2 < 150, 255, 0)
    cfg = small_config(steps=5)
    del cfg["target"]
    run = nca.train(cfg, target=picture, out=tmp_path / "run", progress=False)
    t = run.model.target
    assert t.shape == (1, 3, 16, 16)
    # Red disc composited over white: the centre is red, the corner white.
    assert np.allclose(t[0, :, 8, 8], [1, 0, 0], atol=0.02)
    assert np.allclose(t[0, :, 0, 0], [1, 1, 1], atol=0.02)
    assert (tmp_path / "run" / "summary.json").exists()
    assert run.out == str(tmp_path / "run")


def test_on_step_sees_every_step_and_false_stops():
    seen = []

    def watch(step, loss):
        seen.append((step, loss))
        return False if step == 10 else None

    run = nca.train(small_config(steps=50), on_step=watch, progress=False)
    assert [s for s, _ in seen] == list(range(1, 11))
    assert run.status == "interrupted" and run.losses.shape == (10,)
    assert seen[-1][1] == pytest.approx(float(run.losses[-1]))


def test_an_exception_in_on_step_propagates():
    def boom(step, loss):
        if step == 3:
            raise ZeroDivisionError("from on_step")

    with pytest.raises(ZeroDivisionError, match="from on_step"):
        nca.train(small_config(steps=50), on_step=boom, progress=False)


def test_backends_lists_ndarray_first():
    assert nca.backends()[0] == "ndarray"
