"""Train a VLA, then evaluate it in closed loop. `python train.py` with no flags is the built-in default:

  1. generate (or reuse from data_cache/) Meta-World scripted-expert demonstrations for the default tasks,
  2. train the paper's best formulation (policy head over a history of H frames, continuous actions, chunks of
     L actions, §III-C / Fig. 6) on the `tiny` decoder-only backbone,
  3. evaluate it in closed loop on evaluation seeds never used for demonstrations and print a success table
     (scripted expert = ceiling, random actions = floor).

Every choice is a flag (printed at start). The run directory gets model.safetensors, config.json,
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
  Recipes (§II-E): --data A.h5 (finetune), --data A.h5 B.h5 --data-weights 3 1 (co-train),
      --init-from CO_TRAINED_RUN --data A.h5 (post-train).
  Hidden test hooks: --debug-nan-at-step N (the N-th step's loss becomes NaN), --debug-kill-at-step N
      (SIGKILL once N steps are done).
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("model (vla.VLAConfig; defaults: the tiny preset, paper's best formulation)")
    a.add_argument("--formulation", default="policy_head", choices=vla.FORMULATIONS)
    a.add_argument("--backbone", default="tiny")
    a.add_argument("--head", default="lstm", choices=["mlp", "lstm", "gpt"], help="policy-head trunk")
    a.add_argument("--head-size", default="auto", choices=["auto", "tiny", "paper"], help="head widths: tiny = "
                   "VLAConfig.tiny (LSTM 2x128, CPU), paper = VLAConfig.paper (LSTM 4x1024, MLP 1024-512-256, GPT 8 "
                   "layers); auto = paper for a pretrained backbone folder, tiny otherwise")
    a.add_argument("--window", type=int, default=2, help="H, history frames")
    a.add_argument("--chunk", type=int, default=8, help="L, actions predicted per frame")
    a.add_argument("--action-loss", default="huber", choices=["huber", "mse", "flow"])
    a.add_argument("--moe", action="store_true",
                   help="pi0-style mixture-of-experts action expert (Table IIb; one_step_continuous only)")
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
    o.add_argument("--steps", type=int, default=2500, help="with the cosine schedule, 2500 steps matched the "
                   "success of 3500 constant-LR steps (88.0%% vs 88.7%% mean over eval seeds 0-2; docs/main_job.md)")
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
                   "process has more than 2 cores, else 0: on an idle 2-core box, 2 compute threads with in-process "
                   "loading ran 7.5 steps/s, 1 thread + 1 worker 5.1)")
    o.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    o.add_argument("--log-every", type=int, default=25)
    o.add_argument("--out", default="runs/default")
    e = p.add_argument_group("evaluation")
    e.add_argument("--execution", default="ensemble", choices=["chunk", "first", "ensemble"],
                   help="chunk: the L actions open loop; first: re-plan every step; ensemble: ACT temporal "
                   "ensembling (re-plans every step; best here: 70/86%% vs chunk 60/78%% on eval seeds 0/1)")
    e.add_argument("--eval-episodes", type=int, default=10, help="episodes per task (0 = skip evaluation)")
    e.add_argument("--eval-seed", type=int, default=0)
    e.add_argument("--max-steps", type=int, default=200, help="evaluation episode step limit")
    s = p.add_argument_group("scale-out, fault tolerance, data recipes (§II-E)")
    s.add_argument("--data", nargs="+", default=None, metavar="PATH", help="train on these HDF5 files (data."
                   "EpisodeWriter; a CALVIN split directory also works) instead of Meta-World demos; one = "
                   "finetune, several = co-train on their weighted mixture")
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
    s.add_argument("--shift-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="random-shift image augmentation (official)")
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
        saved = {"schedule": "constant", **json.loads(saved.read_text())}  # runs from before --schedule existed
        args = argparse.Namespace(**{**vars(args), **saved, **given})
        args.out = args.resume
        args.debug_nan_at_step, args.debug_kill_at_step = (given.get(k, -1) for k in ("debug_nan_at_step",
                                                                                      "debug_kill_at_step"))
        args.tasks, args.views = (v if isinstance(v, str) else ",".join(v) for v in (args.tasks, args.views))
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.views = [v for v in args.views.split(",") if v]
    return args


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
                            key="metaworld")


def build_data_mixture(args):
    """--data paths (HDF5 files or CALVIN split directories), one dataset each, keyed by file; several are
    mixed with --data-weights. Every dataset keeps its own action statistics (they all go in the checkpoint)."""
    w = args.data_weights or [1.0] * len(args.data)
    if len(w) != len(args.data):
        raise SystemExit(f"--data-weights has {len(w)} values for {len(args.data)} --data paths: give one each")
    kw = dict(window=args.window, chunk=args.chunk, views=tuple(args.views), image_size=args.image_size)
    sets = []
    for path in args.data:
        if os.path.isdir(path):
            root, split = os.path.split(os.path.normpath(path))
            sets.append(data.CalvinDataset(root, split, **kw))
        else:
            sets.append(data.HDF5Dataset(path, **kw))
    keys = [d.key for d in sets]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"--data: datasets need distinct keys (the file attr dataset_key, else the file name), "
                         f"got {keys}")
    return sets[0] if len(sets) == 1 else data.MixtureDataset(list(zip(sets, w)), seed=args.seed)


def head_preset(flag, backbone):
    """--head-size auto -> "paper" for a pretrained backbone folder, "tiny" for the CPU backbones."""
    if flag != "auto":
        return flag
    return "paper" if os.path.isdir(os.path.expanduser(backbone)) else "tiny"


def build_model(args):
    """VLAConfig from the flags. The preset only decides the head's sizes (and window/chunk/image size defaults,
    which the flags always override): the paper's for a pretrained backbone folder, the CPU ones for tiny."""
    preset = vla.VLAConfig.paper if head_preset(getattr(args, "head_size", "auto"), args.backbone) == "paper" \
        else vla.VLAConfig.tiny
    config = preset(formulation=args.formulation, backbone=args.backbone, head=args.head,
                    window=args.window, chunk=args.chunk, action_loss=args.action_loss,
                    views=tuple(args.views), image_size=args.image_size,
                    moe=getattr(args, "moe", False), shift_aug=getattr(args, "shift_aug", True))
    return vla.VLA(config)


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

