"""train.py: the schedule, the logs, and a smoke run of the whole default path (demos -> train -> evaluate)."""

import csv
import json
import math

import numpy as np
import pytest

import train


def test_lr_schedule_is_linear_warmup_then_constant():
    lrs = [train.lr_at(s, 1e-3, 10) for s in range(30)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(5e-4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9:])
    assert train.lr_at(0, 1e-3, 0) == pytest.approx(1e-3)  # no warmup


def test_metrics_log_and_loss_curve(tmp_path):
    log = train.MetricsLog(tmp_path / "m.csv", every=2)
    for step in range(6):
        log.add(step, 1e-3, {"loss": float(step), "acc": 1.0})
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["loss"]) for r in rows] == [0.5, 2.5, 4.5]  # averaged over each logging interval
    train.plot_loss_curve([r["step"] for r in log.rows], [r["loss"] for r in log.rows], tmp_path / "c.png")
    from PIL import Image
    im = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    assert im.shape == (400, 640, 3)
    assert ((im[..., 0] > 150) & (im[..., 1] < 80)).sum() > 50  # the red loss line was drawn


def test_flags_parse_lists():
    args = train.parse_args(["--tasks", "drawer-open,door-open", "--views", "static"])
    assert args.tasks == ["drawer-open", "door-open"] and args.views == ["static"]


def test_smoke_whole_path(tmp_path, capsys):
    """2 tasks, 2 demos each, 3 training steps, 1 evaluation episode: every artifact exists and is well formed,
    and evaluate.py re-runs the evaluation with the same numbers."""
    pytest.importorskip("metaworld")
    import evaluate
    run = tmp_path / "run"
    argv = ["--tasks", "button-press-topdown,handle-press", "--demos-per-task", "2", "--steps", "3", "--batch", "4",
            "--log-every", "1", "--eval-episodes", "1", "--max-steps", "15", "--out", str(run),
            "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--image-size", "32"]
    train.main(argv)
    printed = capsys.readouterr().out
    assert "--formulation" in printed and "policy_head" in printed  # every choice printed at start
    for f in ["model.safetensors", "config.json", "action_stats.json", "train_args.json", "metrics.csv",
              "loss_curve.png", "results.md", "results.json", "button-press-topdown.gif", "handle-press.gif"]:
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"button-press-topdown", "handle-press"}
    for r in results.values():
        for k in ("policy", "expert", "random"):
            assert 0.0 <= r[k] <= 1.0
        assert 1 <= r["steps"] <= 15
    assert "| **mean** |" in (run / "results.md").read_text()
    # the optimizer really stepped: the saved weights differ from the same-seed initialization
    import torch
    import vla
    trained, _, extra = vla.load_checkpoint(str(run))
    assert extra["step"] == 3
    torch.manual_seed(0)
    fresh = train.build_model(train.parse_args(argv))
    changed = [n for n, p in fresh.state_dict().items() if not torch.equal(p, trained.state_dict()[n])]
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("backbone.") for n in changed)
    stats = json.loads((run / "action_stats.json").read_text())
    assert set(stats) == {"metaworld"} and len(stats["metaworld"]["q01"]) == 7
    # the standalone evaluation gives the same numbers for the same seed
    again, _ = evaluate.run_metaworld_eval(run, episodes=1, seed=0, out=tmp_path / "ev", gifs=False, workers=1,
                                           progress=False)
    assert {t: r["policy"] for t, r in again.items()} == {t: r["policy"] for t, r in results.items()}
    assert (tmp_path / "ev" / "results.md").is_file()


def test_reproduce_flags_round_trip():
    # results.md prints the command that rebuilt a run: it must parse back to the same flags
    import train
    argv = ["--moe", "--no-shift-aug", "--data", "a.h5", "b.h5", "--data-weights", "3", "1",
            "--tasks", "drawer-open,door-open", "--steps", "5", "--execution", "first"]
    a = train.parse_args(argv)
    flags = train.reproduce_flags(a)
    assert vars(train.parse_args(flags.split())) == vars(a)
    assert train.reproduce_flags(train.parse_args([])) == ""


def test_head_size_follows_the_backbone(tmp_path):
    """A pretrained backbone folder gets the paper's head (LSTM 4 x 1024, MLP 1024-512-256), the CPU backbones
    the tiny one; --head-size forces either, and the window/chunk/image-size flags always win over a preset."""
    assert train.head_preset("auto", "tiny") == "tiny"
    assert train.head_preset("auto", str(tmp_path)) == "paper"  # any existing folder: a Hugging Face model
    assert train.head_preset("tiny", str(tmp_path)) == "tiny"
    small = train.build_model(train.parse_args([])).config
    assert (small.head_width, small.head_layers) == (128, 2)
    big = train.build_model(train.parse_args(["--head-size", "paper"])).config
    assert (big.head_width, big.head_layers, big.head_mlp) == (1024, 4, (1024, 512, 256))
    assert (big.window, big.chunk, big.image_size) == (2, 8, 64)  # train.py's flags, not the preset's 16/10/224
