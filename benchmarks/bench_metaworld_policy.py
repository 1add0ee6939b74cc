"""Actions per second of the default Meta-World Policy on real Meta-World observations (issue #6 targets).

    python benchmarks/bench_metaworld_policy.py [--ckpt RUN_DIR] [--steps 200] [--threads 1]

Times Policy.act alone (rendering excluded: observations are recorded first from the scripted expert on one
task) for `chunk` execution (one chunk of L actions per L steps; the VLM still encodes every frame into the
history) and `first` (re-plan every step). Without --ckpt a fresh model with train.py's default flags is used
(same compute as a trained one). Both policies are timed round robin so they see the same machine load.
Targets: chunk >= 100 actions/s and first >= 30 actions/s on the 2-core CPU. Prints both and their ratio.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402  (first: picks MUJOCO_GL)
import train  # noqa: E402
import data  # noqa: E402
import vla  # noqa: E402


def record_observations(n, image_size):
    env = evaluate.MetaWorldEnv("drawer-open", image_size=image_size, max_steps=n)
    obs, frames = env.reset(evaluate.EVAL_SEEDS[0]), []
    while not env.done:
        frames.append(obs)
        obs, _ = env.step(env.expert_action())
    env.close()
    evaluate.close_renderer()
    return frames, env.instruction


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=None, help="run directory (default: a fresh model with train.py's defaults)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.ckpt:
        policies = {ex: vla.Policy.from_pretrained(args.ckpt, execution=ex) for ex in ("chunk", "first")}
    else:
        targs = train.parse_args([])
        torch.manual_seed(0)
        model = train.build_model(targs).eval()
        stats = {"metaworld": data.compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (100, 7)))}
        policies = {ex: vla.Policy(model, stats, execution=ex) for ex in ("chunk", "first")}
    cfg = next(iter(policies.values())).config
    frames, instr = record_observations(args.steps, cfg.image_size)
    times = {ex: [] for ex in policies}
    for ex, pol in policies.items():  # warm up
        pol.reset()
        for f in frames[:5]:
            pol.act(f, instr)
        pol.reset()
    for f in frames:
        for ex, pol in policies.items():
            t0 = time.perf_counter()
            pol.act(f, instr)
            times[ex].append(time.perf_counter() - t0)
    rate = {ex: len(t) / sum(t) for ex, t in times.items()}
    med = {ex: statistics.median(t) * 1000 for ex, t in times.items()}
    print(f"config: {cfg.formulation}, head {cfg.head}, H={cfg.window}, L={cfg.chunk}, views {cfg.views}, "
          f"{cfg.image_size}px, {args.threads} thread(s), {len(frames)} steps")
    print(f"chunk execution: {rate['chunk']:.0f} actions/s (median {med['chunk']:.1f} ms/step; target >= 100)")
    print(f"re-plan every step (first): {rate['first']:.0f} actions/s (median {med['first']:.1f} ms/step; "
          f"target >= 30)")
    print(f"chunk / first speed ratio: {rate['chunk'] / rate['first']:.2f}x")


if __name__ == "__main__":
    main()
