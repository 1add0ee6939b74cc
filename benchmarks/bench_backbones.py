"""CPU forward latency of backbones.load_vlm models vs transformers on the same checkpoint, and load_vlm's peak memory.

    python benchmarks/bench_backbones.py [--families kosmos-2 paligemma llava openflamingo] [--reps 5] [--depth-div 1]
    python benchmarks/bench_backbones.py --memory-gb 1.2     # peak RSS of load_vlm on a >1 GB checkpoint

Latency: each family at its real depth and head layout but 1/8 width (Kosmos-2: CLIP-L/14 224 px + 24-layer
decoder; PaliGemma: SigLIP 224 px + 18-layer Gemma with multi-query attention; LLaVA-1.5: CLIP-L/14 336 px
+ 32-layer LLaMA), random weights saved once with transformers' save_pretrained, then both models run the same
inputs (batch 2, one image + 32 text tokens) in one process, fp32, no grad, one thread. Prints the median CPU
seconds of each and the ratio ours / transformers (target <= 1.0), after checking the logits agree.
Memory: writes a Kosmos-2-shaped fp32 checkpoint of about the requested size, then loads it in a fresh process
and prints (peak RSS during load_vlm - RSS before) / file size (target <= 1.2).
Needs transformers (requirements-dev.txt).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import backbones  # noqa: E402


def eighth_width(family):
    """(transformers config overrides for tests/test_backbones.hf_config) at 1/8 of the released widths."""
    if family == "kosmos-2":
        return {"latent_query_num": 64, "vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=24,
                                                       num_attention_heads=16, image_size=224, patch_size=14),
                "text": dict(vocab_size=8192, embed_dim=256, layers=24, attention_heads=32, ffn_dim=1024)}
    if family == "paligemma":
        return {"vision": dict(hidden_size=144, intermediate_size=538, num_hidden_layers=27, num_attention_heads=16,
                               image_size=224, patch_size=14),
                "text": dict(vocab_size=8192, hidden_size=256, intermediate_size=2048, num_hidden_layers=18,
                             num_attention_heads=8, num_key_value_heads=1, head_dim=32)}
    return {"vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14),
            "text": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)}


def paired_median_times(fn_a, fn_b, reps):
    """Median CPU seconds (process time, one thread: insensitive to other processes on a shared machine) of
    fn_a and fn_b, run alternately."""
    fn_a(), fn_b()  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        for fn, ts in ((fn_a, ta), (fn_b, tb)):
            t0 = time.process_time()
            fn()
            ts.append(time.process_time() - t0)
    return sorted(ta)[reps // 2], sorted(tb)[reps // 2]


def flamingo_lm_latency(reps, depth_div):
    """OpenFlamingo-3B's MPT-1B at 1/8 width (d 256, 24 layers, 16 heads) from an OpenFlamingo folder vs
    transformers' MptForCausalLM, 2 x 96 text tokens (the images enter through cross-attention, not timed)."""
    import test_backbones as tb
    mpt = dict(d_model=256, n_heads=16, n_layers=max(1, 24 // depth_div), vocab_size=8192, max_seq_len=128)
    with tempfile.TemporaryDirectory() as d:
        model, _, _ = tb.openflamingo_folder(d, 0, mpt, every=1)
        ours = backbones.load_vlm(d)
    ids = torch.randint(0, 8192, (2, 96))
    pos = torch.arange(96).expand(2, -1)
    run = lambda: ours.lm_logits(ours(ours.embed_tokens(ids), pos)[0])  # noqa: E731
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - run()).abs().max().item()
        t_hf, t_ours = paired_median_times(lambda: model(input_ids=ids), run, reps)
    n = sum(p.numel() for p in ours.lm.parameters()) / 1e6
    print(f"{'of-mpt':10s} {n:6.1f}M params, 96 tokens x 2: transformers {t_hf * 1e3:7.1f} ms  ours "
          f"{t_ours * 1e3:7.1f} ms CPU  ratio ours/transformers {t_ours / t_hf:.2f}  (max |logit diff| {diff:.1e})")


def latency(families, reps, depth_div):
    import test_backbones as tb
    for family in families:
        if family == "openflamingo":
            flamingo_lm_latency(reps, depth_div)
            continue
        ov = eighth_width(family)
        text_depth = "layers" if family == "kosmos-2" else "num_hidden_layers"
        for part, key in (("vision", "num_hidden_layers"), ("text", text_depth)):
            ov[part][key] = max(1, ov[part][key] // depth_div)
        model = tb.hf_model(family, ov, seed=0)  # transformers' default attention (sdpa)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            ours = backbones.load_vlm(d)
        inputs = tb.hf_inputs(family, model, ours.n_image_tokens, batch=2, n_text=32, prefix_lm=False)
        inputs["attention_mask"][:] = 1
        with torch.no_grad():
            diff = (model(**inputs).logits - ours.lm_logits(**inputs)).abs().max().item()
            t_hf, t_ours = paired_median_times(lambda: model(**inputs), lambda: ours.lm_logits(**inputs), reps)
        n = sum(p.numel() for p in ours.parameters()) / 1e6
        print(f"{family:10s} {n:6.1f}M params, {inputs['input_ids'].shape[1]} tokens x 2: transformers "
              f"{t_hf * 1e3:7.1f} ms  ours {t_ours * 1e3:7.1f} ms CPU  ratio ours/transformers {t_ours / t_hf:.2f}  "
              f"(max |logit diff| {diff:.1e})")


def memory(gb):
    import test_backbones as tb
    width = 1024 if gb <= 2 else 2048
    layers = max(1, round(gb * 1e9 / 4 / (12 * width * width + 2 * 1024 * 1024 * 12)))
    ov = {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
                         image_size=224, patch_size=14),
          "text": dict(vocab_size=65037, embed_dim=width, layers=layers, attention_heads=16, ffn_dim=4 * width)}
    with tempfile.TemporaryDirectory() as d:
        tb.hf_model("kosmos-2", ov, seed=0).save_pretrained(d, max_shard_size="500MB")
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        # VmHWM (peak RSS of this process image; ru_maxrss would include the parent's peak inherited at fork)
        code = ("import sys, torch; sys.path.insert(0, %r); import backbones\n"
                "def kb(f):\n"
                "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(f))\n"
                "before = kb('VmRSS'); m = backbones.load_vlm(%r)\n"
                "print(before, kb('VmHWM'), kb('VmRSS'))" % (str(Path(__file__).resolve().parents[1]), d))
        before, peak, after = map(int, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    print(f"checkpoint {size / 1e9:.2f} GB: load_vlm peak RSS increase {(peak - before) / 1e9:.2f} GB "
          f"(resident after load {(after - before) / 1e9:.2f} GB), ratio peak / file size {(peak - before) / size:.2f}")


if __name__ == "__main__":
    a = argparse.ArgumentParser()
    a.add_argument("--families", nargs="+", default=["kosmos-2", "paligemma", "llava", "openflamingo"])
    a.add_argument("--reps", type=int, default=5)
    a.add_argument("--threads", type=int, default=1, help="torch threads (times are CPU time, so keep 1)")
    a.add_argument("--depth-div", type=int, default=1, help="divide every tower's depth (quicker runs)")
    a.add_argument("--memory-gb", type=float, default=None, help="only measure load_vlm's peak memory")
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_gb:
        memory(args.memory_gb)
    else:
        latency(args.families, args.reps, args.depth_div)
