"""Where the time of `python train.py` (the main job) goes, phase by phase, as shares and same-process ratios.

    python benchmarks/bench_main_job.py [--steps 30] [--threads 2] [--skip render,baselines]

Every figure is measured inside this one process (or back-to-back child processes), alternating old and new,
so it stays meaningful on a busy machine; rerun it on an idle one for absolute numbers.

  step     one training step of the default model (train.py's flags), split into data (one batch from the
           cached demonstrations, or random frames when there are none), vision tower forward, LM forward,
           head forward + loss, backward, optimizer (clip + AdamW); printed as ms and as shares of the step.
  render   ms per rendered camera frame (both cameras, MetaWorldEnv.observe) in a child process with llvmpipe's
           default render threads (one per core) vs LP_NUM_THREADS=1 and 0, alternating: CPU time of the
           whole process (all threads) and wall time, with the CPU ratio to the default.
  baselines  the expert and random columns of one evaluation seed (5 tasks x 10 episodes, no rendering):
           computed vs read back from the per-seed cache (evaluate.baseline_columns).
  eval     CPU ms per closed-loop step: the policy (ensemble execution re-plans every step) vs the environment.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402  (picks the GL backend before mujoco is imported)
import train  # noqa: E402


# --- one training step, phase by phase -----------------------------------------------------------------------

class Timer:
    """Accumulates perf_counter time per label (torch on CPU is synchronous, so wall time is the op's time)."""

    def __init__(self):
        self.t = {}

    def wrap(self, obj, name, label):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0
            return out
        setattr(obj, name, timed)

    def add(self, label, dt):
        self.t[label] = self.t.get(label, 0.0) + dt


def synthetic_batches(args):
    """Random frames and actions with the shapes of the default windows (when no demos are cached)."""
    g = torch.Generator().manual_seed(0)
    B, H, L, V, S = args.batch, args.window, args.chunk, len(args.views), args.image_size
    while True:
        yield {"images": torch.randint(0, 256, (B, H, V, 3, S, S), dtype=torch.uint8, generator=g),
               "actions": torch.rand(B, H, L, 7, generator=g) * 2 - 1, "action_mask": torch.ones(B, H, L, dtype=torch.bool),
               "instruction": ["press the button from the top"] * B}


def profile_step(steps, threads, warmup=5):
    args = train.parse_args([])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    paths = evaluate.demo_paths(args.tasks, args.demos_per_task, args.image_size, args.seed, args.cache_dir,
                                noise=args.demo_noise)
    if all(p.exists() for p in paths.values()):
        ds = train.data.HDF5Dataset([str(p) for p in paths.values()], args.window, args.chunk,
                                    views=tuple(args.views), image_size=args.image_size, key="metaworld")
        it, source = train.micro_batches(ds, args.batch, 1, 0, 1, args.seed, workers=0), "cached demos"
    else:
        it, source = synthetic_batches(args), "random frames (no cached demos)"
    model = train.build_model(args)
    model.train()
    tm = Timer()
    tm.wrap(model.backbone, "encode_images", "vision tower fwd")
    tm.wrap(model.backbone, "forward", "LM fwd")
    tm.wrap(model.head, "loss", "head fwd + loss")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    for s in range(warmup + steps):
        if s == warmup:
            tm.t = {}
            t_all = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(it)
        tm.add("data", time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss, _ = model(batch)
        tm.add("forward (all)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss.backward()
        tm.add("backward", time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tm.add("optimizer", time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    t = tm.t
    t["other fwd (inputs, sequences)"] = t["forward (all)"] - t["vision tower fwd"] - t["LM fwd"] - t["head fwd + loss"]
    print(f"\n[step] default model, batch {args.batch}, H={args.window}, L={args.chunk}, {len(args.views)} views "
          f"{args.image_size}px, {threads} thread(s), data: {source}; mean of {steps} steps")
    for k in ("data", "vision tower fwd", "LM fwd", "head fwd + loss", "other fwd (inputs, sequences)", "backward",
              "optimizer"):
        print(f"  {k:32s} {1e3 * t[k] / steps:7.1f} ms  {100 * t[k] / total:5.1f}%")
    print(f"  {'step':32s} {1e3 * total / steps:7.1f} ms  ({steps / total:.2f} steps/s)")
    return total / steps


# --- rendering: llvmpipe threads ---------------------------------------------------------------------------

RENDER_CHILD = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import evaluate
env = evaluate.MetaWorldEnv("door-open", image_size=64)
env.reset(0)
for _ in range(5):
    env.observe()
n = {frames}
t, c = time.perf_counter(), time.process_time()  # process_time: CPU of all threads (llvmpipe's too)
for _ in range(n):
    env.observe()
print((time.perf_counter() - t) / (2 * n), (time.process_time() - c) / (2 * n))
"""


def render_ms(lp_threads, frames):
    env = {k: v for k, v in os.environ.items() if k != "LP_NUM_THREADS"}
    if lp_threads is not None:
        env["LP_NUM_THREADS"] = str(lp_threads)
    code = RENDER_CHILD.format(root=str(Path(__file__).resolve().parents[1]), frames=frames)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return 1e3 * float(wall), 1e3 * float(cpu)


def bench_render(rounds, frames):
    if evaluate._pick_gl_backend() != "osmesa":
        print("\n[render] skipped: LP_NUM_THREADS only concerns OSMesa's llvmpipe (MUJOCO_GL=osmesa)")
        return
    runs = {"default": [], "1": [], "0": []}  # llvmpipe render threads: one per core / one / none (inline)
    for _ in range(rounds):  # alternate, so all see the same load
        for k in runs:
            runs[k].append(render_ms(None if k == "default" else int(k), frames))
    print(f"\n[render] per 64 px camera frame, median of {rounds} alternating child processes of {frames} frames x 2 "
          f"cameras; CPU = all threads of the process (what 2 busy workers on 2 cores pay), wall = this process")
    base = np.median([c for _, c in runs["default"]])
    for k, v in runs.items():
        wall, cpu = np.median([w for w, _ in v]), np.median([c for _, c in v])
        print(f"  LP_NUM_THREADS={k:8s} CPU {cpu:6.2f} ms ({base / cpu:.2f}x the default's CPU), wall {wall:6.2f} ms")


# --- evaluation: expert and random columns ------------------------------------------------------------------

def bench_baselines(episodes=10, seed=0):
    tasks = evaluate.DEFAULT_TASKS
    seeds = evaluate.eval_seeds(seed, episodes)
    t0 = time.perf_counter()
    for task in tasks:
        evaluate.baseline_success(task, seeds, "expert")
        evaluate.baseline_success(task, seeds, "random")
    computed = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        evaluate.baseline_columns(tasks, seeds, 200, d)  # fills the cache
        t0 = time.perf_counter()
        evaluate.baseline_columns(tasks, seeds, 200, d)
        cached = time.perf_counter() - t0
    print(f"\n[baselines] expert + random columns, {len(tasks)} tasks x {episodes} episodes: computed {computed:.1f} s, "
          f"from the cache {1e3 * cached:.1f} ms")


def bench_eval_step(steps=60):
    """CPU ms per closed-loop step: the policy (a freshly initialized default model, ensemble execution: one
    re-plan per step) vs the environment (physics + both cameras rendered)."""
    import shutil
    import vla
    args = train.parse_args([])
    torch.set_num_threads(1)  # like an evaluation worker
    d = tempfile.mkdtemp()
    try:
        stats = {"metaworld": train.data.compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (100, 7)))}
        vla.save_checkpoint(d, train.build_model(args), stats)
        policy = vla.Policy.from_pretrained(d, execution=args.execution)
    finally:
        shutil.rmtree(d)
    env = evaluate.MetaWorldEnv("door-open", image_size=args.image_size, cameras=tuple(args.views))
    obs, t_pol, t_env = env.reset(evaluate.eval_seeds(0, 1)[0]), 0.0, 0.0
    policy.reset()
    for _ in range(steps):
        c = time.process_time()
        a = policy.act(obs, env.instruction)
        t_pol += time.process_time() - c
        c = time.process_time()
        obs, _ = env.step(np.clip(a, -1, 1))
        t_env += time.process_time() - c
    env.close()
    tot = t_pol + t_env
    print(f"\n[eval step] CPU per closed-loop step ({steps} steps, 1 thread): policy ({args.execution}) "
          f"{1e3 * t_pol / steps:.1f} ms ({100 * t_pol / tot:.0f}%), env step + 2 cameras {1e3 * t_env / steps:.1f} ms "
          f"({100 * t_env / tot:.0f}%)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed training steps (after 5 warm-up steps)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    p.add_argument("--render-rounds", type=int, default=3)
    p.add_argument("--render-frames", type=int, default=100)
    p.add_argument("--skip", default="", help="comma-separated: step, render, baselines, eval")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    if "step" not in skip:
        profile_step(a.steps, a.threads)
    if "render" not in skip:
        bench_render(a.render_rounds, a.render_frames)
    if "baselines" not in skip:
        bench_baselines()
    if "eval" not in skip:
        bench_eval_step()


if __name__ == "__main__":
    main()
