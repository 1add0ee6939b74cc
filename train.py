"""Train a VLA, then evaluate it in closed loop. `python train.py` with no flags is the built-in default:

  1. generate (or reuse from data_cache/) Meta-World scripted-expert demonstrations for the default tasks,
  2. train the paper's best formulation (policy head over a history of H frames, continuous actions, chunks of
     L actions, §III-C / Fig. 6) on the `tiny` decoder-only backbone,
  3. evaluate it in closed loop on evaluation seeds never used for demonstrations and print a success table
     (scripted expert = ceiling, random actions = floor).

Every choice is a flag (printed at start); the model flags left unset take the values of vla.VLAConfig.metaworld(),
the preset of this default job (head sizes: --head-size's preset). The run directory gets model.safetensors, config.json,
action_stats.json (vla.save_checkpoint), train_args.json, metrics.csv, loss_curve.png, results.md, GIFs.
Re-run the evaluation alone with `python evaluate.py --ckpt RUN_DIR --benchmark metaworld`.

Scale-out and faults (tests/test_scale.py):
  torchrun --nproc_per_node=N train.py ...   DDP (nccl on GPU, gloo on CPU); --fsdp shards the model (FSDP2,
      bf16 compute) for 1B+ backbones; --grad-accum K; --act-ckpt. --batch is always the global batch, so a
      step sees the same samples whatever N and K are.
  RUN_DIR/checkpoints/step_<n>/ every --ckpt-every steps (atomic; the newest --keep-ckpts kept): weights,
      config, action statistics of every dataset, optimizer, scheduler, step, RNG of every rank, manifest.
  python train.py --resume RUN_DIR   continues bit-exactly from the newest undamaged checkpoint (a damaged
      one is skipped with a warning). A NaN/inf loss stops the run, naming the step and the last checkpoint.
  Ctrl-C / SIGTERM: the step finishes, a checkpoint is written, the run exits 130 / 143 naming the resume
      command. A full disk during a checkpoint removes the partial directory and says so. A new run refuses an
      --out that holds another run; every numeric flag is range-checked (FLAG_RANGES) before any work.
  Recipes (§II-E): --data A.h5 (finetune), --data A.h5 B.h5 --data-weights 3 1 (co-train),
      --init-from CO_TRAINED_RUN --data A.h5 (post-train).
  Hidden test hooks: --debug-nan-at-step N (the N-th step's loss becomes NaN), --debug-kill-at-step N
      (SIGKILL once N steps are done).

Stands on vla, data and evaluate (the floors below; this file is the top one).
"""

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import vla


