"""benchmarks/bench_gpu.py --tiny: the paper-scale GPU benchmark's code paths, on a CPU at tiny size.

The GPU figures themselves come from a GPU run (see the script's docstring); this keeps the script from rotting:
every part runs (closed loop, training at growing batches with and without activation checkpointing, the
FLOP count against torch's counter, the step profile, and the end-to-end train -> kill -> resume -> act).
"""

import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_tiny_runs_every_part(capsys, one_thread):
    bench = load_bench()
    bench.main(["--tiny", "--device", "cpu", "--act-steps", "5", "--act-warmup", "2", "--train-steps", "1",
                "--train-warmup", "1", "--max-batch", "2"])
    out = capsys.readouterr().out
    for line in ("first  execution", "chunk  execution", "largest batch, act-ckpt False: 2",
                 "largest batch, act-ckpt True: 2", "vision tower", "backward", "optimizer", "Policy.from_pretrained"):
        assert line in out, f"{line!r} missing from:\n{out}"
    hz = [float(x) for x in re.findall(r"\(\s*([\d.]+) Hz\)", out)]
    assert len(hz) == 2 and all(h > 0 for h in hz)
    # the analytic FLOP count agrees with torch's own counter of one real step (within 25%)
    ratio = float(re.search(r"FlopCounterMode on one step: [\d.]+ GFLOP \(([\d.]+)x\)", out).group(1))
    assert 0.75 < ratio < 1.25, out


def test_analytic_flops_of_a_linear_and_attention():
    bench = load_bench()
    import backbones
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    assert bench.linear_flops_per_token(m) == 2 * (8 * 16 + 16 * 4)
    att = backbones.Attention(32, 4)
    assert bench.attention_flops(att, T=10) == 4 * 10 * 10 * 32
    assert bench.attention_flops(att, T=3, S=7) == 4 * 3 * 7 * 32
