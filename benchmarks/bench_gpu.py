"""Paper-scale speed of the Kosmos-2 policy head on one GPU: control rate, training throughput and MFU, memory.

    python benchmarks/bench_gpu.py                 # a CUDA GPU, the exact paper setting (below), ~5 min
    python benchmarks/bench_gpu.py --tiny          # a CPU, tiny sizes: the same code paths (tests/test_bench_gpu.py)

The model is the paper's best VLA (Table I): the microsoft/kosmos-2-patch14-224 architecture, built from its
published config (CLIP ViT-L/14 at 224 px, 64-query connector, 24-layer 2048-wide decoder, 1.6B parameters)
with random weights (same compute as the released ones: nothing is downloaded), inside VLAConfig.paper: policy
head, LSTM 4 x 1024, H = 16 frames, chunks of L = 10 actions, two 224 px views. Four parts, each printed:

1. Closed-loop control rate: Policy.act with First execution (a new chunk every step; the policy head's per-frame
   features of the last H frames are cached, so a step runs the VLM on one new frame plus the head over H), then
   Chunk execution (a new chunk every L steps). Median / p99 ms per step over --act-steps steps after warm-up.
   Backbone weights in bf16, the head in fp32, under bf16 autocast. The physical floor: the bytes of weights
   one step reads (every weight once, the embedding table only for the rows used) / the GPU's memory bandwidth.
   --compile adds the same measurement with the vision tower and the LM under torch.compile (CUDA graphs).
2. Training throughput and MFU: train.py's step (bf16 autocast over fp32 master weights, AdamW, clipping) on
   batches of H-frame windows, for the largest batch that fits (doubling from 1), with and without activation
   checkpointing. MFU = model FLOPs per sample x samples/s / the GPU's dense bf16 peak. Model FLOPs per sample
   are analytic (2 x in x out per token for every linear layer, 4 x T^2 x width per attention layer, over the
   vision tower for H x V images, the LM over H frame sequences, the head over H steps; backward = 2 x forward);
   torch's FlopCounterMode on one real step is printed beside it as a cross-check. Recomputation under
   activation checkpointing is not model FLOPs (it lowers MFU, as it should).
3. Where a training step's time goes: data loading (a CALVIN-layout split read by data.CalvinDataset), vision
   tower, LM, head, backward, optimizer (CUDA events around each part).
4. An end-to-end check at the same scale: a CALVIN-layout split -> `train.py --data SPLIT` for 50 steps on a
   backbone folder written here (config.json, tokenizer, random weights as safetensors), killed at step 30 and
   resumed from its step-25 checkpoint, then Policy.from_pretrained(run).act on the device.
Peak memory is printed for every configuration.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import backbones  # noqa: E402
import train  # noqa: E402
from vla import VLA, Policy, VLAConfig  # noqa: E402

# The published microsoft/kosmos-2-patch14-224 config.json (the fields that shape compute; the rest are the
# transformers defaults backbones.py also assumes).
KOSMOS2_CONFIG = dict(
    model_type="kosmos-2", latent_query_num=64,
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14, image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    text_config=dict(vocab_size=65037, embed_dim=2048, layers=24, attention_heads=32, ffn_dim=8192,
                     activation_function="gelu", layer_norm_eps=1e-5, scale_embedding=True, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, tie_word_embeddings=True))
KOSMOS2_IMAGE_IDS = (64003, 64004)  # "<image>", "</image>" in the released tokenizer

# Dense bf16 peak (FLOP/s, no sparsity) and HBM bandwidth (bytes/s) from the vendors' data sheets.
GPU_SPECS = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
             ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12), ("L40S", 362e12, 0.864e12),
             ("A10", 125e12, 0.6e12), ("4090", 165e12, 1.0e12)]
STATS = {"bench": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mean": [0.0] * 7, "std": [1.0] * 7,
                   "min": [-1.0] * 7, "max": [1.0] * 7}}
VIEWS = ("static", "wrist")


# ----------------------------------------------------------------------------------------------- the model

def write_backbone_folder(folder, tiny, weights=False, dtype=torch.bfloat16):
    """A Hugging Face style Kosmos-2 folder: config.json, sentencepiece.bpe.model (a small tokenizer trained here:
    the vocabulary's size, not its pieces, sets the compute), tokenizer_config.json with <image>/</image>, and with
    weights=True a model.safetensors of random weights (our parameter names, which load_vlm's renames keep)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = backbones.SentencePieceTokenizer.train_tiny()
    n = tok.sp.get_piece_size()  # fairseq layout: ids 0..n, <mask> = n + 1
    if tiny:
        cfg = backbones.tiny_family_config("kosmos-2", 64, vocab_size=n + 8)
        image_ids = (n + 2, n + 3)
    else:
        cfg, image_ids = json.loads(json.dumps(KOSMOS2_CONFIG)), KOSMOS2_IMAGE_IDS
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "sentencepiece.bpe.model").write_bytes(tok.sp.serialized_model_proto())
    added = {str(i): {"content": s, "special": True} for i, s in zip(image_ids, ("<image>", "</image>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    if weights:
        from safetensors.torch import save_file
        vlm = backbones.load_vlm(folder, weights=False)
        init_random_(vlm)
        skip = {"lm.lm_head.weight"} if vlm.lm.tie else set()
        save_file({k: p.detach().to(dtype).contiguous() for k, p in vlm.named_parameters() if k not in skip},
                  str(folder / "model.safetensors"))
    return folder


@torch.no_grad()
def init_random_(module, std=0.02):
    """transformers-style random init of uninitialized (weights=False) parameters: N(0, std) matrices and
    embeddings, ones for norm scales, zeros for biases."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        elif "norm" in name or name.endswith(("ln.weight", "layrnorm.weight")):
            p.fill_(1.0)
        else:  # class embedding, [LRN], latents
            p.normal_(0.0, std)


def build_vla(folder, tiny, device):
    """VLAConfig.paper around the folder's architecture (tiny: the CPU preset's sizes), random backbone weights."""
    if tiny:
        config = VLAConfig.tiny(backbone=str(folder), views=VIEWS, image_size=64)
    else:
        config = VLAConfig.paper(str(folder), views=VIEWS)  # LSTM 4 x 1024, H = 16, L = 10, 224 px
    torch.manual_seed(0)
    vla = VLA(config, backbone_folder=str(folder)).to(device)  # the architecture, backbone uninitialized
    init_random_(vla.backbone)  # on the device: seconds for 1.6B parameters
    return vla


def frame_tokens(vla):
    """Tokens of one frame's LM sequence ([BOS] [wrist] [static] [text] [LRN] [EOS]) and the image-token count."""
    instr = "open the drawer"
    T_img = vla.backbone.n_image_tokens * len(vla.config.views)
    return 1 + T_img + len(vla.lrn_tail(instr)), T_img


# ----------------------------------------------------------------------------------------------- analytics

def linear_flops_per_token(module):
    """2 x in x out summed over every nn.Linear in `module` (FLOPs one token costs in its matmuls)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(module, T, S=None):
    """QK^T and AV of every self-attention layer in `module` for T queries over S keys: 2 x 2 x T x S x width."""
    S = T if S is None else S
    return sum(4 * T * S * m.n_heads * m.head_dim for m in module.modules() if isinstance(m, backbones.Attention))


def model_flops_per_sample(vla):
    """Analytic forward + backward FLOPs of one training sample (H frames x V views), see the module docstring."""
    c, bb = vla.config, vla.backbone
    H, V = c.window, len(c.views)
    vit = bb.vision
    P = (vit.image_size // vit.patch_embedding.kernel_size[0]) ** 2
    Tv = P + int(vit.clip)  # patch tokens (+ CLS)
    conv = 2 * vit.patch_embedding.weight.numel() * P
    vision = conv + linear_flops_per_token(vit) * Tv + attention_flops(vit, Tv)
    # connector: the latent queries attend over the image tokens (+ themselves, Kosmos-2), as cross-attention
    proj = bb.projector
    n_q = bb.config.get("latent_query_num", 64) if bb.family == "kosmos-2" else 0
    connector = linear_flops_per_token(proj) * (Tv + n_q) + attention_flops(proj, n_q, Tv + n_q)
    T, _ = frame_tokens(vla)
    lm = linear_flops_per_token(bb.lm.layers) * T + attention_flops(bb.lm.layers, T)  # no logits: policy head
    head = linear_flops_per_token(vla.head) * H
    lstm = sum(2 * p.numel() for n, p in vla.head.named_parameters() if "lstm" in n and "weight" in n) * H
    forward = H * V * (vision + connector) + H * lm + head + lstm
    return 3 * forward, dict(vision=3 * H * V * (vision + connector), lm=3 * H * lm, head=3 * (head + lstm))


def counted_flops(vla, batch):
    """torch.utils.flop_counter's count of one forward + backward on `batch`, divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(vla.device.type, dtype=torch.bfloat16, enabled=vla.device.type == "cuda"):
            loss, _ = vla(batch)
        loss.backward()
    vla.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(batch["instruction"])


def gpu_specs(device, peak_flag=None, bw_flag=None):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, bw = None, None
    for key, p, b in GPU_SPECS:
        if key in name:
            peak, bw = p, b
            break
    return name, (peak_flag * 1e12 if peak_flag else peak), (bw_flag * 1e9 if bw_flag else bw)


def weight_bytes_per_step(vla, n_text_rows):
    """Bytes of weights one closed-loop step reads: every parameter once, but from the embedding table only the
    rows of the tokens it embeds (the LM head is not used by the policy head)."""
    emb = vla.backbone.lm.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in vla.parameters() if p is not emb)
    return total + n_text_rows * emb.shape[1] * emb.element_size()


# ----------------------------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Forward time of named submodules (CUDA events on a GPU, perf_counter on a CPU), summed per step."""

    def __init__(self, parts, device):
        self.device, self.ms, self.handles, self.open = device, {k: 0.0 for k in parts}, [], {}
        for name, mod in parts.items():
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(mod.register_forward_hook(lambda m, a, o, name=name: self._stop(name)))
        self.events = []

    def _now(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, name):
        self.open[name] = self._now()

    def _stop(self, name):
        self.events.append((name, self.open.pop(name), self._now()))

    def collect(self):
        sync(self.device)
        for name, a, b in self.events:
            self.ms[name] += a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1000
        self.events = []

    def remove(self):
        for h in self.handles:
            h.remove()


def random_batch(vla, B, device, seed=0):
    c = vla.config
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (B, c.window, len(c.views), 3, c.image_size, c.image_size),
                                    dtype=torch.uint8, generator=g).to(device),
            "actions": (torch.rand(B, c.window, c.chunk, 7, generator=g) * 2 - 1).to(device),
            "action_mask": torch.ones(B, c.window, c.chunk, dtype=torch.bool, device=device),
            "instruction": ["open the drawer"] * B}


