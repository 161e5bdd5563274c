"""The same numbers as `nca-cli`: training and rollouts."""

import numpy as np

import nca
from conftest import read_safetensors, small_run_file


def test_training_gives_the_cli_weights(cli, tmp_path):
    run_file = tmp_path / "small.ron"
    run_file.write_text(small_run_file(steps=200, seed=3))
    cli(str(run_file), "--out", str(tmp_path / "cli"))
    expected = read_safetensors(tmp_path / "cli" / "checkpoint.safetensors")
    on_disk = nca.train(run_file, out=tmp_path / "py", progress=False)
    in_memory = nca.train(run_file, progress=False)
    written = read_safetensors(tmp_path / "py" / "checkpoint.safetensors")
    for run in (on_disk, in_memory):
        assert run.summary["final_step"] == 200
        for name, w in run.model.weights.items():
            assert np.array_equal(w, expected[name]), name
    for name in run.model.weights:
        assert np.array_equal(written[name], expected[name]), name


def test_the_model_is_the_kept_weights_when_the_run_scores_as_it_goes(tmp_path):
    run_file = tmp_path / "small.ron"
    text = small_run_file(steps=200, seed=3).replace("seeds: 2)", "seeds: 2, every: 50)")
    run_file.write_text(text)
    run = nca.train(run_file, out=tmp_path / "py", progress=False)
    step = run.summary["kept_step"]
    assert step in (50, 100, 150, 200)
    kept = read_safetensors(tmp_path / "py" / "best.safetensors")
    last = read_safetensors(tmp_path / "py" / "checkpoint.safetensors")
    for name, w in run.model.weights.items():
        assert np.array_equal(w, kept[name]), name
    assert "adam.m.wq" in last and "adam.m.wq" not in kept
    best = max(row[1] for row in run.psnr)
    assert dict((row[0], row[1]) for row in run.psnr)[step] == best


def test_rollout_is_the_cli_rollout(cli, tmp_path):
    run_file = tmp_path / "small.ron"
    run_file.write_text(small_run_file(steps=100, seed=0))
    run = nca.train(run_file, out=tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    cli(
        "rollout", "--checkpoint", str(ckpt), "--steps", "30", "--noise", "0.02",
        "--seed", "4", "--out", str(tmp_path / "rollout"), "--eval-steps", "5",
    )
    expected = read_safetensors(tmp_path / "rollout" / "final.safetensors")["state"]
    model = nca.Model.load(ckpt)
    batch = model.config["grid"]["batch"]
    got = model.rollout(model.noise(seed=4, batch=batch), 30, noise=0.02, seed=4)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)
    assert np.array_equal(run.model.rollout(model.noise(seed=4, batch=batch), 30, noise=0.02, seed=4), expected)