# -----------------------------------------------------------------------------------------------------------
# flags
# -----------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h prints every default; a flag whose default is None says in its help where its value comes from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    c = vla.VLAConfig.metaworld()  # the defaults of the model flags: one home, the preset
    a = p.add_argument_group("model (vla.VLAConfig; defaults: its metaworld preset, the paper's best formulation)")
    a.add_argument("--formulation", default=c.formulation, choices=vla.FORMULATIONS, help="§III-C")
    a.add_argument("--backbone", default=c.backbone, help="tiny | tiny-<family> | a pretrained model folder")
    a.add_argument("--head", default=c.head, choices=vla.HEADS, help="policy-head trunk")
    a.add_argument("--head-size", default="auto", choices=["auto", "tiny", "paper"], help="preset of the head sizes "
                   "left unset below: tiny = VLAConfig.tiny (LSTM 2x128, CPU), paper = VLAConfig.paper (LSTM 4x1024, "
                   "MLP 1024-512-256, GPT 8 layers); auto = paper for a pretrained backbone folder, tiny otherwise")
    tiny, paper = vla.VLAConfig.tiny(), vla.VLAConfig.paper("")
    a.add_argument("--head-width", type=int, default=None, help=f"LSTM hidden / GPT width / MLP-trunk width "
                   f"(default: --head-size's, tiny {tiny.head_width}, paper {paper.head_width})")
    a.add_argument("--head-layers", type=int, default=None, help=f"LSTM / GPT layers (default: --head-size's, tiny "
                   f"{tiny.head_layers}, paper {paper.head_layers}, paper GPT {vla.VLAConfig.paper('', head='gpt').head_layers})")
    a.add_argument("--head-heads", type=int, default=None, help=f"GPT attention heads (default: --head-size's, tiny "
                   f"{tiny.head_heads}, paper {paper.head_heads})")
    a.add_argument("--head-mlp", default=None, metavar="N,N,...", help=f"hidden sizes of the output MLP, "
                   f"comma-separated (default: --head-size's, tiny {','.join(map(str, tiny.head_mlp))}, paper "
                   f"{','.join(map(str, paper.head_mlp))})")
    a.add_argument("--window", type=int, default=c.window, help="H, history frames")
    a.add_argument("--chunk", type=int, default=c.chunk, help="L, actions predicted per frame")
    a.add_argument("--action-loss", default=c.action_loss, choices=vla.ACTION_LOSSES,
                   help="eq. (7) with Huber (official) or MSE (paper text) on the pose, or flow matching")
    a.add_argument("--gripper-loss-weight", "--lam", type=float, default=c.lam,
                   help="lambda of eq. (7): weight of the gripper BCE (official arm_gripper_loss_ratio)")
    a.add_argument("--flow-steps", type=int, default=c.flow_steps, help="Euler steps of flow-matching inference")
    a.add_argument("--n-bins", type=int, default=c.n_bins, help="action bins of one_step_discrete (§III-B-1)")
    a.add_argument("--action-norm", default=c.action_norm, choices=data.ACTION_NORMS,
                   help=f"how the datasets normalize actions: quantile = eq. (5)-(6) on their q01/q99; bounds = "
                        f"clip to +-{data.OFFICIAL_BOUND} and divide (the official code)")
    a.add_argument("--moe", action="store_true", default=c.moe,
                   help="pi0-style mixture-of-experts action expert (Table IIb; one_step_continuous only)")
    a.add_argument("--expert-width", type=int, default=c.expert_width, help="width of the --moe expert (0 = the "
                   "VLM's width)")
    a.add_argument("--attention", default=c.attention, choices=vla.ATTENTIONS,
                   help="LM mask: auto = the backbone's own (PaliGemma: prefix-LM, bidirectional over images + "
                        "prompt; others causal)")
    a.add_argument("--train-vision", action=argparse.BooleanOptionalAction, default=c.train_vision,
                   help="train the vision tower (--no-train-vision freezes it, the paper's frozen-backbone ablation)")
    a.add_argument("--train-language", action=argparse.BooleanOptionalAction, default=c.train_language,
                   help="train the language model's layers")
    a.add_argument("--train-embeddings", action=argparse.BooleanOptionalAction, default=c.train_embeddings,
                   help="train the token embeddings")
    a.add_argument("--resampler", type=int, default=None, metavar="N", help="add a perceiver resampler to N latents "
                   "on the image path of a pretrained-family backbone (backbone_kwargs resampler; RoboVLMs: 64)")
    a.add_argument("--shift-aug", action=argparse.BooleanOptionalAction, default=c.shift_aug,
                   help="random-shift image augmentation (official; off in the Meta-World preset, where the camera "
                        "is fixed: docs/main_job.md)")
    a.add_argument("--views", default=",".join(c.views), help="cameras, comma-separated")
    a.add_argument("--image-size", type=int, default=c.image_size, help="rendered (and model input) image size")
    d = p.add_argument_group("data (Meta-World scripted-expert demonstrations)")
    d.add_argument("--tasks", default=",".join(evaluate.DEFAULT_TASKS), help="comma-separated Meta-World tasks")
    d.add_argument("--demos-per-task", type=int, default=30)
    d.add_argument("--cache-dir", default="data_cache")
    d.add_argument("--demo-noise", type=float, default=0.3, help="std of noise on the expert's executed xyz "
                   "actions (labels stay clean, DART); 0 = plain expert rollouts")
    d.add_argument("--workers", type=int, default=0, help="processes for demos and evaluation (0 = all cores)")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=2500, help="training steps (the main job's budget: docs/main_job.md)")
    o.add_argument("--batch", type=int, default=16)
    o.add_argument("--lr", type=float, default=3e-4)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then --schedule")
    o.add_argument("--schedule", default="cosine", choices=["constant", "cosine"], help="LR after the warmup: "
                   "constant (the paper's), or cosine decay to 0 at --steps (converges in fewer steps)")
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto | cpu | cuda")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the cores of this process "
                   "left after its DataLoader workers, at most 8)")
    o.add_argument("--loader-workers", type=int, default=-1, help="DataLoader worker processes (-1 = 1 when a "
                   "process has more than 2 cores, else 0: on 2 cores both computing beats one loading; "
                   "docs/history.md)")
    o.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    o.add_argument("--log-every", type=int, default=25)
    o.add_argument("--out", default="runs/default")
    e = p.add_argument_group("evaluation")
    e.add_argument("--execution", default="ensemble", choices=vla.EXECUTIONS,
                   help="chunk: the L actions open loop; first: re-plan every step; ensemble: ACT temporal "
                   "ensembling (re-plans every step; the best of the three here, docs/history.md)")
    e.add_argument("--eval-episodes", type=int, default=10, help="episodes per task (0 = skip evaluation)")
    e.add_argument("--eval-seed", type=int, default=0)
    e.add_argument("--max-steps", type=int, default=200, help="evaluation episode step limit")
    s = p.add_argument_group("scale-out, fault tolerance, data recipes (§II-E)")
    s.add_argument("--data", nargs="+", default=None, metavar="PATH", help="train on these HDF5 files (data."
                   "EpisodeWriter; a CALVIN split directory, a LeRobotDataset folder or an RLDS/TFDS folder also "
                   "work: docs/data_formats.md) instead of Meta-World demos; one = finetune, several = co-train on "
                   "their weighted mixture")
    s.add_argument("--cameras", nargs="+", default=None, metavar="MAP", help="LeRobot/RLDS camera keys, one "
                   "per --data path: auto (picked by name) or VIEW=KEY,... e.g. static=observation.images.top")
    s.add_argument("--cache-frames", action="store_true", help="LeRobot/RLDS: decode every frame once into a "
                   "resized uint8 memmap under --cache-dir (N x views x 3 x S x S bytes); samples then skip decoding")
    s.add_argument("--data-weights", nargs="+", type=float, default=None, metavar="W",
                   help="co-training mixture weights, one per --data path (default: equal)")
    s.add_argument("--init-from", default=None, metavar="RUN_DIR", help="post-train: start from this "
                   "checkpoint's weights (e.g. a co-trained run), then finetune on --data")
    s.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run exactly from its newest "
                   "undamaged checkpoint, with its saved flags (flags given here override them)")
    s.add_argument("--keep-ckpts", type=int, default=3, help="keep the newest k checkpoints in RUN_DIR/checkpoints")
    s.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; --batch is the global batch "
                   "(all processes and micro-batches together)")
    s.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (bf16 compute), under torchrun")
    s.add_argument("--act-ckpt", action="store_true", help="activation checkpointing of the transformer blocks")
    s.add_argument("--debug-nan-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # tests: NaN loss at step
    s.add_argument("--debug-kill-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # tests: SIGKILL at step
    args = p.parse_args(argv)
    if args.resume:  # the run's own flags, overridden by those given explicitly now
        saved = Path(args.resume) / "train_args.json"
        if not saved.is_file():
            raise SystemExit(f"--resume {args.resume}: no train_args.json there; is it a run directory of train.py?")
        for a in p._actions:
            a.default = argparse.SUPPRESS
        given = vars(p.parse_args(argv))
        old = {"attention": "causal", "schedule": "constant",  # runs from before --attention / --schedule
               **json.loads(saved.read_text())}
        args = argparse.Namespace(**{**vars(args), **old, **given})
        args.out = args.resume
        args.debug_nan_at_step, args.debug_kill_at_step = (given.get(k, -1) for k in ("debug_nan_at_step",
                                                                                      "debug_kill_at_step"))
        args.tasks, args.views = (v if isinstance(v, str) else ",".join(v) for v in (args.tasks, args.views))
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.views = [v for v in args.views.split(",") if v]
    fill_head_sizes(p, args)
    check_flags(p, args)
    if args.resampler and args.backbone in ("tiny", "tiny-flamingo"):
        p.error(f"--resampler adds a perceiver resampler to a pretrained-family backbone (a model folder or "
                f"tiny-<family>, e.g. tiny-llava); --backbone {args.backbone} has no such image path: drop --resampler")
    return args


HEAD_SIZES = ("head_width", "head_layers", "head_heads", "head_mlp")


def fill_head_sizes(p, args):
    """Head sizes left unset -> those of the --head-size preset (a run's train_args.json from before these flags
    has none: the preset then gives the sizes it trained with). --head-mlp "1024,512,256" -> [1024, 512, 256]."""
    paper = head_preset(args.head_size, args.backbone) == "paper"
    preset = vla.VLAConfig.paper("", head=args.head) if paper else vla.VLAConfig.tiny()  # paper GPT: 8 layers
    for k in HEAD_SIZES:
        if getattr(args, k, None) is None:
            setattr(args, k, list(getattr(preset, k)) if k == "head_mlp" else getattr(preset, k))
    if isinstance(args.head_mlp, str):
        try:
            args.head_mlp = [int(x) for x in args.head_mlp.split(",") if x.strip()]
        except ValueError:
            p.error(f"--head-mlp must be comma-separated positive integers, e.g. 1024,512,256; got {args.head_mlp!r}")
    if not args.head_mlp or min(args.head_mlp) < 1:
        p.error(f"--head-mlp must be comma-separated positive integers, e.g. 1024,512,256; got {args.head_mlp}")


# The allowed range of every numeric flag ("lo..hi" inclusive), checked before any work (check_flags): a value
# outside it would train nothing or fail only after the data was built.
FLAG_RANGES = {
    "window": ">= 1", "chunk": ">= 1", "image_size": ">= 1", "demos_per_task": ">= 1", "demo_noise": ">= 0",
    "workers": ">= 0", "steps": ">= 1", "batch": ">= 1", "lr": ">= 0", "weight_decay": ">= 0", "warmup": ">= 0",
    "clip": "> 0", "seed": "0..4294967295",  # numpy seeds are 32-bit
    "threads": ">= 0", "loader_workers": ">= -1", "ckpt_every": ">= 1", "log_every": ">= 1",
    "eval_episodes": "0..1000", "eval_seed": "0..999",  # evaluate.eval_seeds: 1000 seeds per evaluation seed
    "max_steps": ">= 1", "data_weights": "> 0", "keep_ckpts": ">= 0", "grad_accum": ">= 1",
    "head_width": ">= 1", "head_layers": ">= 1", "head_heads": ">= 1", "gripper_loss_weight": ">= 0",
    "flow_steps": ">= 1", "n_bins": ">= 2", "expert_width": ">= 0", "resampler": ">= 1",
}


def in_range(v, rule):
    """Is the number v finite and within `rule` (">= a", "> a" or "a..b")?"""
    if not math.isfinite(v):
        return False
    if ".." in rule:
        lo, hi = map(float, rule.split(".."))
        return lo <= v <= hi
    op, bound = rule.split()
    return v >= float(bound) if op == ">=" else v > float(bound)


def check_flags(p, args):
    """argparse error (exit 2) naming the flag, its allowed range and the value given, for any numeric flag
    outside FLAG_RANGES; also --batch must split evenly over --grad-accum and the torchrun processes."""
    numeric = [a.dest for a in p._actions if a.type in (int, float) and a.help != argparse.SUPPRESS]
    unchecked = [d for d in numeric if d not in FLAG_RANGES]
    assert not unchecked, f"add the allowed range of {unchecked} to train.FLAG_RANGES"
    for dest in numeric:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if not in_range(v, FLAG_RANGES[dest]):
                rule = FLAG_RANGES[dest]
                p.error(f"--{dest.replace('_', '-')} must be {'in ' + rule if '..' in rule else rule}, got {v}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch % (args.grad_accum * world):
        p.error(f"--batch {args.batch} (the global batch) must be a multiple of --grad-accum {args.grad_accum}"
                + (f" x {world} torchrun processes" if world > 1 else ""))


# -----------------------------------------------------------------------------------------------------------
# pieces: data, model, optimizer, schedule
# -----------------------------------------------------------------------------------------------------------

def build_dataset(args):
    if args.data:  # finetune (one dataset) or co-train (a weighted mixture, §II-E)
        return build_data_mixture(args)
    paths = evaluate.generate_demos(args.tasks, args.demos_per_task, args.image_size, args.seed % 100,
                                    args.cache_dir, workers=args.workers or None,  # renders both cameras
                                    noise=args.demo_noise)
    return data.HDF5Dataset(paths, args.window, args.chunk, views=tuple(args.views), image_size=args.image_size,
                            key="metaworld", norm_mode=args.action_norm)


def build_data_mixture(args):
    """--data paths (HDF5 files or CALVIN split directories), one dataset each, keyed by file; several are
    mixed with --data-weights. Every dataset keeps its own action statistics (they all go in the checkpoint)."""
    w = args.data_weights or [1.0] * len(args.data)
    if len(w) != len(args.data):
        raise SystemExit(f"--data-weights has {len(w)} values for {len(args.data)} --data paths: give one each")
    kw = dict(window=args.window, chunk=args.chunk, views=tuple(args.views), image_size=args.image_size,
              norm_mode=args.action_norm)
    cams = getattr(args, "cameras", None) or ["auto"] * len(args.data)
    if len(cams) != len(args.data):
        raise SystemExit(f"--cameras has {len(cams)} values for {len(args.data)} --data paths: give one each (auto)")
    sets = []
    for path, cam in zip(args.data, cams):
        if data.detect_format(path) in ("lerobot", "rlds"):  # docs/data_formats.md
            sets.append(data.open_dataset(path, cameras=data.parse_cameras(cam), **kw,
                                          cache_dir=args.cache_dir if getattr(args, "cache_frames", False) else None))
            print(f"--data {path}: {type(sets[-1]).__name__} {sets[-1].key!r}, cameras {sets[-1].cameras}, "
                  f"{sets[-1].control_hz} Hz")
        elif os.path.isdir(path):
            root, split = os.path.split(os.path.normpath(path))
            sets.append(data.CalvinDataset(root, split, **kw))
        else:
            sets.append(data.HDF5Dataset(path, **kw))
    keys = [d.key for d in sets]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"--data: datasets need distinct keys (the file attr dataset_key, else the file name), "
                         f"got {keys}")
    return sets[0] if len(sets) == 1 else data.MixtureDataset(list(zip(sets, w)), seed=args.seed)


def describe_dataset(dataset):
    """'12 episodes' (HDF5), '9 annotated segments' (CALVIN: windows come from language-annotated segments,
    not whole recordings), or 'mixture of 2 datasets (key: ..., key: ...)'."""
    if isinstance(dataset, data.MixtureDataset):
        return f"mixture of {len(dataset.datasets)} datasets (" + ", ".join(
            f"{d.key}: {describe_dataset(d)}" for d in dataset.datasets) + ")"
    unit = "annotated segments" if isinstance(dataset, data.CalvinDataset) else "episodes"
    return f"{len(dataset.seg_start)} {unit}"


def head_preset(flag, backbone):
    """--head-size auto -> "paper" for a pretrained backbone folder, "tiny" for the CPU backbones."""
    if flag != "auto":
        return flag
    return "paper" if os.path.isdir(os.path.expanduser(backbone)) else "tiny"


def model_config(args):
    """VLAConfig from the flags (every model flag has the metaworld preset's value unless given; the head sizes
    come from --head-size's preset, see fill_head_sizes)."""
    return vla.VLAConfig(
        formulation=args.formulation, backbone=args.backbone, head=args.head, window=args.window, chunk=args.chunk,
        action_loss=args.action_loss, lam=args.gripper_loss_weight, moe=args.moe, views=tuple(args.views),
        image_size=args.image_size, train_vision=args.train_vision, train_language=args.train_language,
        train_embeddings=args.train_embeddings, head_width=args.head_width, head_layers=args.head_layers,
        head_heads=args.head_heads, head_mlp=tuple(args.head_mlp), expert_width=args.expert_width,
        flow_steps=args.flow_steps, n_bins=args.n_bins, shift_aug=args.shift_aug, action_norm=args.action_norm,
        attention=args.attention,
        backbone_kwargs={"resampler": args.resampler} if args.resampler else {})


def build_model(args):
    return vla.VLA(model_config(args))


def lr_at(step, base_lr, warmup, schedule="constant", total=None):
    """Linear warmup from 0 to base_lr over `warmup` steps, then constant (the paper's schedule) or, with
    schedule="cosine", half a cosine from base_lr down to 0 at step `total` (SGDR, Loshchilov & Hutter 2017)."""
    if step < warmup or schedule == "constant":
        return base_lr * min(1.0, (step + 1) / max(1, warmup))
    if schedule != "cosine" or not total:
        raise ValueError(f"schedule must be 'constant' or 'cosine' (with total steps), got {schedule!r}, "
                         f"total={total!r}")
    frac = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 after the warmup -> 1 at the last step
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))


