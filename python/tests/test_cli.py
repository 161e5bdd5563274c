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