def train_steps(vla, B, steps, warmup, act_ckpt, profile=False):
    """samples/s (median step) and peak memory of train.py's step at batch B. -> dict, or None when out of memory."""
    device = vla.device
    vla.train()
    params = vla.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    amp = device.type == "cuda"
    batch = random_batch(vla, B, device)
    timer = PartTimer({"vision tower": vla.backbone.vision, "LM": vla.backbone.lm, "head": vla.head},
                      device) if profile else None
    parts = {"backward": 0.0, "optimizer": 0.0, "forward": 0.0}
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = vla(batch)
            sync(device)
            t1 = time.perf_counter()
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t3 = time.perf_counter()
            if timer is not None:
                timer.collect()
            if i == warmup - 1 and timer is not None:  # forget the warm-up steps
                timer.ms = {k: 0.0 for k in timer.ms}
            if i >= warmup:
                times.append(t3 - t0)
                parts["forward"] += (t1 - t0) * 1000
                parts["backward"] += (t2 - t1) * 1000
                parts["optimizer"] += (t3 - t2) * 1000
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"non-finite loss at batch {B}")
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if timer is not None:
            timer.remove()
        del opt
        vla.zero_grad(set_to_none=True)
    step = statistics.median(times)
    out = dict(batch=B, act_ckpt=act_ckpt, step_ms=step * 1000, samples_per_s=B / step,
               peak_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan"))
    if timer is not None:
        fwd = {k: v / steps for k, v in timer.ms.items()}
        fwd["forward, rest"] = parts["forward"] / steps - sum(fwd.values())
        out["profile"] = {**fwd, "backward": parts["backward"] / steps, "optimizer": parts["optimizer"] / steps}
    return out


def largest_batch(vla, act_ckpt, max_batch, steps, warmup, profile):
    """Double the batch from 1 until it does not fit (or max_batch); -> the last result that fit."""
    best, B = None, 1
    while B <= max_batch:
        r = train_steps(vla, B, steps, warmup, act_ckpt, profile=profile)
        if vla.device.type == "cuda":
            torch.cuda.empty_cache()
        if r is None:
            print(f"  batch {B:>3} (act-ckpt {act_ckpt}): out of memory")
            break
        print(f"  batch {B:>3} (act-ckpt {act_ckpt}): {r['step_ms']:8.1f} ms/step, {r['samples_per_s']:7.2f} "
              f"samples/s, peak {gib(r['peak_gb'])}", flush=True)
        best, B = r, B * 2
    return best


def gib(x):
    return "n/a (CPU)" if math.isnan(x) else f"{x:.1f} GiB"


# ----------------------------------------------------------------------------------------------- closed loop

def control_rate(vla, execution, steps, warmup):
    """Median and p99 ms per Policy.act step (and the peak memory)."""
    device = vla.device
    policy = Policy(vla, STATS, execution=execution)
    S = vla.config.image_size
    rng = np.random.default_rng(0)
    frames = [{v: rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for v in vla.config.views} for _ in range(8)]
    amp = device.type == "cuda"
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for t in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            a = policy.act(frames[t % len(frames)], "open the drawer")
            sync(device)
            if t >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    if not np.isfinite(a).all():
        raise RuntimeError(f"non-finite action {a}")
    times.sort()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))], peak


