"""Samples/s of the LeRobot (AV1 video) and RLDS (JPEG in TFRecord) readers against the HDF5 reader, same episodes.

    python benchmarks/bench_formats.py [--episodes 8] [--frames 60] [--size 224] [--window 2] [--samples 200]

Writes the same episodes (two cameras of --size x --size textured frames that move every step, so the video
codec has real work; 7-d actions) three ways with the writers of tests/test_formats.py: our HDF5 format
(data.EpisodeWriter, raw uint8), a LeRobotDataset v3.0 (AV1 via libsvtav1 at LeRobot's defaults g=2, crf=30,
yuv420p) and an RLDS/TFDS folder (JPEG frames, as in Open X-Embodiment). Then times ds[i] for the same random
windows on each (H = --window frames, both views, resized to 224 like a real backbone; one torch thread, like a
DataLoader worker) and prints samples/s and the ratio to HDF5; also with cache_frames (decode once into a
resized uint8 memmap), whose build time is printed.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from tests.test_formats import write_lerobot_v3, write_rlds  # noqa: E402


def episodes(n_eps, n, size, seed=0):
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (2, size // 8, size // 8, 3), dtype=np.uint8)
    texture = texture.repeat(8, 1).repeat(8, 2)  # 8x8 blocks: image-like, compressible, not trivially flat
    out = []
    for e in range(n_eps):
        imgs = [np.stack([np.roll(texture[c], (2 * t + e, 3 * t), (0, 1)) for t in range(n)]) for c in range(2)]
        a = rng.normal(0, 0.3, (n, 7)).astype(np.float32)
        a[:, 6] = (np.arange(n) // 10) % 2
        out.append({"images": imgs, "actions": a, "task": ["put the cup on the plate"] * n,
                    "state": rng.normal(size=(n, 5)).astype(np.float32)})
    return out


def rate(ds, idx):
    ds[int(idx[0])]  # open files / decoders once
    t = time.perf_counter()
    for i in idx:
        ds[int(i)]
    return len(idx) / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=int, default=224, help="recorded frame size")
    p.add_argument("--window", type=int, default=2, help="H (train.py default 2; the paper's CALVIN runs use 16)")
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    eps = episodes(args.episodes, args.frames, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        with data.EpisodeWriter(tmp / "same.h5", {"control_hz": 10, "action_convention": "bench"}) as w:
            for d in eps:
                w.add_episode({"static": d["images"][0], "wrist": d["images"][1]}, d["actions"], d["task"][0], "")
        lerobot = write_lerobot_v3(tmp / "same_lerobot", eps)
        rlds = write_rlds(tmp / "same_rlds", eps, fmt="JPEG")
        print(f"wrote {args.episodes} episodes x {args.frames} frames x 2 cameras at {args.size}px three ways in "
              f"{time.perf_counter() - t:.1f} s")
        kw = dict(window=args.window, chunk=10, image_size=224)
        sets = {"hdf5": data.HDF5Dataset(tmp / "same.h5", **kw),
                "lerobot (AV1 mp4)": data.LeRobotDataset(lerobot, **kw),
                "rlds (JPEG TFRecord)": data.RLDSDataset(rlds, **kw)}
        for name, cls, root in (("lerobot", data.LeRobotDataset, lerobot), ("rlds", data.RLDSDataset, rlds)):
            t = time.perf_counter()
            sets[f"{name}, cache_frames"] = cls(root, **kw, cache_dir=tmp / "cache")
            n = len(sets[f"{name}, cache_frames"].raw_actions)
            print(f"{name} frame cache built in {time.perf_counter() - t:.1f} s ({n} frames x 2 views, decoded in "
                  f"order, resized to 224)")
        # the same windows everywhere (RLDS drops each episode's is_last step, so draw from its shorter range)
        idx = np.random.default_rng(0).integers(0, min(len(d) for d in sets.values()), args.samples)
        base = None
        for name, ds in sets.items():
            r = rate(ds, idx)
            base = base or r
            print(f"{name:24s} {r:7.1f} samples/s  ratio to hdf5 {r / base:.2f}  (H={args.window}, 2 views, 224 px)")


if __name__ == "__main__":
    main()
