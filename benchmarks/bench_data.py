"""Samples/s of data.CalvinDataset vs a naive reader, H=16, L=10, both views, 0 and 2 DataLoader workers.

    python benchmarks/bench_data.py [--root /tmp/robovlms_bench_calvin] [--frames 5200] [--samples 120]

Generates (once, reused afterwards) a CALVIN-layout split with every real key at its real shape and dtype
(rgb_static 200x200x3, rgb_gripper 84x84x3, depth and tactile arrays, float64 vectors; ~600 KB per frame,
np.savez), 64-frame language annotations every 32 frames. Three readers produce identical windows (checked):
  naive   one np.load per frame per sample: the H + L - 1 frames of the window, 5 arrays each (like the
          official loader), then the same chunking, normalization and resize_images
  ours    CalvinDataset: actions/state read once at construction, a sample decodes only its H frames' images
  cached  CalvinDataset(cache_images=True): frames resized once into uint8 memmaps, a sample is a slice
Prints samples/s of each and the speedups over naive. The main process runs torch with 1 thread, like a
DataLoader worker. The cache build (one pass over the frames) is timed separately.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import normalize_action  # noqa: E402

H, L, S = 16, 10, 224


def generate(root, n_frames, seed=0):
    split = root / "training"
    if (root / ".complete").exists():
        return
    (split / "lang_annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    statics = rng.integers(0, 256, (8, 200, 200, 3), dtype=np.uint8)
    wrists = rng.integers(0, 256, (8, 84, 84, 3), dtype=np.uint8)
    rec_len, recordings, ann, instr, tasks = 1040, [], [], [], []
    for r in range(max(1, n_frames // rec_len)):
        s = r * 2000  # frame ids jump between recordings, as in the real data
        recordings.append((s, s + rec_len - 1))
        for a in range(s, s + rec_len - 64, 32):
            ann.append((a, a + 64))
            tasks.append(f"task_{len(tasks) % 34}")
            instr.append(f"do {tasks[-1]}")
        for f in range(s, s + rec_len):
            rel = np.clip(rng.normal(0, 0.4, 7), -1, 1)
            rel[6] = 1.0 if (f // 50) % 2 else -1.0
            np.savez(split / f"episode_{f:07d}.npz", actions=rng.normal(0, 1, 7), rel_actions=rel,
                     robot_obs=rng.normal(0, 1, 15), scene_obs=rng.normal(0, 1, 24),
                     rgb_static=statics[f % 8], rgb_gripper=wrists[f % 8],
                     rgb_tactile=np.zeros((160, 120, 6), np.uint8), depth_static=np.ones((200, 200), np.float32),
                     depth_gripper=np.ones((84, 84), np.float32), depth_tactile=np.zeros((160, 120, 2), np.float32))
    np.save(split / "ep_start_end_ids.npy", np.array(recordings))
    lang = {"info": {"indx": ann, "episodes": []},
            "language": {"ann": instr, "task": tasks, "emb": np.zeros((len(ann), 1, 384), np.float32)}}
    np.save(split / "lang_annotations" / "auto_lang_ann.npy", lang, allow_pickle=True)
    (root / ".complete").touch()


class NaiveReader(torch.utils.data.Dataset):
    """Opens one npz per frame per sample; same window index, statistics and resize as `ds`."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        ds = self.ds
        seg = ds.win_seg[i]
        f0, end = int(ds.frame_ids[ds.win_t0[i]]), int(ds.frame_ids[ds.seg_end[seg]])
        frames = []
        for f in range(f0, f0 + H + L - 1):  # past the annotation end the last frame is re-read (official)
            with np.load(data.calvin_frame_path(ds.split_dir, min(f, end))) as z:
                frames.append({k: z[k] for k in ("rgb_static", "rgb_gripper", "rel_actions", "robot_obs", "scene_obs")})
        acts = np.stack([fr["rel_actions"] for fr in frames]).astype(np.float32)  # (H + L - 1, 7)
        fid = f0 + np.arange(H)[:, None] + np.arange(L)[None, :]  # (H, L)
        mask = fid <= end
        chunks = normalize_action(acts[fid - f0], ds.stats)  # (H, L, 7)
        chunks[~mask] = 0
        images = torch.empty((H, 2, 3, S, S), dtype=torch.uint8)  # same resize code path as CalvinDataset
        for v, k in enumerate(("rgb_static", "rgb_gripper")):
            data.resize_images(np.stack([fr[k] for fr in frames[:H]]), S, out=images[:, v])
        return {"images": images, "actions": torch.from_numpy(chunks), "action_mask": torch.from_numpy(mask)}


def rate(reader, idx, workers):
    if workers == 0:
        t = time.perf_counter()
        for i in idx:
            reader[int(i)]
        return len(idx) / (time.perf_counter() - t)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(reader, idx.tolist()), batch_size=4,
                                         num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is not counted
    t, n = time.perf_counter(), 0
    for b in it:
        n += len(b["actions"])
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="/tmp/robovlms_bench_calvin")
    p.add_argument("--frames", type=int, default=5200)
    p.add_argument("--samples", type=int, default=120)
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    t = time.perf_counter()
    generate(root, args.frames)
    print(f"dataset {root}: {len(list((root / 'training').glob('episode_*.npz')))} frames "
          f"(generation/reuse {time.perf_counter() - t:.1f} s)")
    for f in (root / "training").glob("episode_*.npz"):  # same page-cache state for every reader
        f.read_bytes()
    t = time.perf_counter()
    ours = data.CalvinDataset(root, "training", window=H, chunk=L, image_size=S)
    print(f"CalvinDataset index: {len(ours)} windows, {len(ours.frame_ids)} annotated frames, "
          f"built in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    cached = data.CalvinDataset(root, "training", window=H, chunk=L, image_size=S, cache_dir=root / "cache",
                                cache_images=True)
    print(f"image cache ready in {time.perf_counter() - t:.1f} s "
          f"({sum(os.path.getsize(p) for p in cached._cache.values()) / 2 ** 30:.2f} GiB)")
    naive = NaiveReader(ours)
    idx = np.random.default_rng(0).choice(len(ours), args.samples, replace=False)
    for i in idx[:3]:  # the three readers agree exactly
        a, b, c = naive[int(i)], ours[int(i)], cached[int(i)]
        for k in ("images", "actions", "action_mask"):
            assert torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]), f"readers disagree on {k} of window {i}"
    print(f"H={H} L={L} views=static+wrist S={S}, {args.samples} random windows per measurement")
    res = {}
    for workers in (0, 2):
        for name, reader in (("naive", naive), ("ours", ours), ("cached", cached)):
            res[name, workers] = rate(reader, idx, workers)
            print(f"  workers={workers}  {name:6s} {res[name, workers]:8.1f} samples/s")
    for workers in (0, 2):
        print(f"speedup over naive, workers={workers}: ours {res['ours', workers] / res['naive', workers]:.2f}x, "
              f"cached {res['cached', workers] / res['naive', workers]:.2f}x")


if __name__ == "__main__":
    main()
