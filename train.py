"""Train a VLA, then evaluate it in closed loop. `python train.py` with no flags is the built-in default:

  1. generate (or reuse from data_cache/) Meta-World scripted-expert demonstrations for the default tasks,
  2. train the paper's best formulation (policy head over a history of H frames, continuous actions, chunks of
     L actions, §III-C / Fig. 6) on the `tiny` decoder-only backbone,
  3. evaluate it in closed loop on evaluation seeds never used for demonstrations and print a success table
     (scripted expert = ceiling, random actions = floor).

Every choice is a flag (printed at start). The run directory gets model.safetensors, config.json,
action_stats.json (vla.save_checkpoint), train_args.json, metrics.csv, loss_curve.png, results.md, GIFs.
Re-run the evaluation alone with `python evaluate.py --ckpt RUN_DIR --benchmark metaworld`.
"""

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import vla


# -----------------------------------------------------------------------------------------------------------
# flags
# -----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("model (vla.VLAConfig; defaults: the tiny preset, paper's best formulation)")
    a.add_argument("--formulation", default="policy_head", choices=vla.FORMULATIONS)
    a.add_argument("--backbone", default="tiny")
    a.add_argument("--head", default="lstm", choices=["mlp", "lstm", "gpt"], help="policy-head trunk")
    a.add_argument("--window", type=int, default=4, help="H, history frames")
    a.add_argument("--chunk", type=int, default=4, help="L, actions predicted per frame")
    a.add_argument("--action-loss", default="huber", choices=["huber", "mse", "flow"])
    a.add_argument("--views", default="static,wrist", help="cameras, comma-separated")
    a.add_argument("--image-size", type=int, default=64, help="rendered (and model input) image size")
    d = p.add_argument_group("data (Meta-World scripted-expert demonstrations)")
    d.add_argument("--tasks", default=",".join(evaluate.DEFAULT_TASKS), help="comma-separated Meta-World tasks")
    d.add_argument("--demos-per-task", type=int, default=30)
    d.add_argument("--cache-dir", default="data_cache")
    d.add_argument("--demo-noise", type=float, default=0.3, help="std of noise on the expert's executed xyz "
                   "actions (labels stay clean, DART); 0 = plain expert rollouts")
    d.add_argument("--workers", type=int, default=0, help="processes for demos and evaluation (0 = all cores)")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=3000)
    o.add_argument("--batch", type=int, default=32)
    o.add_argument("--lr", type=float, default=3e-4)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then constant LR")
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto | cpu | cuda")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores but one, which the "
                   "DataLoader worker uses; on a busy 2-core box 2 threads ran ~8x slower than 1)")
    o.add_argument("--loader-workers", type=int, default=1, help="DataLoader worker processes")
    o.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    o.add_argument("--log-every", type=int, default=25)
    o.add_argument("--out", default="runs/default")
    e = p.add_argument_group("evaluation")
    e.add_argument("--execution", default="chunk", choices=["chunk", "first", "ensemble"])
    e.add_argument("--eval-episodes", type=int, default=10, help="episodes per task (0 = skip evaluation)")
    e.add_argument("--eval-seed", type=int, default=0)
    e.add_argument("--max-steps", type=int, default=200, help="evaluation episode step limit")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.views = [v for v in args.views.split(",") if v]
    return args


# -----------------------------------------------------------------------------------------------------------
# pieces: data, model, optimizer, schedule
# -----------------------------------------------------------------------------------------------------------

def build_dataset(args):
    paths = evaluate.generate_demos(args.tasks, args.demos_per_task, args.image_size, args.seed % 100,
                                    args.cache_dir, workers=args.workers or None,  # renders both cameras
                                    noise=args.demo_noise)
    return data.HDF5Dataset(paths, args.window, args.chunk, views=tuple(args.views), image_size=args.image_size,
                            key="metaworld")


def build_model(args):
    config = vla.VLAConfig.tiny(formulation=args.formulation, backbone=args.backbone, head=args.head,
                                window=args.window, chunk=args.chunk, action_loss=args.action_loss,
                                views=tuple(args.views), image_size=args.image_size)
    return vla.VLA(config)


def lr_at(step, base_lr, warmup):
    """Linear warmup from 0 to base_lr over `warmup` steps, then constant (the paper's schedule)."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


def batches(dataset, batch_size, seed, workers=0):
    """Endless shuffled batches (a new permutation every epoch), collated by the default collate."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=g, num_workers=workers, persistent_workers=workers > 0)
    while True:
        yield from loader


# -----------------------------------------------------------------------------------------------------------
# logging: metrics CSV and a loss-curve PNG drawn with pillow
# -----------------------------------------------------------------------------------------------------------

