"""Trains the cat (examples/cat.ron) and shows how the trained rule regrows it from noise.

    pip install ./python matplotlib
    python python/examples/cat.py            # writes runs/cat-python/ and cat-regrowth.png

Without matplotlib the run is still trained and written; only the picture is skipped.
"""

import pathlib
import sys

import nca

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main() -> int:
    run = nca.train(ROOT / "examples" / "cat.ron", out=ROOT / "runs" / "cat-python", force=True)
    print(run)
    model = run.model
    # The start and every 10th state of 100 steps from fresh noise, as pictures.
    frames = model.rollout(model.noise(seed=1), 100, every=10)
    pictures = [model.to_rgb(f)[0] for f in frames]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the regrowth strip")
        return 0
    fig, axes = plt.subplots(1, len(pictures), figsize=(1.5 * len(pictures), 1.8))
    for i, (ax, picture) in enumerate(zip(axes, pictures)):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(f"step {10 * i}", fontsize=8)
        ax.axis("off")
    out = pathlib.Path("cat-regrowth.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"regrowth strip in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