def compile_backbone(vla):
    """Vision tower and LM under torch.compile with CUDA graphs (fixed shapes in the closed loop)."""
    bb = vla.backbone
    bb.vision = torch.compile(bb.vision, mode="reduce-overhead")
    bb.lm = torch.compile(bb.lm, mode="reduce-overhead")
    return vla


# ----------------------------------------------------------------------------------------------- end to end

def write_calvin_split(split, n_frames, seed=0):
    """A CALVIN-layout split (episode_XXXXXXX.npz frames, ep_start_end_ids.npy, lang_annotations) with random
    pixels and actions: two recordings, one annotated segment each."""
    split = Path(split)
    (split / "lang_annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = [(0, n_frames - 1), (1000, 1000 + n_frames - 1)]
    for s, e in recs:
        for f in range(s, e + 1):
            rel = np.concatenate([rng.uniform(-1, 1, 6), [1.0 if (f // 8) % 2 else -1.0]])
            np.savez(split / f"episode_{f:07d}.npz", actions=rel.copy(), rel_actions=rel,
                     robot_obs=rng.normal(size=15), scene_obs=np.zeros(24),
                     rgb_static=rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
                     rgb_gripper=rng.integers(0, 256, (84, 84, 3), dtype=np.uint8))
    np.save(split / "ep_start_end_ids.npy", np.array(recs, dtype=np.int64))
    np.save(split / "ep_lens.npy", np.array([e - s + 1 for s, e in recs], dtype=np.int64))
    ann = {"info": {"indx": recs, "episodes": []},
           "language": {"ann": ["open the drawer", "push the blue block left"],
                        "task": ["open_drawer", "push_blue_block_left"], "emb": np.zeros((2, 1, 384), np.float32)}}
    np.save(split / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    return split


def data_ms_per_batch(split, vla, B, n=3):
    """ms to load one batch of B windows from the split in-process (what --loader-workers 0 costs per step)."""
    import data
    c = vla.config
    ds = data.CalvinDataset(split.parent, split.name, window=c.window, chunk=c.chunk, views=c.views,
                            image_size=c.image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=0)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
    return (time.perf_counter() - t0) * 1000 / n


def end_to_end(tmp, tiny, device, steps=50, batch=2):
    """train.py on a CALVIN-layout split: killed at step 30, resumed from the step-25 checkpoint to 50, then
    Policy.from_pretrained(run).act on the device. Returns a one-line summary; raises on any failure."""
    tmp = Path(tmp)
    folder = write_backbone_folder(tmp / "kosmos2", tiny, weights=True,
                                   dtype=torch.float32 if tiny else torch.bfloat16)
    c = VLAConfig.tiny() if tiny else VLAConfig.paper("x")
    split = write_calvin_split(tmp / "calvin" / "training", n_frames=c.window + c.chunk + 6)
    run = tmp / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(split), "--backbone", str(folder),
           "--window", str(c.window), "--chunk", str(c.chunk), "--image-size", str(c.image_size),
           "--head-size", "tiny" if tiny else "paper", "--steps", str(steps), "--batch", str(batch),
           "--ckpt-every", "25", "--keep-ckpts", "1", "--log-every", "5", "--eval-episodes", "0", "--loader-workers", "0",
           "--device", device.type, "--out", str(run)] + (["--threads", "1"] if device.type == "cpu" else [])
    # (one CPU thread: a 2-thread OpenMP pool on a loaded 2-core box can stall a tiny model's steps 100x)
    t0 = time.perf_counter()
    killed = subprocess.run(cmd + ["--debug-kill-at-step", "30"], cwd=ROOT, capture_output=True, text=True)
    if killed.returncode == 0 or not (run / "checkpoints").is_dir():
        raise RuntimeError(f"the first run was to be killed at step 30 after a step-25 checkpoint; rc "
                           f"{killed.returncode}\n{killed.stdout[-2000:]}\n{killed.stderr[-3000:]}")
    resumed = subprocess.run(cmd + ["--resume", str(run)], cwd=ROOT, capture_output=True, text=True)
    if resumed.returncode != 0:
        raise RuntimeError(f"resume failed (rc {resumed.returncode}):\n{resumed.stdout[-2000:]}\n"
                           f"{resumed.stderr[-3000:]}")
    said = (resumed.stdout + resumed.stderr)
    if "resumed from" not in said or "step 25" not in said:
        raise RuntimeError(f"the resumed run did not start from the step-25 checkpoint:\n{said[-2000:]}")
    wall = time.perf_counter() - t0
    policy = Policy.from_pretrained(run, execution="first", device=str(device))
    S = c.image_size
    rng = np.random.default_rng(1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        acts = [policy.act({v: rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for v in VIEWS}, "open the drawer")
                for _ in range(3)]
    acts = np.stack(acts)
    if acts.shape != (3, 7) or not np.isfinite(acts).all() or not np.isin(acts[:, 6], (-1.0, 1.0)).all():
        raise RuntimeError(f"Policy.act gave {acts}")
    return (f"train.py {steps} steps (batch {batch}) on a CALVIN-layout split, killed at 30, resumed from step 25, "
            f"{wall:.0f} s in all; Policy.from_pretrained(run).act on {device.type}: action {np.round(acts[-1], 3)}")


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized model (tiny-kosmos2 shapes, H=4, L=4, 64 px)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--act-steps", type=int, default=200, help="timed closed-loop steps (after warm-up)")
    ap.add_argument("--act-warmup", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=4, help="timed training steps per batch size")
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=64, help="stop doubling the batch here")
    ap.add_argument("--compile", action="store_true", help="also time the closed loop under torch.compile")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: act,train,e2e")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the GPU is not in the table")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth (GB/s), likewise")
    args = ap.parse_args(argv)
    for flag in ("act_steps", "train_steps", "max_batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    skip = set(filter(None, args.skip.split(",")))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and args.tiny is False:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and not args.tiny:
        print("note: the paper-scale model on a CPU is very slow; use --tiny for a check of the code paths")
    name, peak, bw = gpu_specs(device, args.peak_tflops, args.bandwidth_gbs)
    print(f"device: {name}, torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda"
                                                           else ""))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_backbone_folder(Path(tmp) / "arch", args.tiny)
        build = lambda: build_vla(folder, args.tiny, device)  # noqa: E731
        vla = build()
        c = vla.config
        n_bb = sum(p.numel() for p in vla.backbone.parameters())
        n_head = sum(p.numel() for p in vla.head.parameters())
        T, T_img = frame_tokens(vla)
        print(f"model: Kosmos-2 architecture{' (tiny)' if args.tiny else ''}, {n_bb / 1e6:.1f}M backbone + "
              f"{n_head / 1e6:.1f}M {c.head} head parameters; H={c.window}, L={c.chunk}, views {c.views}, "
              f"{c.image_size} px; {T} LM tokens per frame ({T_img} image)")

        if "act" not in skip:
            print("\n1. closed-loop control rate (Policy.act; backbone bf16, head fp32, bf16 autocast)")
            if device.type == "cuda":
                vla.backbone.to(torch.bfloat16)
            floor_b = weight_bytes_per_step(vla, T - T_img)
            for execution in ("first", "chunk"):
                med, p99, mem = control_rate(vla, execution, args.act_steps, args.act_warmup)
                print(f"  {execution:<6} execution: median {med:7.2f} ms ({1000 / med:6.1f} Hz), p99 {p99:7.2f} ms, "
                      f"peak {gib(mem)}" + ("   [target >= 100 Hz]" if execution == "first" else ""), flush=True)
            if bw:
                print(f"  floor: {floor_b / 2 ** 30:.2f} GiB of weights per step / {bw / 1e12:.2f} TB/s = "
                      f"{floor_b / bw * 1000:.2f} ms ({bw / floor_b:.0f} Hz)")
            else:
                print(f"  floor: {floor_b / 2 ** 30:.2f} GiB of weights per step (bandwidth unknown: --bandwidth-gbs)")
            if args.compile:
                try:
                    compile_backbone(vla)
                    med, p99, _ = control_rate(vla, "first", args.act_steps, args.act_warmup + 10)
                    print(f"  first, torch.compile (CUDA graphs): median {med:7.2f} ms ({1000 / med:6.1f} Hz), "
                          f"p99 {p99:7.2f} ms")
                except Exception as e:  # optional path: report, do not hide the rest of the benchmark
                    print(f"  torch.compile path failed: {type(e).__name__}: {str(e)[:300]}")
        del vla
        if device.type == "cuda":
            torch.cuda.empty_cache()

        if "train" not in skip:
            print("\n2. training throughput (train.py's step: bf16 autocast, fp32 master weights, AdamW, clip)")
            vla = build()
            fl, split_fl = model_flops_per_sample(vla)
            counted = counted_flops(vla, random_batch(vla, 1, device))
            print(f"  model FLOPs per sample (fwd + bwd, analytic): {fl / 1e9:.4g} GFLOP (vision "
                  f"{split_fl['vision'] / fl:.0%}, LM {split_fl['lm'] / fl:.0%}, head {split_fl['head'] / fl:.1%}); "
                  f"FlopCounterMode on one step: {counted / 1e9:.4g} GFLOP ({counted / fl:.2f}x)")
            results = {}
            for ckpt in (False, True):  # one model: checkpointing wraps its blocks for the second pass
                if ckpt:
                    train.apply_activation_checkpointing(vla)
                r = largest_batch(vla, ckpt, args.max_batch, args.train_steps, args.train_warmup,
                                  profile=not ckpt)
                results[ckpt] = r
                if r is None:
                    print(f"  act-ckpt {ckpt}: not even batch 1 fits")
                    continue
                mfu = fl * r["samples_per_s"] / peak if peak else float("nan")
                print(f"  largest batch, act-ckpt {ckpt}: {r['batch']}: {r['samples_per_s']:.2f} samples/s, "
                      f"MFU {mfu:.1%} [target >= 40%], peak memory {gib(r['peak_gb'])}", flush=True)
            r = results[False] or results[True]
            if r is not None and "profile" in r:
                print(f"\n3. where a training step's time goes (batch {r['batch']}, no act-ckpt), ms per step:")
                split = write_calvin_split(Path(tmp) / "calvin" / "training", n_frames=c.window + c.chunk + 6)
                dms = data_ms_per_batch(split, vla, r["batch"])
                prof = {"data (CALVIN split, in-process)": dms, **r["profile"]}
                total = sum(prof.values())
                for k, v in prof.items():
                    print(f"  {k:<34}{v:10.1f}  {v / total:6.1%}")

        vla = None
        if "e2e" not in skip:
            print("\n4. end to end", flush=True)
            print("  " + end_to_end(Path(tmp) / "e2e", args.tiny, device))


if __name__ == "__main__":
    main()