# -----------------------------------------------------------------------------------------------------------
# scale-out: torchrun (DDP / FSDP), the global-batch sampler, activation checkpointing
# -----------------------------------------------------------------------------------------------------------

def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def rank_batches(n, global_batch, accum, rank, world, seed, epoch):
    """This rank's micro-batches (lists of dataset indices) for one epoch.

    Step b of the epoch takes global batch b of a permutation seeded by (seed, epoch); it is cut into
    world * accum micro-batches and micro-batch j * world + rank goes to this rank's accumulation step j. So
    what a step sees does not depend on how many processes share it, and the data position is just the step.
    """
    micro = global_batch // (accum * world)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    out = []
    for b in range(n // global_batch):
        g = perm[b * global_batch:(b + 1) * global_batch]
        for j in range(accum):
            k = j * world + rank
            out.append(g[k * micro:(k + 1) * micro])
    return out


def loader_workers(flag, world):
    """--loader-workers -1 (auto): one worker when this process has more than 2 cores, else load in-process."""
    return flag if flag >= 0 else int((os.cpu_count() or 2) // world > 2)


def micro_batches(dataset, global_batch, accum, rank, world, seed, start_step=0, workers=0):
    """Endless micro-batches for this rank, starting at global step `start_step` (exact resume)."""
    if global_batch % (accum * world) or len(dataset) < global_batch:
        raise ValueError(f"--batch {global_batch} (the global batch) must be a multiple of --grad-accum {accum} x "
                         f"{world} processes and at most the {len(dataset)} windows of the dataset")
    per_epoch = len(dataset) // global_batch
    epoch, b0 = divmod(start_step, per_epoch)
    while True:
        if hasattr(dataset, "resample"):  # MixtureDataset: a fresh weighted draw every epoch, seeded
            dataset.resample(seed + epoch)
        idx = rank_batches(len(dataset), global_batch, accum, rank, world, seed, epoch)[b0 * accum:]
        # own generator: creating the loader must not consume the global RNG (exact resume)
        yield from torch.utils.data.DataLoader(dataset, batch_sampler=idx, num_workers=workers,
                                               generator=torch.Generator().manual_seed(seed + epoch),
                                               worker_init_fn=ignore_stop_signals if workers else None)
        epoch, b0 = epoch + 1, 0


def block_types():
    """The repeated transformer blocks: the units of FSDP sharding and of activation checkpointing."""
    import backbones
    import heads
    return (backbones.Block, backbones.FamilyBlock, backbones.GatedCrossAttention, heads.GPTBlock,
            heads.ExpertLayer)


def apply_activation_checkpointing(model):
    """Recompute each block's activations in backward instead of storing them (less memory, ~1/3 more
    compute). Returns the number of wrapped blocks."""
    import functools
    from torch.utils.checkpoint import checkpoint
    blocks = [m for m in model.modules() if isinstance(m, block_types())]
    for m in blocks:
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    return len(blocks)


def wrap_model(model, world, device, fsdp=False):
    """-> the module to call in the loop: the model itself (1 process), DDP, or FSDP (sharded parameters,
    gradients and optimizer state; bf16 compute, fp32 reductions and master weights). FSDP2's
    `fully_shard` (torch >= 2.6) shards each block then the rest; older torch gets FSDP1 with the same units."""
    if fsdp:
        if world == 1 and not torch.distributed.is_initialized():
            raise ValueError("--fsdp needs torchrun (e.g. torchrun --nproc_per_node=2 train.py --fsdp ...)")
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
        except ImportError:
            try:
                from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # 2.4, 2.5
            except ImportError:
                fully_shard = None
        if fully_shard is not None:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for m in [m for m in model.modules() if isinstance(m, block_types())]:
                fully_shard(m, mp_policy=mp)
            return fully_shard(model, mp_policy=mp)
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(set(block_types())),
                                        mixed_precision=MixedPrecision(torch.bfloat16, torch.float32, torch.float32),
                                        use_orig_params=True, device_id=device if device.type == "cuda" else None)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # find_unused_parameters: parts of the VLM that a formulation does not use (e.g. the LM head for
        # continuous actions) get no gradient
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    return model


@contextlib.contextmanager
def no_grad_sync(net, sync):
    """One micro-batch of gradient accumulation: skip the gradient all-reduce unless `sync` (the last one)."""
    if sync or not hasattr(net, "no_sync") and not hasattr(net, "set_requires_gradient_sync"):
        yield
    elif hasattr(net, "no_sync"):  # DDP, FSDP1
        with net.no_sync():
            yield
    else:  # FSDP2
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)


