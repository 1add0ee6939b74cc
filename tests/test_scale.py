"""train.py at scale and under faults (CPU, gloo): torchrun DDP, exact resume after SIGKILL, damaged checkpoints,
NaN stops, and the data recipes (finetune / co-train / post-train). Tiny model, tiny synthetic HDF5 data."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import train
import vla

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"control_hz": 10, "action_convention": "delta xyz (m) + delta euler xyz (rad) + gripper 1 open/-1 closed"}


def write_toy(path, key, seed, n_eps=4, T=12):
    """n_eps episodes of T random frames (16 px) and random actions, two instructions."""
    rng = np.random.default_rng(seed)
    with data.EpisodeWriter(path, {**ATTRS, "dataset_key": key}) as w:
        for e in range(n_eps):
            images = {v: rng.integers(0, 256, (T, 16, 16, 3), dtype=np.uint8) for v in ("static", "wrist")}
            a = rng.normal(size=(T, 7)).astype(np.float32)
            a[:, 6] = np.where(a[:, 6] > 0, 1.0, -1.0)
            w.add_episode(images, a, f"do task {e % 2}", f"task{e % 2}")
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return write_toy(d / "a.h5", "toy_a", 0), write_toy(d / "b.h5", "toy_b", 1)


def flags(data_paths, out, steps, *extra):
    return ["--data", *data_paths, "--out", str(out), "--steps", str(steps), "--image-size", "32", "--batch", "8",
            "--threads", "1", "--loader-workers", "0", "--log-every", "1", "--eval-episodes", "0", *map(str, extra)]


def run(args, torchrun=0, check=True):
    """train.py in a fresh process (optionally under torchrun with `torchrun` processes)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_port", str(29500 + os.getpid() % 1000)] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(launcher + [str(ROOT / "train.py")] + args, capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def test_rank_batches_partition_the_global_batch():
    """Whatever the number of processes and accumulation steps, step b covers the same global batch."""
    n, G = 50, 8
    ref = train.rank_batches(n, G, 1, 0, 1, seed=3, epoch=2)  # one process: one micro-batch per step
    assert len(ref) == n // G and all(len(b) == G for b in ref)
    for world, accum in [(2, 1), (1, 2), (2, 2), (4, 2)]:
        per_rank = [train.rank_batches(n, G, accum, r, world, seed=3, epoch=2) for r in range(world)]
        for b in range(n // G):
            micro = [per_rank[r][b * accum + j] for r in range(world) for j in range(accum)]
            assert all(len(m) == G // (world * accum) for m in micro)
            assert sorted(i for m in micro for i in m) == sorted(ref[b])
    assert train.rank_batches(n, G, 1, 0, 1, seed=3, epoch=3) != ref  # a new permutation each epoch
    with pytest.raises(ValueError, match="multiple of --grad-accum"):
        next(train.micro_batches(list(range(50)), 8, 3, 0, 1, seed=0))


def test_ddp_two_processes_equal_one_process_same_global_batch(toy, tmp_path):
    """torchrun, 2 processes x 2 accumulated micro-batches of 2 vs 1 process accumulating 4 micro-batches of 2:
    the same global batch of 8 gives the same parameters after 3 steps (gloo all-reduce mean, with no_sync on
    the first micro-batch == accumulation mean). Augmentation off (each process draws its own shifts)."""
    common = ("--no-shift-aug", "--lr", "1e-3", "--warmup", "1", "--ckpt-every", "100")
    run(flags(toy[:1], tmp_path / "ddp", 3, *common, "--grad-accum", "2"), torchrun=2)
    run(flags(toy[:1], tmp_path / "one", 3, *common, "--grad-accum", "4"))
    a, b, init = weights(tmp_path / "ddp"), weights(tmp_path / "one"), None
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["extra"]["step"] == 3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0)
    init = train.build_model(train.parse_args(flags(toy[:1], tmp_path / "x", 3, "--no-shift-aug"))).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # and training really moved them
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000003" / "train_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["data_position"]["samples_seen"] == 24
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000003" / "rng_rank1.pt").is_file()


def test_sigkill_then_resume_is_bit_identical(toy, tmp_path):
    """A run SIGKILLed after 5 of 8 steps (checkpoints every 2) resumes from step 4 and ends bit-identical to an
    uninterrupted run: weights, optimizer, scheduler, RNG (augmentation on) and data position all restored."""
    args = ("--ckpt-every", "2", "--keep-ckpts", "2")
    run(flags(toy[:1], tmp_path / "full", 8, *args))
    p = run(flags(toy[:1], tmp_path / "crash", 8, *args, "--debug-kill-at-step", "5"), check=False)
    assert p.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), p.returncode
    ck = tmp_path / "crash" / "checkpoints"
    assert sorted(d.name for d in ck.iterdir()) == ["step_00000002", "step_00000004"]
    p = run(["--resume", str(tmp_path / "crash")])  # the run's own flags come from its train_args.json
    assert "resumed from" in p.stdout and "step_00000004" in p.stdout
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "crash")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    o1 = torch.load(tmp_path / "full/checkpoints/step_00000008/train_state.pt", weights_only=False)["optimizer"]
    o2 = torch.load(tmp_path / "crash/checkpoints/step_00000008/train_state.pt", weights_only=False)["optimizer"]
    assert all(torch.equal(o1["state"][i]["exp_avg_sq"], o2["state"][i]["exp_avg_sq"]) for i in o1["state"])
    # keep the newest 2; metrics.csv has each step once (rows after the checkpoint were dropped and redone)
    assert sorted(d.name for d in ck.iterdir()) == ["step_00000006", "step_00000008"]
    steps = [int(line.split(",")[0]) for line in (tmp_path / "crash" / "metrics.csv").read_text().split()[1:]]
    assert steps == list(range(1, 9))

    # a damaged (truncated) newest checkpoint is detected, skipped with a warning, and the previous one used
    shutil.copytree(tmp_path / "crash", tmp_path / "dmg")
    f = tmp_path / "dmg" / "checkpoints" / "step_00000008" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step_00000008 is damaged: model.safetensors has .* bytes"):
        d = train.latest_checkpoint(tmp_path / "dmg")
    assert d.name == "step_00000006"
    model, _, extra = vla.load_checkpoint(str(d))
    assert extra["step"] == 6
    targs = train.parse_args(["--resume", str(tmp_path / "dmg")])
    model = train.build_model(targs)
    opt = torch.optim.AdamW(model.trainable_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert train.load_train_state(d, model, model, opt, sched) == 6 and sched.last_epoch == 6
    assert torch.equal(model.state_dict()["lrn"], weights(d)["lrn"])
    (tmp_path / "dmg" / "checkpoints" / "step_00000006" / "manifest.json").unlink()  # incomplete: no manifest
    with pytest.warns(UserWarning) as record:
        assert train.latest_checkpoint(tmp_path / "dmg") is None
    assert "no readable manifest" in str(record[-1].message) and "fresh start" in str(record[-1].message)


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(toy, tmp_path):
    out = tmp_path / "nan"
    p = run(flags(toy[:1], out, 6, "--ckpt-every", "2", "--debug-nan-at-step", "3"), check=False)
    assert p.returncode != 0
    msg = p.stderr + p.stdout
    assert "non-finite loss or gradient at step 3" in msg and "step_00000002" in msg
    ck = out / "checkpoints"
    assert [d.name for d in ck.iterdir()] == ["step_00000002"]
    assert train.verify_checkpoint(ck / "step_00000002") is None
    _, _, extra = vla.load_checkpoint(str(out))  # the run directory still holds the good step-2 weights
    assert extra["step"] == 2
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_cotrain_then_posttrain_carry_every_datasets_stats(toy, tmp_path):
    """co-train: a weighted mixture of two datasets; post-train: --init-from it, finetune on one. The action
    statistics of every dataset travel in both checkpoints."""
    co = tmp_path / "co"
    train.main(flags(toy, co, 2, "--data-weights", "3", "1", "--batch", "4"))
    stats = json.loads((co / "action_stats.json").read_text())
    assert set(stats) == {"toy_a", "toy_b"}
    assert stats["toy_a"] != stats["toy_b"]
    post = tmp_path / "post"
    train.main(flags(toy[1:], post, 1, "--init-from", str(co), "--batch", "4", "--lr", "0"))
    assert set(json.loads((post / "action_stats.json").read_text())) == {"toy_a", "toy_b"}
    a, b = weights(co), weights(post)
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: post-training started exactly from the co-trained run
    with pytest.raises(SystemExit, match="--data-weights has 1 values for 2"):
        train.main(flags(toy, tmp_path / "bad", 1, "--data-weights", "1"))
    with pytest.raises(SystemExit, match="do not fit"):
        train.main(flags(toy[1:], tmp_path / "bad2", 1, "--init-from", str(co), "--chunk", "2"))


@pytest.mark.slow
def test_fsdp_two_processes_sigkill_resume_bit_identical(toy, tmp_path):
    """torchrun --fsdp (FSDP2 fully_shard, bf16 compute) with activation checkpointing: the gathered checkpoint
    loads as a plain VLA, and a run killed after 3 of 4 steps resumes (re-sharding the saved full state) to
    bit-identical weights."""
    args = ("--fsdp", "--act-ckpt", "--ckpt-every", "2", "--lr", "1e-3", "--warmup", "1")
    run(flags(toy[:1], tmp_path / "full", 4, *args), torchrun=2)
    p = run(flags(toy[:1], tmp_path / "crash", 4, *args, "--debug-kill-at-step", "3"), torchrun=2, check=False)
    assert p.returncode != 0
    run(["--resume", str(tmp_path / "crash")], torchrun=2)
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "crash")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    model, stats, extra = vla.load_checkpoint(str(tmp_path / "full"))
    assert extra["step"] == 4 and set(stats) == {"toy_a"}
    torch.manual_seed(0)
    init = train.build_model(train.parse_args(flags(toy[:1], tmp_path / "x", 4))).state_dict()
    assert max((model.state_dict()[k] - init[k]).abs().max().item() for k in init) > 1e-4


@pytest.mark.slow
def test_metaworld_eval_under_torchrun_shards_episodes_and_merges(toy, tmp_path):
    """evaluate.py under torchrun: 2 ranks split the episodes (and the baselines) and rank 0 writes one table,
    with the same numbers as a single process."""
    pytest.importorskip("metaworld")
    run_dir = tmp_path / "run"
    train.main(flags(toy[:1], run_dir, 1, "--batch", "4", "--max-steps", "80"))
    ev = [str(ROOT / "evaluate.py"), "--ckpt", str(run_dir), "--benchmark", "metaworld", "--tasks",
          "button-press-topdown", "--episodes", "3", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for out, launcher in [("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                              "--nproc_per_node", "2", "--master_port",
                                                              str(29600 + os.getpid() % 1000)])]:
        p = subprocess.run(launcher + ev + ["--out", str(tmp_path / out)], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one == two
    assert one["button-press-topdown"]["expert"] > 0  # the scripted expert succeeds within 80 steps