def plot_loss_curve(steps, losses, path, title="training loss"):
    """A plain line plot (log-scale y) with labelled axes; pillow only, no matplotlib."""
    from PIL import Image, ImageDraw
    w, h, ml, mr, mt, mb = 640, 400, 70, 20, 30, 40
    im = Image.new("RGB", (w, h), "white")
    dr = ImageDraw.Draw(im)
    x = np.asarray(steps, dtype=np.float64)
    y = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-8))
    if len(x) == 0:
        im.save(path)
        return
    x0, x1 = x.min(), max(x.max(), x.min() + 1)
    y0, y1 = math.floor(y.min() * 2) / 2, math.ceil(y.max() * 2) / 2 + (0.5 if y.max() == y.min() else 0)
    px = lambda v: ml + (v - x0) / (x1 - x0) * (w - ml - mr)  # noqa: E731
    py = lambda v: h - mb - (v - y0) / (y1 - y0) * (h - mt - mb)  # noqa: E731
    dr.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for k in np.arange(y0, y1 + 1e-9, 0.5):  # grid + labels every half decade
        dr.line([ml, py(k), w - mr, py(k)], fill=(220, 220, 220))
        dr.text((5, py(k) - 6), f"{10 ** k:.3g}", fill="black")
    for k in np.linspace(x0, x1, 5):
        dr.text((px(k) - 10, h - mb + 5), f"{int(k)}", fill="black")
    dr.line([(px(a), py(b)) for a, b in zip(x, y)], fill=(200, 30, 30), width=2)
    dr.text((ml, 8), f"{title} (log scale) vs step", fill="black")
    im.save(path)


class MetricsLog:
    """Averages metrics over `every` steps and appends a row to metrics.csv."""

    def __init__(self, path, every):
        self.path, self.every, self.acc, self.n, self.rows = Path(path), every, {}, 0, []

    def add(self, step, lr, metrics):
        for k, v in metrics.items():
            self.acc[k] = self.acc.get(k, 0.0) + float(v)
        self.n += 1
        if self.n == self.every:
            row = {"step": step + 1, "lr": lr, **{k: v / self.n for k, v in self.acc.items()}}
            self.rows.append(row)
            self.acc, self.n = {}, 0
            new = not self.path.exists()
            with open(self.path, "a", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    wr.writeheader()
                wr.writerow(row)


# -----------------------------------------------------------------------------------------------------------
# the loop
# -----------------------------------------------------------------------------------------------------------

def train(args, model, dataset, run_dir, device):
    from tqdm import tqdm
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    log = MetricsLog(run_dir / "metrics.csv", args.log_every)
    amp = device.type == "cuda"  # bf16 autocast on GPU; fp32 on CPU
    model.train()
    it = batches(dataset, args.batch, args.seed, args.loader_workers)
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        lr = lr_at(step, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(it).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, metrics = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        log.add(step, lr, {"loss": loss.item(), "grad_norm": gnorm.item(), **metrics})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            vla.save_checkpoint(run_dir, model, dataset.stats_by_key, extra={"step": step + 1})
    vla.save_checkpoint(run_dir, model, dataset.stats_by_key, extra={"step": args.steps})
    if log.rows:
        plot_loss_curve([r["step"] for r in log.rows], [r["loss"] for r in log.rows], run_dir / "loss_curve.png")
    return log.rows


def main(argv=None):
    args = parse_args(argv)
    print("train.py configuration (every flag, `python train.py -h` for help):")
    for k, v in vars(args).items():
        print(f"  --{k.replace('_', '-'):16s} {','.join(v) if isinstance(v, list) else v}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, min(8, (os.cpu_count() or 2) - 1)))
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    (run_dir / "train_args.json").write_text(json.dumps(vars(args), indent=1))
    t0 = time.time()
    dataset = build_dataset(args)
    t_data = time.time() - t0
    print(f"dataset: {len(dataset.episodes)} episodes, {len(dataset)} windows (H={args.window}, L={args.chunk}), "
          f"{t_data:.0f} s")
    model = build_model(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({sum(p.numel() for p in model.trainable_parameters()) / 1e6:.2f}M "
          f"trainable) on {device}")
    t1 = time.time()
    train(args, model, dataset, run_dir, device)
    t_train = time.time() - t1
    print(f"training: {args.steps} steps in {t_train:.0f} s; checkpoint in {run_dir}")
    t_eval = 0.0
    if args.eval_episodes > 0:
        t2 = time.time()
        _, text = evaluate.run_metaworld_eval(run_dir, args.eval_episodes, args.eval_seed, args.execution,
                                              args.tasks, out=run_dir, device=str(device),
                                              workers=args.workers or None)
        t_eval = time.time() - t2
        print(text)
    summary = (f"total wall time {time.time() - t0:.0f} s: demos {t_data:.0f} s, training {t_train:.0f} s "
               f"({args.steps} steps), evaluation {t_eval:.0f} s")
    print(summary)
    if args.eval_episodes > 0:  # results.md: the table, then how it was made
        flags = " ".join(f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}"
                         for k, v in vars(args).items())
        with open(run_dir / "results.md", "a") as f:
            f.write(f"\n{summary} on {device} ({n_params / 1e6:.2f}M parameters).\n\n"
                    f"`python train.py {flags}`\n")


if __name__ == "__main__":
    main()