def setup_distributed(device_flag="auto"):
    """-> (rank, world, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on GPU, gloo
    on CPU (so every multi-process path is testable on a laptop). One process per GPU (LOCAL_RANK)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag.startswith("cuda")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda and world > 1 else
                          ("cuda" if cuda else "cpu") if device_flag == "auto" else device_flag)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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
                                               generator=torch.Generator().manual_seed(seed + epoch))
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


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


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
    Keeps the newest `keep` checkpoints. Every rank must call it."""
    ck = Path(run_dir) / "checkpoints"
    final, tmp = ck / f"step_{step:08d}", ck / f".tmp_step_{step:08d}"
    model_sd, optim_sd = full_state(net, model, opt, fsdp)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        if fsdp:  # the sharded module cannot be saved as is: load the gathered weights into a plain CPU copy
            if not hasattr(save_train_state, "shadow"):
                with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                    save_train_state.shadow = vla.VLA(model.config)
            model = save_train_state.shadow
            model.load_state_dict(model_sd)
        extra = {"step": step}
        vla.save_checkpoint(tmp, model, stats, extra=extra)
        torch.save({"step": step, "optimizer": optim_sd, "scheduler": sched.state_dict(), "world_size": world,
                    "data_position": {"global_batch": args.batch, "samples_seen": step * args.batch},
                    "args": vars(args)}, tmp / "train_state.pt")
    barrier(world)
    if rank == 0:
        files = sorted(f for f in tmp.rglob("*") if f.is_file())  # incl. backbone/ (a pretrained folder's config)
        manifest = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of this step left by an earlier attempt
        os.replace(tmp, final)  # the atomic step: readers see no checkpoint or a complete one
        for old in sorted(ck.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        vla.save_checkpoint(run_dir, model, stats, extra=extra)
    barrier(world)
    return final


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
        if _sha256(f) != m["sha256"]:
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


def check_finite(step, world, device, loss, gnorm, last_ckpt):
    """Stop (NonFiniteLoss) if the loss or gradient norm is NaN/inf on any rank, before the optimizer steps.
    Returns the loss averaged over the ranks (what gets logged)."""
    bad_loss = torch.tensor([float(not (math.isfinite(loss) and math.isfinite(gnorm))), loss], device=device,
                            dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(bad_loss)
    bad, loss = bad_loss[0].item(), bad_loss[1].item() / world
    if bad > 0:
        raise NonFiniteLoss(f"non-finite loss or gradient at step {step + 1} (loss {loss}, grad norm {gnorm}): "
                            f"stopped before the optimizer step. The last good checkpoint is "
                            f"{last_ckpt or 'none (no checkpoint was written yet)'}; resume from it with "
                            f"--resume RUN_DIR, e.g. with a lower --lr or a smaller --clip")
    return loss



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

def train(args, model, dataset, run_dir, device, rank=0, world=1, stats=None):
    """The loop. Each step: --grad-accum micro-batches per process (gradients all-reduced once, on the last),
    clip, AdamW, LR schedule; checkpoint every --ckpt-every steps and at the end (save_train_state)."""
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
        loss_sum = check_finite(step, world, device, loss_sum, float(gnorm), last_ckpt)  # -> mean over ranks
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
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            last_ckpt = save_train_state(run_dir, step + 1, net, model, opt, sched, stats, args, rank, world,
                                         args.fsdp, args.keep_ckpts)
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


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)  # torchrun: one process per GPU / CPU slot
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
    print(f"dataset: {len(getattr(dataset, 'episodes', ())) or 'mixture of ' + str(len(dataset.datasets))} episodes, "
          f"{len(dataset)} windows (H={args.window}, L={args.chunk}), {t_data:.0f} s, on {world} process(es)")
    model = build_model(args)
    stats = dataset.stats_by_key
    if args.init_from:  # post-train: the co-trained weights, and its datasets' statistics travel along
        src, src_stats, _ = vla.load_checkpoint(args.init_from)
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
    try:
        train(args, model, dataset, run_dir, device, rank, world, stats)
    except NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None
    t_train = time.time() - t1
    print(f"training: {args.steps} steps in {t_train:.0f} s; checkpoint in {run_dir}")
    t_eval = 0.0
    if args.data and args.eval_episodes > 0:
        print("(no closed-loop evaluation for --data runs: evaluate the checkpoint with evaluate.py)")
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
        if isinstance(v, bool):  # store_true flags default to False; --shift-aug/--no-shift-aug defaults to True
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):  # --tasks/--views are comma-separated, --data/--data-weights space-separated
            out.append(f"{flag} {(',' if k in ('tasks', 'views') else ' ').join(map(str, v))}")
        else:
            out.append(f"{flag} {v}")
    return " ".join(out)


if __name__ == "__main__":
    try:
        main()
    finally:
        evaluate._end_distributed()  # under torchrun: leave the process group (gloo threads abort at exit)
