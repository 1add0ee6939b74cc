"""Training throughput (samples/s) of train.py's default configuration with 1 process and with torchrun N processes.

    python benchmarks/bench_train_scale.py [--steps 40] [--nproc 2] [--batch 32]

The default model (tiny backbone, policy head, H=4, L=4, 64 px, both cameras, global batch 32) trains on a
synthetic HDF5 file of the same shapes (data.EpisodeWriter, 20 episodes x 40 frames), so no Meta-World
rendering is timed. Each run is `train.py --data ...` in a fresh process; samples/s is read from its
metrics.csv (the global batch over each step's wall time, data loading included), averaged over all logging
intervals but the first (warm-up). Under torchrun each process gets cores // N threads (gloo on CPU).
Prints both figures and the ratio (N processes / 1 process), the scaling efficiency being ratio / N.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def synthetic_data(path, episodes=20, frames=40, size=64):
    rng = np.random.default_rng(0)
    attrs = {"control_hz": 10, "action_convention": "delta xyz + delta euler xyz + gripper 1 open/-1 closed",
             "dataset_key": "bench"}
    with data.EpisodeWriter(path, attrs) as w:
        for e in range(episodes):
            images = {v: rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for v in ("static", "wrist")}
            a = rng.normal(size=(frames, 7)).astype(np.float32)
            w.add_episode(images, a, f"task {e % 5}", f"t{e % 5}")


def samples_per_s(run_dir, nproc, args, data_path):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", "29571"] if nproc > 1 else [sys.executable])
    cmd = launcher + [str(ROOT / "train.py"), "--data", str(data_path), "--steps", str(args.steps), "--batch",
                      str(args.batch), "--log-every", str(args.log_every), "--eval-episodes", "0",
                      "--ckpt-every", str(10 ** 9), "--loader-workers", "0", "--out", str(run_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = list(csv.DictReader(open(Path(run_dir) / "metrics.csv")))
    return float(np.mean([float(r["samples_per_s"]) for r in rows[1:]]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="global batch (train.py's default)")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_data(Path(tmp) / "bench.h5")
        one = samples_per_s(Path(tmp) / "one", 1, args, Path(tmp) / "bench.h5")
        many = samples_per_s(Path(tmp) / "many", args.nproc, args, Path(tmp) / "bench.h5")
    print(f"train.py default config, {os.cpu_count()} CPU cores, global batch {args.batch}: "
          f"1 process {one:.1f} samples/s, {args.nproc} processes (torchrun, gloo) {many:.1f} samples/s, "
          f"ratio {many / one:.2f}x (scaling efficiency {many / one / args.nproc:.0%})")


if __name__ == "__main__":
    main()
