"""The main job's speed-ups (issue 19): the cosine LR schedule and the cached expert / random columns."""

import math

import pytest
import torch

import evaluate
import train


def test_cosine_schedule_warms_up_then_decays_to_zero():
    total, warm = 200, 10
    lrs = [train.lr_at(s, 1e-3, warm, "cosine", total) for s in range(total)]
    const = [train.lr_at(s, 1e-3, warm) for s in range(total)]
    assert lrs[:warm] == const[:warm]  # the same linear warmup
    assert lrs[warm] == pytest.approx(1e-3)
    assert lrs[warm + (total - warm) // 2] == pytest.approx(5e-4, rel=1e-2)  # half way: half the peak
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # monotone decay ...
    assert lrs[-1] < 1e-6 and train.lr_at(total + 5, 1e-3, warm, "cosine", total) == pytest.approx(0.0)  # ... to 0
    with pytest.raises(ValueError, match="cosine"):
        train.lr_at(50, 1e-3, warm, "linear", total)


def test_cosine_schedule_drives_the_optimizer():
    """--schedule cosine reaches the LambdaLR in train(): the optimizer's LR follows lr_at."""
    args = train.parse_args(["--schedule", "cosine", "--steps", "20", "--warmup", "2", "--lr", "1e-2"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: train.lr_at(s, 1.0, args.warmup, args.schedule,
                                                                         args.steps))
    seen = []
    for _ in range(args.steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:2] == pytest.approx([5e-3, 1e-2])
    assert seen[-1] < 1e-4 and seen[11] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 9 / 18)))


def test_baseline_columns_are_cached_per_seed(tmp_path, monkeypatch):
    seeds = evaluate.eval_seeds(0, 2)
    first = evaluate.baseline_columns(["drawer-open"], seeds, max_steps=60, cache_dir=tmp_path)
    assert set(first["drawer-open"]) == {"expert", "random"}
    assert len(list(tmp_path.glob("metaworld_baselines_*.json"))) == 1

    def no_rollouts(*a, **k):
        raise AssertionError("a cached column was rolled out again")
    monkeypatch.setattr(evaluate, "baseline_success", no_rollouts)
    assert evaluate.baseline_columns(["drawer-open"], seeds, max_steps=60, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError, match="rolled out"):  # other seeds are another cache entry
        evaluate.baseline_columns(["drawer-open"], evaluate.eval_seeds(1, 2), max_steps=60, cache_dir=tmp_path)


def test_resuming_a_run_saved_before_schedule_existed_keeps_its_constant_lr(tmp_path):
    import json
    saved = vars(train.parse_args(["--out", str(tmp_path)]))
    saved.pop("schedule")  # what train_args.json held before --schedule existed
    (tmp_path / "train_args.json").write_text(json.dumps(saved))
    assert train.parse_args(["--resume", str(tmp_path)]).schedule == "constant"
    assert train.parse_args(["--resume", str(tmp_path), "--schedule", "cosine"]).schedule == "cosine"