# -----------------------------------------------------------------------------------------------------------
# fault tolerance: atomic checkpoints with the whole training state, verified on resume
# -----------------------------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN/inf: the run stops before the optimizer steps."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left); its partial directory was removed."""


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: the loop finished its step, wrote a checkpoint and stopped."""

    def __init__(self, signum, step, ckpt):  # signum None: the signal reached another rank only
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum = signum or signal.SIGTERM
        self.signame = signal.Signals(signum).name if signum else "a signal to another rank"
        self.step, self.ckpt = step, ckpt


@contextlib.contextmanager
def stop_signals(announce=True):
    """While training, the first SIGINT (Ctrl-C) or SIGTERM (a cluster scheduler's notice) only records itself
    in the yielded list: the loop then finishes its step, checkpoints and stops, so a resume loses nothing. A
    second Ctrl-C stops at once (KeyboardInterrupt). Handlers can only be set in the main thread."""
    import threading
    got = []

    def handler(signum, frame):
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not got and announce:  # os.write: print() could re-enter a print the signal interrupted
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                        f"(Ctrl-C again to quit at once)\n".encode())
        got.append(signum)
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn: Ctrl-C and a scheduler's SIGTERM reach the whole process group; a worker killed
    by them would fail the main process's next batch, so workers leave the stop to the main process (which shuts
    them down when its loader goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def any_rank(flag, world):
    """True on every rank if `flag` is true on any rank (a collective under torchrun: every rank calls it)."""
    if world == 1:
        return bool(flag)
    dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
    t = torch.tensor([float(bool(flag))], device=dev)
    torch.distributed.all_reduce(t)
    return t.item() > 0


def rng_state():
    """Every RNG the run draws from, as tensors and plain Python values, so torch.load(weights_only=True) reads it
    back (numpy's key array becomes a tensor: a pickled ndarray would need the unsafe full unpickler)."""
    import random
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss),
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    import random
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def full_state(net, model, opt, fsdp):
    """-> (model state dict, optimizer state dict), unsharded. Under FSDP a collective (every rank calls it);
    the full tensors land on rank 0's CPU."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_train_state(run_dir, step, net, model, opt, sched, stats, args, rank=0, world=1, fsdp=False, keep=3):
    """Checkpoint run_dir/checkpoints/step_<step>/, atomically: everything is written into a temporary
    directory which is renamed into place (a crash leaves the previous checkpoints untouched). Contents:
    the vla.save_checkpoint files (weights, config, action statistics of every dataset, tokenizer),
    train_state.pt (optimizer, scheduler, step, data position, flags), rng_rank<r>.pt per process, and
    manifest.json (size + sha256 of each file, written last) by which a resume detects a damaged checkpoint.
    The run directory's top level gets the same weights (what evaluate.py and Policy.from_pretrained read).
    Keeps the newest `keep` checkpoints. Every rank must call it.
    A write that fails on any rank (a full disk above all) stops every rank at the next barrier with
    CheckpointWriteError, after rank 0 removed the partial directory; the previous checkpoints stay as they were."""
    ck = Path(run_dir) / "checkpoints"
    final, tmp = ck / f"step_{step:08d}", ck / f".tmp_step_{step:08d}"
    model_sd, optim_sd = full_state(net, model, opt, fsdp)
    if rank == 0 and fsdp:  # the sharded module cannot be saved as is: the gathered weights into a plain CPU copy
        if not hasattr(save_train_state, "shadow"):
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                save_train_state.shadow = vla.VLA(model.config)
        model = save_train_state.shadow
        model.load_state_dict(model_sd)
    extra, failed = {"step": step}, []  # failed: this rank's write error
    need = sum(t.numel() * t.element_size() for t in _tensors([model_sd, optim_sd]))  # ~ the checkpoint's bytes

    def written():  # the barrier between the phases: every rank learns whether any rank's writes failed
        if any_rank(failed, world):
            raise checkpoint_write_error(failed[0] if failed else None, ck, step, tmp, rank, need)
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except Exception as e:
        failed.append(e)
    written()
    try:
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            vla.save_checkpoint(tmp, model, stats, extra=extra, manifest=False)  # the manifest below covers all
            torch.save({"step": step, "optimizer": optim_sd, "scheduler": sched.state_dict(), "world_size": world,
                        "data_position": {"global_batch": args.batch, "samples_seen": step * args.batch},
                        "args": vars(args)}, tmp / "train_state.pt")
    except Exception as e:  # a full disk: OSError, RuntimeError (torch.save), SafetensorError (safetensors)
        failed.append(e)
    written()
    try:
        if rank == 0:
            vla.write_manifest(tmp, [f.relative_to(tmp) for f in tmp.rglob("*") if f.is_file()])  # incl. backbone/
            shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of this step left by an earlier attempt
            os.replace(tmp, final)  # the atomic step: readers see no checkpoint or a complete one
            for old in sorted(ck.glob("step_*"))[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            vla.save_checkpoint(run_dir, model, stats, extra=extra)
    except Exception as e:
        failed.append(e)
    written()
    return final


def _tensors(obj):
    """Every tensor inside nested dicts / lists / tuples (a state dict, an optimizer state dict)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def checkpoint_write_error(err, ck, step, tmp, rank, need):
    """-> CheckpointWriteError for a failed checkpoint write (rank 0 first removes the partial directory). It
    says "no space left" when the disk is full: ENOSPC, or torch.save's bare "[enforce fail at
    inline_container.cc] ... file write failed" with less free space than the checkpoint needs."""
    import errno
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint would keep filling the disk
    good = sorted(ck.glob("step_*"))
    last = good[-1] if good else "none (no checkpoint was written yet)"
    if err is None:
        return CheckpointWriteError(f"checkpoint step {step} failed on another rank (see its error); the last good "
                                    f"checkpoint is {last}")
    try:
        free = shutil.disk_usage(ck if ck.is_dir() else ck.parent).free
    except OSError:
        free = None
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(err) \
        or (free is not None and free < need)
    what = str(err).splitlines()[0][:300]
    space = f"{free / 2**20:.0f} MiB free there, a checkpoint needs about {need / 2**20:.0f} MiB. " \
        if free is not None else ""
    head = (f"no space left on the device of {ck} while writing checkpoint step {step} ({what}); {space}"
            if full else f"writing checkpoint step {step} into {ck} failed ({what}); ")
    return CheckpointWriteError(f"{head}Removed the partial {tmp.name}; the last good checkpoint is {last}. "
                                f"{'Free some space' if full else 'Fix the cause'}, then continue with: "
                                f"python train.py --resume {ck.parent}")


def verify_checkpoint(d):
    """-> None if checkpoint directory d is complete and undamaged, else what is wrong (str)."""
    try:
        manifest = json.loads((Path(d) / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest.json ({e})"
    for name, m in manifest.items():
        f = Path(d) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != m["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {m['bytes']} (truncated?)"
        if vla.file_sha256(f) != m["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_checkpoint(run_dir):
    """The newest undamaged run_dir/checkpoints/step_*; damaged ones are skipped with a warning. None if none."""
    dirs = sorted((Path(run_dir) / "checkpoints").glob("step_*"), reverse=True)
    for i, d in enumerate(dirs):
        problem = verify_checkpoint(d)
        if problem is None:
            return d
        warnings.warn(f"checkpoint {d} is damaged: {problem}; falling back to "
                      f"{dirs[i + 1] if i + 1 < len(dirs) else 'a fresh start (no older checkpoint)'}")
    return None


def load_train_state(ckpt_dir, net, model, opt, sched, rank=0, fsdp=False):
    """Restore weights, optimizer, scheduler and this rank's RNG from a checkpoint directory; -> step."""
    from safetensors.torch import load_file
    ckpt_dir = Path(ckpt_dir)
    state = torch.load(ckpt_dir / "train_state.pt", map_location="cpu", weights_only=True)
    model_sd = load_file(ckpt_dir / "model.safetensors")
    try:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            full = {k: model.state_dict()[k] for k in model.state_dict()}  # includes tied duplicates
            set_state_dict(net, opt, model_state_dict={k: model_sd.get(k, v) for k, v in full.items()},
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            vla.load_weights(model, ckpt_dir / "model.safetensors")
            opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot resume from {ckpt_dir}: its weights/optimizer do not fit the model built "
                           f"from the flags ({str(e)[:300]}); resume with the run's own flags "
                           f"(train_args.json)") from None
    sched.load_state_dict(state["scheduler"])
    rng_file = ckpt_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        warnings.warn(f"{ckpt_dir} has no RNG state for rank {rank} (saved with {state['world_size']} "
                      f"processes): training continues, but not bit-identically")
    return state["step"]


def check_finite(step, world, device, loss, gnorm, last_ckpt, stop=False):
    """Stop (NonFiniteLoss) if the loss or gradient norm is NaN/inf on any rank, before the optimizer steps.
    Returns (the loss averaged over the ranks (what gets logged), whether any rank was asked to stop (a signal):
    the same all-reduce makes every rank agree on the step to stop after)."""
    bad_loss = torch.tensor([float(not (math.isfinite(loss) and math.isfinite(gnorm))), loss, float(stop)],
                            device=device, dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(bad_loss)
    bad, loss, stop = bad_loss[0].item(), bad_loss[1].item() / world, bad_loss[2].item() > 0
    if bad > 0:
        raise NonFiniteLoss(f"non-finite loss or gradient at step {step + 1} (loss {loss}, grad norm {gnorm}): "
                            f"stopped before the optimizer step. The last good checkpoint is "
                            f"{last_ckpt or 'none (no checkpoint was written yet)'}; resume from it with "
                            f"--resume RUN_DIR, e.g. with a lower --lr or a smaller --clip")
    return loss, stop



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

def train(args, model, dataset, run_dir, device, rank=0, world=1, stats=None, signals=()):
    """The loop. Each step: --grad-accum micro-batches per process (gradients all-reduced once, on the last),
    clip, AdamW, LR schedule; checkpoint every --ckpt-every steps and at the end (save_train_state).
    signals: the list stop_signals() fills; once it is non-empty on any rank, every rank finishes the step,
    checkpoints and raises StopRequested."""
    from tqdm import tqdm
    stats = stats or dataset.stats_by_key
    if args.act_ckpt:
        apply_activation_checkpointing(model)
    net = wrap_model(model, world, device, args.fsdp)
    params = [p for p in net.parameters() if p.requires_grad]  # = model.trainable_parameters() (sharded: FSDP)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = getattr(args, "schedule", "constant")  # runs saved before --schedule existed were constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, args.warmup, schedule, args.steps))
    start, last_ckpt = 0, None
    if args.resume:
        last_ckpt = latest_checkpoint(run_dir)
        if last_ckpt is None:
            warnings.warn(f"--resume {run_dir}: no checkpoint found, starting from step 0")
            if rank == 0:
                trim_metrics(run_dir / "metrics.csv", 0)  # the steps logged before are trained again
        else:
            start = load_train_state(last_ckpt, net, model, opt, sched, rank, args.fsdp)
            if rank == 0:
                print(f"resumed from {last_ckpt} at step {start}")
                trim_metrics(run_dir / "metrics.csv", start)
    log = MetricsLog(run_dir / "metrics.csv", args.log_every) if rank == 0 else None
    tb = tensorboard_writer(run_dir) if rank == 0 else None
    amp = device.type == "cuda" or args.fsdp  # bf16 autocast on GPU and with FSDP's bf16 parameters; else fp32
    net.train()
    it = micro_batches(dataset, args.batch, args.grad_accum, rank, world, args.seed, start,
                      loader_workers(args.loader_workers, world))
    bar = tqdm(range(start, args.steps), desc="train", unit="step", initial=start, total=args.steps,
               disable=rank != 0)
    for step in bar:
        if step == args.debug_kill_at_step:  # tests: a hard crash (SIGKILL) once N steps are done
            os.kill(os.getpid(), signal.SIGKILL)
        lr, t_step = sched.get_last_lr()[0], time.time()
        loss_sum, sums = 0.0, {}
        for j in range(args.grad_accum):
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in next(it).items()}
            with no_grad_sync(net, sync=j == args.grad_accum - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, metrics = net(batch)
                if step + 1 == args.debug_nan_at_step:  # tests: a diverging run (the N-th step's loss is NaN)
                    loss = loss * float("nan")
                (loss / args.grad_accum).backward()  # the mean over micro-batches (and, by DDP, over processes)
            loss_sum += loss.item() / args.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        loss_sum, stop = check_finite(step, world, device, loss_sum, float(gnorm), last_ckpt,  # -> mean over
                                      stop=bool(signals))  # ranks, and whether any rank got SIGINT/SIGTERM
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if log is not None:
            log.add(step, lr, {"loss": loss_sum, "grad_norm": float(gnorm), **sums,
                               "samples_per_s": args.batch / (time.time() - t_step)})  # global, with data loading
            if tb is not None and log.rows and log.rows[-1]["step"] == step + 1:
                for k, v in log.rows[-1].items():
                    tb.add_scalar(f"train/{k}", v, step + 1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stop:
            last_ckpt = save_train_state(run_dir, step + 1, net, model, opt, sched, stats, args, rank, world,
                                         args.fsdp, args.keep_ckpts)
        if stop:
            bar.close()
            raise StopRequested(signals[0] if signals else None, step + 1, last_ckpt)
    if any_rank(signals, world):  # a signal during the last step's checkpoint: training is complete; stop here
        raise StopRequested(signals[0] if signals else None, args.steps, last_ckpt)
    if tb is not None:
        tb.close()
    if log is not None and log.rows:  # the whole run's curve (a resumed run's CSV holds the earlier steps too)
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        plot_loss_curve([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], run_dir / "loss_curve.png")
    return log.rows if log is not None else []


def trim_metrics(path, step):
    """On resume: drop metrics.csv rows logged after the checkpoint (those steps are trained again)."""
    if Path(path).is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(path, "w", newline="") as f:
            if rows:
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader()
                wr.writerows(r for r in rows if int(r["step"]) <= step)


def tensorboard_writer(run_dir):
    """A TensorBoard SummaryWriter on run_dir/tb when tensorboard is installed, else None (the CSV is always
    written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(run_dir) / "tb"))


def check_out_dir(args):
    """Refuse to start a new run in a directory that already holds a run's checkpoints, weights or metrics: the
    two runs would mix (pruning deletes one's checkpoints, a later --resume picks the other's step, metrics.csv
    interleaves). A folder with only train_args.json (a run that stopped before its first step) is reused."""
    run_dir = Path(args.out)
    if args.resume or not run_dir.is_dir():
        return
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    found = ([f"checkpoints up to {ckpts[-1].name}"] if ckpts else []) + \
        [f for f in ("model.safetensors", "metrics.csv") if (run_dir / f).is_file()]
    if found:
        raise SystemExit(f"error: --out {run_dir} already holds a training run ({', '.join(found)}); a new run "
                         f"there would mix with it. Continue that run: python train.py --resume {run_dir} (add "
                         f"--steps N to train longer); or start afresh: pass a new --out, or delete the folder "
                         f"first (rm -r {run_dir})")


def needs_rendering(args):
    """Does this run render MuJoCo frames: demonstrations not yet cached, or closed-loop evaluation?"""
    if args.data:
        return False  # --data runs train on files and skip the Meta-World evaluation
    cached = all(p.exists() for p in evaluate.demo_paths(args.tasks, args.demos_per_task, args.image_size,
                                                          args.seed % 100, args.cache_dir,
                                                          noise=args.demo_noise).values())
    return args.eval_episodes > 0 or not cached


def main(argv=None):
    args = parse_args(argv)
    check_out_dir(args)  # before any work: a new run must not mix into another run's directory
    if needs_rendering(args):  # ... and not die after minutes inside a worker pool for want of OpenGL
        try:
            evaluate.check_rendering("the Meta-World demonstrations and closed-loop evaluation (a run on --data "
                                     "files with --eval-episodes 0 renders nothing)")
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
    rank, world, device = evaluate.init_distributed(args.device)  # torchrun: one process per GPU / CPU slot
    if rank != 0:  # only rank 0 talks
        sys.stdout = open(os.devnull, "w")
    print("train.py configuration (every flag, `python train.py -h` for help):")
    for k, v in vars(args).items():
        print(f"  --{k.replace('_', '-'):16s} {','.join(map(str, v)) if isinstance(v, list) else v}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cpu":
        cores = max(1, (os.cpu_count() or 2) // world)  # this process's share of the machine
        torch.set_num_threads(args.threads or max(1, min(8, cores - loader_workers(args.loader_workers, world))))
    run_dir = Path(args.out)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (run_dir / "metrics.csv").unlink(missing_ok=True)
        (run_dir / "train_args.json").write_text(json.dumps(vars(args), indent=1))
    t0 = time.time()
    if rank != 0:
        barrier(world)  # rank 0 first: it generates (and caches) the demos that the others then read
    dataset = build_dataset(args)
    if rank == 0:
        barrier(world)
    t_data = time.time() - t0
    print(f"dataset: {describe_dataset(dataset)}, {len(dataset)} windows (H={args.window}, L={args.chunk}), "
          f"{t_data:.0f} s, on {world} process(es)")
    model = build_model(args)
    model.config.camera_sizes = dataset.camera_sizes  # the cameras' native sizes: Policy.act checks live images
    stats = dataset.stats_by_key
    if args.init_from:  # post-train: the co-trained weights, and its datasets' statistics travel along
        try:  # verified against its manifest.json; config and statistics validated
            src, src_stats, _ = vla.load_checkpoint(args.init_from)
        except (vla.CheckpointError, FileNotFoundError) as e:
            raise SystemExit(f"--init-from {args.init_from}: {e}") from None
        try:
            model.load_state_dict(src.state_dict())
        except RuntimeError as e:
            raise SystemExit(f"--init-from {args.init_from}: its weights do not fit the model of these flags "
                             f"({str(e)[:300]}); use the same model flags as that run (its train_args.json)")
        stats = {**src_stats, **stats}
        print(f"post-train: initialized from {args.init_from} (datasets {sorted(src_stats)})")
        del src
    if world > 1:  # the same init everywhere (DDP also broadcasts it); then a different augmentation per rank
        torch.manual_seed(args.seed + 1_000 * rank)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({sum(p.numel() for p in model.trainable_parameters()) / 1e6:.2f}M "
          f"trainable) on {device}")
    t1 = time.time()
    with stop_signals(announce=rank == 0) as signals:  # SIGINT/SIGTERM: finish the step, checkpoint, stop
        try:  # (inside: a launcher's further signals must not cut the message short)
            train(args, model, dataset, run_dir, device, rank, world, stats, signals)
        except (NonFiniteLoss, CheckpointWriteError) as e:
            raise SystemExit(f"error: {e}") from None
        except StopRequested as e:  # the step finished and a checkpoint holds it
            launcher = f"torchrun --nproc_per_node={world} train.py" if world > 1 else "python train.py"
            if rank == 0:
                print(f"train.py: stopped by {e.signame} after step {e.step} of {args.steps}"
                      + (" (training was complete; evaluation skipped)" if e.step >= args.steps else "")
                      + f"; checkpoint {e.ckpt}. Continue with: {launcher} --resume {run_dir}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None  # the shell's convention: 130 = SIGINT, 143 = SIGTERM
    t_train = time.time() - t1
    print(f"training: {args.steps} steps in {t_train:.0f} s; checkpoint in {run_dir}")
    t_eval = 0.0
    if args.data and args.eval_episodes > 0:  # no simulator here: replay recorded episodes (rank 0)
        if rank == 0:
            t2 = time.time()
            _, text = evaluate.run_replay_eval(run_dir, getattr(dataset, "datasets", [dataset]), args.eval_episodes,
                                               args.execution, device=str(device))
            t_eval = time.time() - t2
            print(text + "(closed loop in a simulator: evaluate.py --ckpt RUN_DIR --benchmark calvin / simpler)")
    elif args.eval_episodes > 0:  # under torchrun every rank runs its share of the episodes
        t2 = time.time()
        _, text = evaluate.run_metaworld_eval(run_dir, args.eval_episodes, args.eval_seed, args.execution,
                                              args.tasks, out=run_dir, device=str(device),
                                              workers=args.workers or None, cache_dir=args.cache_dir)
        t_eval = time.time() - t2
        print(text)
    summary = (f"total wall time {time.time() - t0:.0f} s: demos {t_data:.0f} s, training {t_train:.0f} s "
               f"({args.steps} steps), evaluation {t_eval:.0f} s")
    print(summary)
    if args.eval_episodes > 0 and not args.data and rank == 0:  # results.md: the table, then how it was made
        flags = reproduce_flags(args)
        with open(run_dir / "results.md", "a") as f:
            f.write(f"\n{summary} on {device} ({n_params / 1e6:.2f}M parameters).\n\n"
                    f"`python train.py {flags}`\n")


def reproduce_flags(args):
    """The flags that rebuild this run: only those that differ from the defaults, in argparse's own syntax."""
    default, out = vars(parse_args([])), []
    for k, v in vars(args).items():
        if k == "resume" or v == default.get(k):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):  # store_true flags default to False; --shift-aug may default either way
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):  # --tasks/--views/--head-mlp comma-separated, --data/--data-weights space
            out.append(f"{flag} {(',' if k in ('tasks', 'views', 'head_mlp') else ' ').join(map(str, v))}")
        else:
            out.append(f"{flag} {v}")
    return " ".join(out)


if __name__ == "__main__":
    try:
        main()
    finally:
        evaluate.end_distributed()  # under torchrun: leave the process group (gloo threads abort at exit)
