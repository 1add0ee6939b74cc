"""Episodes on disk -> training windows: CALVIN's own format, the project's HDF5 format, mixtures.

Stands on: torch, numpy, h5py (with backbones.py, the bottom floor: no module of ours). Offers the action
arithmetic every dataset applies and the policy inverts (statistics, eq. (5)-(6) normalization), image
preprocessing, the episode format and its readers.

Read top to bottom:
  0. actions: compute_action_stats (q01/q99, outlier refusal), normalize_action / unnormalize_action eq. (5)-(6)
  1. image preprocessing shared by training and Policy.act: resize_images, normalize_images, random_shift
  2. the HDF5 episode format: EpisodeWriter (crash-safe, flushed per episode); schema in docs/hdf5_format.md
  3. windows: H observation frames, each with the chunk of its next L actions, masked past the segment end
  4. readers: HDF5Dataset, CalvinDataset (the dataset exactly as distributed), MixtureDataset (§II-E co-training)
     LeRobotDataset (v3.0 / v2.x folders, PyAV video) and RLDSDataset (TFDS TFRecord shards, no TensorFlow),
     open_dataset(path) picks the reader, convert_to_hdf5 (docs/data_formats.md)
  5. make_dataloader: workers + DistributedSampler, for scripts and notebooks (train.py builds each rank's
     batches itself, train.rank_batches, so that a step sees the same samples for any number of processes)

A window (one sample) is a dict:
  images       uint8 (H, V, 3, S, S)  views in the order of `views`, resized to the backbone's size S
  actions      float32 (H, L, 7)      actions[t, j] = action of frame t + j, normalized with this dataset's stats
  action_mask  bool (H, L)            False where frame t + j lies past the end of the segment (values there are 0)
  instruction, task, dataset (str)    dataset = the key of the dataset whose statistics normalized the actions
  state        float32 (H, D)         only with state=True
H and L follow the paper (the official code calls them window_size and fwd_pred_next_n).
"""

import hashlib
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ACTION_DIM = 7  # [dx, dy, dz, droll, dpitch, dyaw, gripper]: 6 pose dims + 1 binary gripper
POSE_DIM = 6
VIEWS = ("static", "wrist")  # third-person camera, gripper camera
SHIFT_PAD = {"static": 10, "wrist": 4}  # official random-shift padding in pixels (rgb_pad / gripper_pad)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP / Kosmos-2 image processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """Bad input data; the message names the file, the episode and the problem."""


# -----------------------------------------------------------------------------------------------------------
# 0a. Action statistics
# -----------------------------------------------------------------------------------------------------------

# Above this many rows, quantiles come from a streaming histogram instead of an exact sort (see below).
EXACT_QUANTILE_MAX_ROWS = 500_000
HIST_BINS = 8192  # histogram resolution: quantile error <= (max - min) / 8192 ~ 1.2e-4 of the range
STATS_CHUNK_ROWS = 262_144  # rows processed at a time in the streaming path


# Implausible actions (a corrupt value such as 1e30 in a small dataset moves q99 to ~1e29 and with it the whole
# normalization): a pose value farther than OUTLIER_FACTOR x the robust spread (q90 - q10 of its dimension) from
# the dimension's median is refused. q10/q90 stay put unless > 10% of the rows are corrupt; a legit action 100x
# the central 80% spread away from the median does not occur in CALVIN, Meta-World or teleoperation deltas.
OUTLIER_FACTOR = 100.0
OUTLIER_SAMPLE_ROWS = 200_000  # robust quantiles of big datasets come from an evenly strided sample of rows


def find_implausible_actions(actions, factor=None):
    """-> [(row, dim, value, (low, high))] of pose values (dims 0-5) outside median +- factor x (q90 - q10), at
    most the first 1000 (enough to name them; a dataset with more is broken as a whole).

    A dimension whose q10 == q90 (constant for most rows, e.g. an unused rotation) borrows the largest spread of
    the other pose dims; if every pose dim is constant nothing is flagged. The gripper (dim 6) is binarized by
    normalize_action and is never checked. actions: (N, D) array-like (np.memmap, h5py datasets work)."""
    factor = OUTLIER_FACTOR if factor is None else factor
    n, d = actions.shape
    p = min(d, POSE_DIM)
    step = max(1, n // OUTLIER_SAMPLE_ROWS)
    sample = np.asarray(actions[::step], dtype=np.float64)[:, :p]  # (<= ~2 x OUTLIER_SAMPLE_ROWS, p)
    med = np.median(sample, 0)
    spread = np.quantile(sample, 0.9, 0) - np.quantile(sample, 0.1, 0)  # (p,)
    if not (spread > DEGENERATE_RANGE).any():
        return []
    spread = np.where(spread > DEGENERATE_RANGE, spread, spread.max())
    limit = factor * spread
    out = []
    for i in range(0, n, STATS_CHUNK_ROWS):
        rows = np.asarray(actions[i:i + STATS_CHUNK_ROWS], dtype=np.float64)[:, :p]
        for r, j in np.argwhere(np.abs(rows - med) > limit)[:1000 - len(out)]:
            out.append((i + int(r), int(j), float(rows[r, j]), (float(med[j] - limit[j]), float(med[j] + limit[j]))))
        if len(out) >= 1000:
            break
    return out


def compute_action_stats(actions, where=None):
    """Per-dimension statistics of an action array (N, D), D is usually 7.

    Refuses non-finite actions and implausible ones (find_implausible_actions: farther than OUTLIER_FACTOR x the
    robust spread from the median); where(row) -> str names a row in the error (default "action row {row}";
    the data readers pass the file, episode and frame).

    Returns {"q01", "q99", "mean", "std", "min", "max"}: each a list of D floats, plus "count".
    Quantiles are exact (numpy's linear interpolation) for N <= EXACT_QUANTILE_MAX_ROWS. Above that, two
    streaming passes over row chunks (works on np.memmap / h5py datasets too, no sorted copy is ever held):
    pass 1 gets min/max/mean/std in float64, pass 2 fills a HIST_BINS-bin histogram per dimension between
    min and max and reads the 1% / 99% quantiles off the cumulative counts with linear interpolation inside
    the bin. The error is below one bin width, i.e. < 1.3e-4 x (max - min), well inside 1e-3 of the range.
    """
    if len(getattr(actions, "shape", ())) != 2:
        raise ValueError(f"compute_action_stats expects actions of shape (N, D), got shape "
                         f"{getattr(actions, 'shape', None)}; stack your episodes' actions first")
    n, d = actions.shape
    if n == 0:
        raise ValueError("compute_action_stats got 0 actions: the dataset is empty (check its path and filters)")

    where = where or (lambda row: f"action row {row}")

    def chunks():
        for i in range(0, n, STATS_CHUNK_ROWS):
            rows = np.asarray(actions[i:i + STATS_CHUNK_ROWS], dtype=np.float64)
            if not np.isfinite(rows).all():
                row, dim = np.argwhere(~np.isfinite(rows))[0]
                raise ValueError(f"{where(i + int(row))}, dim {dim} is {rows[row, dim]}: statistics need finite "
                                 f"actions; fix or drop the episode that contains it")
            yield rows

    # pass 1: moments and range (float64 sums are accurate enough for millions of rows)
    s, s2 = np.zeros(d), np.zeros(d)
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    for rows in chunks():
        s += rows.sum(0)
        s2 += (rows * rows).sum(0)
        lo, hi = np.minimum(lo, rows.min(0)), np.maximum(hi, rows.max(0))
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    bad = find_implausible_actions(actions)
    if bad:
        row, dim, value, (lo_ok, hi_ok) = bad[0]
        n_bad = f"{len(bad)}{'+' if len(bad) >= 1000 else ''}"
        raise ValueError(f"{where(row)}, dim {dim} (0-5 pose) is {value:.6g}, implausibly far from the other "
                         f"actions (this dimension's plausible range is [{lo_ok:.4g}, {hi_ok:.4g}]: median +- "
                         f"{OUTLIER_FACTOR:g} x its q10-q90 spread); {n_bad} value(s) flagged. It would move the "
                         f"q01/q99 normalization bounds: fix or drop that episode (or set data.OUTLIER_FACTOR)")

    if n <= EXACT_QUANTILE_MAX_ROWS:
        a = np.asarray(actions[:], dtype=np.float64)
        q01, q99 = np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0)
    else:
        # pass 2: per-dimension histograms between min and max
        width = np.where(hi > lo, (hi - lo) / HIST_BINS, 1.0)
        counts = np.zeros((d, HIST_BINS), dtype=np.int64)
        for rows in chunks():
            idx = np.clip(((rows - lo) / width).astype(np.int64), 0, HIST_BINS - 1)  # (n_chunk, d)
            for j in range(d):
                counts[j] += np.bincount(idx[:, j], minlength=HIST_BINS)
        q01, q99 = np.empty(d), np.empty(d)
        for j in range(d):
            cdf = np.cumsum(counts[j])
            for q, out in ((0.01, q01), (0.99, q99)):
                target = q * (n - 1) + 1  # rank (1-based) of the sample at quantile q
                b = int(np.searchsorted(cdf, target))  # first bin whose cumulative count reaches it
                below = cdf[b - 1] if b > 0 else 0
                frac = (target - below) / max(counts[j, b], 1)  # position inside the bin
                out[j] = lo[j] + (b + min(frac, 1.0)) * width[j] if hi[j] > lo[j] else lo[j]
    return {"q01": q01.tolist(), "q99": q99.tolist(), "mean": mean.tolist(), "std": std.tolist(),
            "min": lo.tolist(), "max": hi.tolist(), "count": int(n)}


# -----------------------------------------------------------------------------------------------------------
# 0b. Action normalization, eq. (5)-(6)
# -----------------------------------------------------------------------------------------------------------

GRIPPER_THRESHOLD = 0.5  # raw gripper > 0.5 means open: maps {0, 1} and {-1, 1} alike onto {-1, +1}
OFFICIAL_BOUND = 0.65  # official CALVIN configs: norm_min -0.65, norm_max 0.65 (clip, then divide by 0.65)
ACTION_NORMS = ("quantile", "bounds")  # eq. (5)-(6) on q01/q99 | the official code's fixed ±OFFICIAL_BOUND
DEGENERATE_RANGE = 1e-8  # q99 - q01 below this: the dimension is constant, normalize it to 0


def check_finite_actions(a, what):
    """Raise ValueError naming the action dims of `a` (..., 7) (numpy or torch) that hold NaN/inf."""
    bad = ~torch.isfinite(a) if torch.is_tensor(a) else ~np.isfinite(a)
    if bad.any():
        dims = sorted({int(i) for i in (bad.nonzero()[:, -1] if torch.is_tensor(a) else np.nonzero(bad)[-1])})
        raise ValueError(f"{what}: found NaN/inf in action dim(s) {dims} (0-5 pose, 6 gripper); "
                         f"check the data source or the model output for that dimension")


def _bounds(a, stats, mode, bound):
    """Per-dim (low, high) of the 6 pose dims, as arrays/tensors matching `a`."""
    if mode == "quantile":
        for key in ("q01", "q99"):
            if key not in stats:
                raise KeyError(f"action statistics lack '{key}' (have {sorted(stats)}); "
                               f"recompute them with compute_action_stats")
        lo, hi = stats["q01"][:POSE_DIM], stats["q99"][:POSE_DIM]
    elif mode == "bounds":
        lo, hi = [-bound] * POSE_DIM, [bound] * POSE_DIM
    else:
        raise ValueError(f"normalization mode must be 'quantile' (eq. 5-6, q01/q99) or 'bounds' "
                         f"(official fixed ±{OFFICIAL_BOUND}), got {mode!r}")
    if torch.is_tensor(a):
        return (torch.tensor(lo, dtype=a.dtype, device=a.device), torch.tensor(hi, dtype=a.dtype, device=a.device))
    return np.asarray(lo, dtype=a.dtype), np.asarray(hi, dtype=a.dtype)


def _as_float(a):
    if torch.is_tensor(a):
        return a if a.is_floating_point() else a.float()
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float32)


def normalize_action(a, stats, mode="quantile", bound=OFFICIAL_BOUND):
    """Raw actions (..., 7) -> normalized actions in [-1, 1] (numpy or torch, any leading shape).

    Pose dims 0-5, eq. (5)-(6): clamp to [q01, q99], then map linearly onto [-1, 1]. A dim whose q01 == q99 is
    constant in the data and maps to 0 (no division by zero). mode="bounds" is the official code's variant:
    clamp to ±bound and divide by bound.
    Gripper dim 6 is binary and never quantile-scaled: raw > 0.5 -> +1 (open), else -1 (closed), which is
    correct for both {0, 1} and {-1, +1} conventions.
    """
    a = _as_float(a)
    if a.shape[-1] != ACTION_DIM:
        raise ValueError(f"expected actions with last dim {ACTION_DIM}, got shape {tuple(a.shape)}")
    check_finite_actions(a, "normalize_action")
    lo, hi = _bounds(a, stats, mode, bound)
    lib = torch if torch.is_tensor(a) else np
    span = hi - lo
    ok = span > DEGENERATE_RANGE
    safe = lib.where(ok, span, lib.ones_like(span))
    pose = lib.minimum(lib.maximum(a[..., :POSE_DIM], lo), hi)  # clamp, eq. (5)
    pose = lib.where(ok, 2 * (pose - lo) / safe - 1, lib.zeros_like(pose))  # eq. (6)
    grip = lib.where(a[..., POSE_DIM:] > GRIPPER_THRESHOLD, 1.0, -1.0)
    if torch.is_tensor(a):
        return torch.cat([pose, grip.to(a.dtype)], -1)
    return np.concatenate([pose, grip.astype(a.dtype)], -1)


def unnormalize_action(a, stats, mode="quantile", bound=OFFICIAL_BOUND):
    """Inverse of normalize_action: normalized (..., 7) -> the dataset's own units.

    Pose values outside [-1, 1] are clamped first (the model's tanh head stays inside anyway). A constant
    dim returns its q01. The gripper becomes exactly +1 (g > 0, open) or -1 (closed).
    """
    a = _as_float(a)
    if a.shape[-1] != ACTION_DIM:
        raise ValueError(f"expected actions with last dim {ACTION_DIM}, got shape {tuple(a.shape)}")
    check_finite_actions(a, "unnormalize_action")
    lo, hi = _bounds(a, stats, mode, bound)
    lib = torch if torch.is_tensor(a) else np
    pose = lib.minimum(lib.maximum(a[..., :POSE_DIM], -lib.ones_like(lo)), lib.ones_like(hi))
    pose = (pose + 1) / 2 * (hi - lo) + lo
    grip = lib.where(a[..., POSE_DIM:] > 0, 1.0, -1.0)
    if torch.is_tensor(a):
        return torch.cat([pose, grip.to(a.dtype)], -1)
    return np.concatenate([pose, grip.astype(a.dtype)], -1)




# -----------------------------------------------------------------------------------------------------------
# 1. Image preprocessing (one path for training and for Policy.act)
# -----------------------------------------------------------------------------------------------------------

def resize_images(images, size, out=None):
    """uint8 images (..., h, w, 3) (numpy or tensor) -> uint8 tensor (..., 3, size, size).

    Bicubic with antialiasing, like the CLIP/Kosmos image processors the official code uses (200 -> 224 static,
    84 -> 224 wrist). Square output: the aspect ratio is not kept (CALVIN and our cameras are square anyway).
    out: optional uint8 tensor (..., 3, size, size) to write into (saves a copy when stacking views).
    """
    if not torch.is_tensor(images):
        images = np.asarray(images)
        if any(st < 0 for st in images.strides):  # a flipped view (img[..., ::-1], BGR -> RGB): torch needs a copy
            images = np.ascontiguousarray(images)
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"resize_images expects uint8 images (..., h, w, 3), got {x.dtype} {tuple(x.shape)}")
    lead, (h, w) = x.shape[:-3], x.shape[-3:-1]
    x = x.reshape(-1, h, w, 3).permute(0, 3, 1, 2)  # (N, 3, h, w) as a channels-last view: no copy
    if (h, w) != (size, size):
        try:  # torch's uint8 channels-last CPU kernel: ~10x faster than going through float
            if x.device.type != "cpu":
                raise RuntimeError("uint8 kernel is CPU only")
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        except RuntimeError:  # GPU tensors (and torch builds without the uint8 kernel)
            x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x.reshape(*lead, 3, size, size)  # still channels-last in memory
    if x.device.type != "cpu":
        return x.contiguous() if out is None else out.copy_(x)
    # to planar (..., 3, S, S) memory: for uint8, numpy's strided copy is several times faster than torch's
    # copy_ / contiguous() (docs/history.md)
    out = torch.empty((*lead, 3, size, size), dtype=torch.uint8) if out is None else out
    np.copyto(out.numpy(), x.numpy())
    return out


def normalize_images(x, mean, std):
    """uint8 (..., 3, S, S) -> float (x / 255 - mean) / std, per channel."""
    if x.shape[-3] != 3:
        raise ValueError(f"normalize_images expects (..., 3, S, S), got {tuple(x.shape)}")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def random_shift(x, pad, generator=None):
    """Random-shift augmentation (DrQ / official RandomShiftsAug): replicate-pad by `pad`, crop back to S x S.

    x: (..., C, S, S), float or uint8; every leading index (every frame) gets its own integer shift in
    [-pad, pad] per axis. The official code draws from {-pad+1, ..., pad} (randint(1, 2 pad + 1)) through
    grid_sample; integer-exact crops give the same images without interpolation.
    """
    if pad <= 0:
        return x
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    xb = x.reshape(-1, c, h, w)
    b = xb.shape[0]
    padded = F.pad(xb.float() if not xb.is_floating_point() else xb, (pad, pad, pad, pad), mode="replicate")
    padded = padded.to(xb.dtype)  # (B, C, h + 2p, w + 2p)
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).to(x.device)  # (B, 2) top-left corner
    rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (B, h)
    cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (B, w)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))  # (B, C, h, w + 2p)
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, h, w)
    return out.reshape(*lead, c, h, w)


# -----------------------------------------------------------------------------------------------------------
# 2. The HDF5 episode format (docs/hdf5_format.md)
# -----------------------------------------------------------------------------------------------------------

HDF5_FORMAT = "robovlms-episodes"
HDF5_VERSION = 1
REQUIRED_FILE_ATTRS = ("control_hz", "action_convention")


def _check_episode_arrays(images, actions, state, where):
    """Validate one episode's arrays; raise DataError naming `where` (file + episode) and the problem."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
        raise DataError(f"{where}: actions must have shape (T, {ACTION_DIM}), got {actions.shape}")
    t = actions.shape[0]
    if t == 0:
        raise DataError(f"{where}: episode has 0 frames")
    if not np.isfinite(actions).all():
        row, dim = np.argwhere(~np.isfinite(actions))[0]
        raise DataError(f"{where}: action at frame {row}, dim {dim} is {actions[row, dim]} (NaN/inf); "
                        f"fix the recording or drop this episode")
    if not images:
        raise DataError(f"{where}: no camera images given (expected a dict like {{'static': (T, h, w, 3)}})")
    for view, im in images.items():
        if view not in VIEWS:
            raise DataError(f"{where}: unknown view {view!r}; expected one of {VIEWS}")
        shape, dtype = tuple(im.shape), im.dtype
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise DataError(f"{where}: images[{view!r}] must be uint8 (T, h, w, 3), got {dtype} {shape}")
        if shape[0] != t:
            raise DataError(f"{where}: images[{view!r}] has {shape[0]} frames but actions have {t}: "
                            f"every array of an episode needs one row per control step")
    if state is not None:
        state = np.asarray(state)
        if state.ndim != 2 or state.shape[0] != t:
            raise DataError(f"{where}: state must have shape (T={t}, D), got {state.shape}")
        if not np.isfinite(state).all():
            raise DataError(f"{where}: state contains NaN/inf")
    return t


class EpisodeWriter:
    """Appends episodes to one HDF5 file; crash-safe by flushing each finished episode.

        with EpisodeWriter("demos.h5", {"control_hz": 10, "action_convention": "..."}) as w:
            w.add_episode({"static": (T,h,w,3) uint8, "wrist": ...}, actions (T,7), "pick the cube", "pick", state)

    Each episode is written to its own group and marked complete (attr `complete=1`) only after all its
    arrays are written; then the file is flushed (H5Fflush) and fsync'ed. So when add_episode returns, the
    episode is on disk; a process killed while writing the next one leaves the earlier episodes intact
    (tests/test_data.py kills a writer mid-episode to check). Readers skip groups without the marker, and a
    writer reopening the file removes them. An existing file is appended to; its file attributes must agree.
    """

    def __init__(self, path, attrs, compression=None):
        import h5py

        self.path = Path(path)
        attrs = dict(attrs)
        missing = [k for k in REQUIRED_FILE_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"EpisodeWriter({self.path}): file attrs must include {missing} (e.g. control_hz=10, "
                             f"action_convention='delta xyz (m) + delta euler xyz (rad) + gripper 1 open/-1 "
                             f"closed'); got {sorted(attrs)}")
        self.compression = compression  # None (fastest reads) or "gzip" / "lzf"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        exists = self.path.exists()
        try:
            self.f = h5py.File(self.path, "a")
        except OSError as e:
            raise DataError(f"{self.path}: cannot open for appending ({e}); is it a corrupt or non-HDF5 file?") from e
        if exists and "episodes" in self.f:
            if self.f.attrs.get("format") != HDF5_FORMAT:
                self.f.close()
                raise DataError(f"{self.path}: exists but is not a {HDF5_FORMAT} file")
            for k, v in attrs.items():
                old = self.f.attrs.get(k)
                if old is not None and _attr_str(old) != _attr_str(v):
                    self.f.close()
                    raise DataError(f"{self.path}: file attr {k!r} is {_attr_str(old)!r} but this writer got "
                                    f"{_attr_str(v)!r}; write to a new file instead of mixing conventions")
            for name in [n for n, g in self.f["episodes"].items() if not g.attrs.get("complete", 0)]:
                del self.f["episodes"][name]  # left over from an interrupted write
        self.f.attrs["format"] = HDF5_FORMAT
        self.f.attrs["format_version"] = HDF5_VERSION
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.episodes = self.f.require_group("episodes")
        self._sync()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if getattr(self, "f", None) is not None:
            self.f.close()
            self.f = None

    def _sync(self):
        self.f.flush()
        try:  # H5Fflush hands the data to the OS; fsync also survives a power cut
            fd = os.open(self.path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass

    def add_episode(self, images, actions, instruction, task, state=None):
        """images {view: (T, h, w, 3) uint8}, actions (T, 7) in the robot's own units, state (T, D) or None."""
        if self.f is None:
            raise RuntimeError(f"EpisodeWriter({self.path}) is closed")
        name = f"ep_{len(self.episodes):06d}"
        where = f"{self.path} episode {name} ({instruction!r})"
        images = {v: np.asarray(im) for v, im in images.items()}
        t = _check_episode_arrays(images, actions, state, where)
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: instruction must be a non-empty string, got {instruction!r}")
        if not isinstance(task, str):
            raise DataError(f"{where}: task must be a string, got {task!r}")
        while name in self.episodes:  # numbering stays unique even after removed partial episodes
            name = f"ep_{int(name[3:]) + 1:06d}"
        g = self.episodes.create_group(name)
        for view, im in images.items():
            g.create_dataset(f"images/{view}", data=im, chunks=(1, *im.shape[1:]), compression=self.compression)
        g.create_dataset("actions", data=np.asarray(actions, dtype=np.float32))
        if state is not None:
            g.create_dataset("state", data=np.asarray(state, dtype=np.float32))
        g.attrs["instruction"] = instruction
        g.attrs["task"] = task
        g.attrs["length"] = t
        g.attrs["complete"] = 1  # commit marker: written last
        self._sync()
        return name


def _attr_str(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return str(v.item())
    return str(v)


# -----------------------------------------------------------------------------------------------------------
# 3. Windows over segments (shared by every reader)
# -----------------------------------------------------------------------------------------------------------

def select_segments(tasks, few_shot=None, fraction=None, seed=0):
    """Indices of the segments to keep (sorted). tasks: list[str], one per segment.

    few_shot=k keeps k segments per task (paper Extended Fig. 5 uses k = 10), fraction=f keeps round(f * n)
    segments overall (paper: 0.1x of ABCD); both drawn with a seeded generator, so the choice is reproducible.
    """
    idx = np.arange(len(tasks))
    rng = np.random.default_rng(seed)
    if few_shot is not None:
        if not isinstance(few_shot, (int, np.integer)) or few_shot < 1:
            raise ValueError(f"few_shot must be a number k >= 1 of segments per task, got {few_shot!r} "
                             f"(CalvinDataset also takes the official {{task: [[start, end], ...]}} file)")
        keep = []
        for task in sorted(set(tasks)):
            mine = idx[np.asarray(tasks, dtype=object) == task]
            keep.extend(rng.permutation(mine)[:int(few_shot)].tolist())
        idx = np.asarray(sorted(keep), dtype=np.int64)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = max(1, int(round(fraction * len(idx))))
        idx = np.sort(rng.permutation(idx)[:n])
    return idx


def _check_window_args(window, chunk, views, image_size):
    if int(window) < 1 or int(chunk) < 1:
        raise ValueError(f"window (H) and chunk (L) must be >= 1, got H={window}, L={chunk}")
    views = tuple(views)
    if not views or len(set(views)) != len(views) or any(v not in VIEWS for v in views):
        raise ValueError(f"views must be a non-empty subset of {VIEWS} without repeats, got {views}")
    if int(image_size) < 8:
        raise ValueError(f"image_size must be the backbone's square input size (e.g. 224), got {image_size}")
    return int(window), int(chunk), views, int(image_size)


class WindowDataset(torch.utils.data.Dataset):
    """Map-style dataset of windows. Subclasses fill a flat frame table and call _build(), and load images.

    Frame table: raw actions (N, 7) and optionally state (N, D), one row per frame. A segment is an inclusive
    row range [start, end] with one instruction (a CALVIN language annotation, or one HDF5 episode). Window i
    starts at row t0 with all H frames inside its segment (t0 in [start, end - H + 1]); frame t's chunk holds
    the actions of rows t .. t + L - 1, and entries past `end` are masked and zero, never invented. (The
    official loader also drops the action of the segment's last frame; here it is kept.)
    """

    def _build(self, key, actions, state, seg_start, seg_end, instructions, tasks, window, chunk, views,
               image_size, stats, norm_mode, few_shot=None, fraction=None, seed=0):
        self.key, self.norm_mode = str(key), norm_mode
        self.window, self.chunk, self.views, self.image_size = _check_window_args(window, chunk, views, image_size)
        keep = self.seg_keep = select_segments(list(tasks), few_shot, fraction, seed)  # indices into the input
        self.seg_start = np.asarray(seg_start, dtype=np.int64)[keep]  # (S,) first row of each segment
        self.seg_end = np.asarray(seg_end, dtype=np.int64)[keep]  # (S,) last row (inclusive)
        self.instructions = [instructions[i] for i in keep]
        self.tasks = [tasks[i] for i in keep]
        self.raw_actions = np.asarray(actions, dtype=np.float32)  # (N, 7)
        self.state = None if state is None else np.asarray(state, dtype=np.float32)  # (N, D)
        if stats is None:  # statistics of exactly the frames this dataset trains on
            if len(self.seg_start) == 0:
                raise DataError(f"dataset {self.key!r}: no segments left to compute statistics from")
            rows = np.unique(np.concatenate([np.arange(s, e + 1) for s, e in zip(self.seg_start, self.seg_end)]))
            try:  # non-finite or implausible actions (find_implausible_actions), named by episode and frame
                stats = compute_action_stats(self.raw_actions[rows], where=lambda r: self._where(int(rows[r])))
            except ValueError as e:
                raise DataError(f"dataset {self.key!r}: {e}") from None
        self.stats = stats
        self.actions = normalize_action(self.raw_actions, stats, mode=norm_mode).astype(np.float32)  # (N, 7)
        h = self.window
        lengths = self.seg_end - self.seg_start + 1
        self.n_short = int((lengths < h).sum())  # segments shorter than H give no window
        counts = np.maximum(lengths - h + 1, 0)
        self.win_seg = np.repeat(np.arange(len(counts)), counts)  # (M,) segment of each window
        first = np.repeat(np.cumsum(counts) - counts, counts)
        self.win_t0 = self.seg_start[self.win_seg] + np.arange(counts.sum()) - first  # (M,) first row

    @property
    def stats_by_key(self):
        return {self.key: self.stats}

    def _where(self, row):
        """Row of the frame table -> "<file> episode <name> frame <t>" (for error messages)."""
        seg = int(np.searchsorted(self.seg_start, row, side="right")) - 1
        return f"segment {seg} ({self.instructions[seg]!r}) frame {row - int(self.seg_start[seg])}"

    @property
    def camera_sizes(self):
        """{view: [h, w]} of this dataset's camera images (stored in VLAConfig.camera_sizes by train.py, checked by
        Policy.act); a view whose episodes disagree on the size is left out."""
        shapes = getattr(self, "image_shapes", {})
        return {v: [int(shapes[v][0]), int(shapes[v][1])] for v in self.views if shapes.get(v) is not None}

    def __len__(self):
        return len(self.win_t0)

    def window_rows(self, i):
        """(frame rows (H,), chunk rows (H, L), mask (H, L)) of window i: the index arithmetic, without I/O."""
        t0, end = int(self.win_t0[i]), int(self.seg_end[self.win_seg[i]])
        frames = t0 + np.arange(self.window)  # (H,)
        rows = frames[:, None] + np.arange(self.chunk)[None, :]  # (H, L)
        return frames, rows, rows <= end

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = i % len(self)
        frames, rows, mask = self.window_rows(i)
        end = self.seg_end[self.win_seg[i]]
        actions = self.actions[np.minimum(rows, end)]  # (H, L, 7)
        actions[~mask] = 0.0
        seg = int(self.win_seg[i])
        out = {"images": self._images(seg, frames),  # (H, V, 3, S, S) uint8
               "actions": torch.from_numpy(actions), "action_mask": torch.from_numpy(mask),
               "instruction": self.instructions[seg], "task": self.tasks[seg], "dataset": self.key}
        if self.with_state:
            out["state"] = torch.from_numpy(self.state[frames])  # (H, D)
        return out

    def _images(self, seg, frames):
        """uint8 (H, V, 3, S, S) for rows `frames` of segment `seg`."""
        images = self._load_frames(seg, frames)  # {view: (H, h, w, 3) uint8}
        out = torch.empty((len(frames), len(self.views), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for k, v in enumerate(self.views):
            resize_images(images[v], self.image_size, out=out[:, k])
        return out  # (H, V, 3, S, S)

    def _load_frames(self, seg, frames):
        raise NotImplementedError


def save_stats(stats_by_key, path):
    """{dataset_key: stats} -> JSON file (written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats_by_key, indent=1))
    os.replace(tmp, path)


def load_stats(path):
    return json.loads(Path(path).read_text())


# -----------------------------------------------------------------------------------------------------------
# 4a. HDF5 reader
# -----------------------------------------------------------------------------------------------------------

def split_episodes(n, split, val_fraction, seed, where):
    """A held-out validation split of whole episodes -> (chosen: the indices of `split`'s episodes, val: the set
    of held-out ones). split "all" holds none out; "train" / "val": a seeded choice of round(val_fraction * n)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n)) if split != "all" else 0
    if split != "all" and (n_val < 1 or n_val >= n):
        raise DataError(f"{where}: val_fraction={val_fraction} of {n} episodes leaves an empty "
                        f"train or val split; record more episodes or change val_fraction")
    val = set(order[:n_val].tolist())
    if split == "all":
        chosen = list(range(n))
    elif split in ("train", "val"):
        chosen = [i for i in range(n) if (i in val) == (split == "val")]
    else:
        raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
    return chosen, val


class HDF5Dataset(WindowDataset):
    """Windows from one or more HDF5 episode files (docs/hdf5_format.md). One segment = one episode.

    split: "all", or "train" / "val" for a held-out validation split of whole episodes (a seeded choice of
    round(val_fraction * n) episodes); statistics default to the train part's, also for split="val".
    skip_bad: skip (and count in .n_bad) episodes or files that fail validation instead of raising.
    """

    def __init__(self, path_or_paths, window, chunk, views=VIEWS, image_size=224, stats=None, key=None,
                 split="all", val_fraction=0.1, seed=0, few_shot=None, fraction=None, state=False,
                 norm_mode="quantile", skip_bad=False):
        paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
        if not paths:
            raise ValueError("HDF5Dataset needs at least one file path")
        self.paths = [str(p) for p in paths]
        window, chunk, views, image_size = _check_window_args(window, chunk, views, image_size)
        self.with_state, self.n_bad, self.n_incomplete, self.bad = bool(state), 0, 0, []
        self.image_shapes = {}  # {view: (h, w)} shared by every episode, None if they differ
        eps, acts, sts = [], [], []  # eps: (file index, episode name, instruction, task, n frames)
        for fi, path in enumerate(self.paths):
            file_key = self._scan_file(fi, path, views, state, skip_bad, eps, acts, sts)
            key = file_key if key is None else key
        if not eps:
            raise DataError(f"{self.paths}: no complete, valid episodes found")
        chosen, val = split_episodes(len(eps), split, val_fraction, seed, self.paths)
        if stats is None and split == "val":  # normalize held-out episodes with the training statistics
            stats = compute_action_stats(np.concatenate([acts[i] for i in range(len(eps)) if i not in val]))
        self.episodes = [eps[i][:2] for i in chosen]  # (file index, episode name) per segment
        lengths = np.array([eps[i][4] for i in chosen], dtype=np.int64)
        start = np.cumsum(lengths) - lengths
        self._row_episodes = (start, list(self.episodes))  # first row of each chosen episode, (file, name) (_where)
        self._files, self._pid = {}, None
        self._build(key, np.concatenate([acts[i] for i in chosen]),
                    np.concatenate([sts[i] for i in chosen]) if state else None, start, start + lengths - 1,
                    [eps[i][2] for i in chosen], [eps[i][3] for i in chosen], window, chunk, views, image_size,
                    stats, norm_mode, few_shot, fraction, seed)
        self.episodes = [self.episodes[i] for i in self.seg_keep]
        if self.n_bad:
            warnings.warn(f"HDF5Dataset skipped {self.n_bad} bad file(s)/episode(s) (skip_bad=True); first: {self.bad[0]}")

    def _scan_file(self, fi, path, views, state, skip_bad, eps, acts, sts):
        """Append the complete, valid episodes of file `fi` to eps / acts / sts (skip_bad: count and skip the bad
        ones, else raise) -> the file's dataset key, None if the file was skipped."""
        import h5py

        if not os.path.isfile(path):
            raise DataError(f"{path}: HDF5 file not found")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            self._bad(f"{path}: cannot open as HDF5 ({e}); the file is corrupt or truncated", skip_bad)
            return None
        with f:
            if f.attrs.get("format") != HDF5_FORMAT or "episodes" not in f:
                self._bad(f"{path}: not a {HDF5_FORMAT} file (no 'format' attr / 'episodes' group); "
                          f"write it with data.EpisodeWriter (schema: docs/hdf5_format.md)", skip_bad)
                return None
            key = _attr_str(f.attrs.get("dataset_key", Path(path).stem))
            for name in sorted(f["episodes"]):
                g, where = f["episodes"][name], f"{path} episode {name}"
                if not g.attrs.get("complete", 0):
                    self.n_incomplete += 1  # interrupted write: never part of the data
                    continue
                episode = self._read_episode(g, where, views, state, skip_bad, sts)
                if episode is None:
                    continue
                self._note_image_shapes(g, views)
                eps.append((fi, name, _attr_str(g.attrs["instruction"]), _attr_str(g.attrs.get("task", "")),
                            len(episode[0])))
                acts.append(episode[0])
                sts.append(episode[1])
        return key

    def _read_episode(self, g, where, views, state, skip_bad, sts):
        """(actions (T, 7), state or None) of one validated episode; None if skip_bad skipped it."""
        try:
            a, s = _read_hdf5_episode(g, views, state, where)
            if s is not None and sts and s.shape[1] != sts[0].shape[1]:
                raise DataError(f"{where}: state has {s.shape[1]} dims, earlier episodes {sts[0].shape[1]}")
        except (DataError, KeyError, OSError) as e:
            self._bad(e if isinstance(e, DataError) else f"{where}: unreadable ({e})", skip_bad)
            return None
        return a, s

    def _note_image_shapes(self, g, views):
        for v in views:
            hw = tuple(g["images"][v].shape[1:3])
            if self.image_shapes.setdefault(v, hw) != hw:
                self.image_shapes[v] = None  # mixed camera sizes: not recorded

    def _where(self, row):
        start, episodes = self._row_episodes
        e = int(np.searchsorted(start, row, side="right")) - 1
        fi, name = episodes[e]
        return f"{self.paths[fi]} episode {name} frame {row - int(start[e])}"

    def _bad(self, msg, skip_bad):
        if not skip_bad:
            raise DataError(str(msg))
        self.n_bad += 1
        self.bad.append(str(msg))

    def _load_frames(self, seg, frames):
        import h5py

        if self._pid != os.getpid():  # h5py handles must not cross a fork: reopen in each worker
            self._files, self._pid = {}, os.getpid()
        fi, name = self.episodes[seg]
        if fi not in self._files:
            self._files[fi] = h5py.File(self.paths[fi], "r")
        lo = int(frames[0] - self.seg_start[seg])
        try:
            g = self._files[fi]["episodes"][name]
            return {v: g["images"][v][lo:lo + len(frames)] for v in self.views}
        except (OSError, KeyError) as e:
            raise DataError(f"{self.paths[fi]} episode {name}: cannot read frames {lo}..{lo + len(frames) - 1} "
                            f"({e}); was the file modified or damaged after the dataset was opened?") from e

    def __getstate__(self):  # DataLoader workers get a copy without open file handles
        d = dict(self.__dict__)
        d["_files"], d["_pid"] = {}, None
        return d


def _read_hdf5_episode(g, views, with_state, where):
    """Validate one episode group from its metadata and actions; return (actions (T, 7), state or None)."""
    for k in ("instruction", "actions"):
        if k not in g.attrs and k not in g:
            raise DataError(f"{where}: missing '{k}'")
    instruction = _attr_str(g.attrs["instruction"])
    if not instruction.strip():  # EpisodeWriter refuses these; a file written by other tools may still hold one
        raise DataError(f"{where}: attr 'instruction' is empty ({instruction!r}): every episode needs the task in "
                        f"words; fix the file or pass skip_bad=True to drop such episodes")
    a = g["actions"][()]
    images = {}
    for v in views:
        if f"images/{v}" not in g:
            raise DataError(f"{where}: no images for view {v!r} (has {sorted(g['images']) if 'images' in g else []})")
        images[v] = g["images"][v]  # h5py dataset: shape/dtype without reading pixels
    s = None
    if with_state:
        if "state" not in g:
            raise DataError(f"{where}: state=True but the episode has no 'state' dataset")
        s = g["state"][()]
    _check_episode_arrays(images, a, s, where)
    return a.astype(np.float32), s


# -----------------------------------------------------------------------------------------------------------
# 4b. CALVIN reader (the dataset exactly as distributed: one npz per 30 Hz frame)
# -----------------------------------------------------------------------------------------------------------

CALVIN_IMAGE_KEYS = {"static": "rgb_static", "wrist": "rgb_gripper"}  # (200, 200, 3) and (84, 84, 3) uint8
CALVIN_ACTION_KEY = "rel_actions"  # (7,): [dxyz * 50, deuler * 20] clipped to [-1, 1], gripper -1 close / +1 open
CALVIN_STATE_KEY, CALVIN_STATE_DIM = "robot_obs", 15  # tcp xyz, tcp euler, gripper width, 7 joints, gripper action


def calvin_frame_path(split_dir, frame_id):
    return Path(split_dir) / f"episode_{int(frame_id):07d}.npz"


def load_calvin_annotations(split_dir):
    """lang_annotations/auto_lang_ann.npy -> (segments (K, 2) inclusive frame ids, instructions, tasks)."""
    split_dir = Path(split_dir)
    path = split_dir / "lang_annotations" / "auto_lang_ann.npy"
    if not path.exists() and (split_dir / "auto_lang_ann.npy").exists():  # fallback location the official code reads
        path = split_dir / "auto_lang_ann.npy"
    if not path.exists():
        raise DataError(f"{path}: CALVIN language annotation file not found; windows are only built inside "
                        f"annotated segments, so the split needs lang_annotations/auto_lang_ann.npy")
    try:
        ann = np.load(path, allow_pickle=True).item()
        indx, instr, tasks = ann["info"]["indx"], ann["language"]["ann"], ann["language"]["task"]
    except Exception as e:  # pickle, zip, key and type errors all mean the same thing here
        raise DataError(f"{path}: not a CALVIN annotation dict with ['info']['indx'], ['language']['ann'] and "
                        f"['language']['task'] ({type(e).__name__}: {e}); the file is corrupt or truncated") from e
    if not len(indx) == len(instr) == len(tasks):
        raise DataError(f"{path}: {len(indx)} segments but {len(instr)} instructions and {len(tasks)} task names; "
                        f"the three lists must have one entry per annotation")
    seg = np.asarray(indx, dtype=np.int64).reshape(-1, 2)
    bad = np.nonzero(seg[:, 1] < seg[:, 0])[0]
    if len(bad):
        raise DataError(f"{path}: annotation #{bad[0]} has end {seg[bad[0], 1]} < start {seg[bad[0], 0]}")
    return seg, [str(s) for s in instr], [str(t) for t in tasks]


def _npz_member(zf, key):
    """(shape, dtype, offset) of one array inside an npz, from its headers only (no pixel data read).

    offset is where the raw array bytes start in the npz file when the member is stored uncompressed
    (np.savez), else -1 (np.savez_compressed: must go through zipfile and inflate).
    """
    info = zf.getinfo(key + ".npy")
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
        header_len = fp.tell()
    if info.compress_type != zipfile.ZIP_STORED or fortran:
        return shape, dtype, -1
    zf.fp.seek(info.header_offset)
    local = zf.fp.read(30)  # zip local file header: name and extra-field lengths at bytes 26-29
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return shape, dtype, info.header_offset + 30 + name_len + extra_len + header_len


def _npz_array(zf, key):
    with zf.open(key + ".npy") as fp:
        return np.lib.format.read_array(fp)


def _scan_calvin_frame(path, views, image_shapes):
    """One frame: rel_actions (7,), robot_obs (15,), raw-byte offsets of the view images (V,); checks
    the image headers. Raises ValueError describing the problem."""
    offsets = []
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            need = [CALVIN_ACTION_KEY, CALVIN_STATE_KEY] + [CALVIN_IMAGE_KEYS[v] for v in views]
            missing = [k for k in need if k + ".npy" not in names]
            if missing:
                raise ValueError(f"missing arrays {missing} (has {sorted(n[:-4] for n in names)})")
            a = _npz_array(zf, CALVIN_ACTION_KEY)
            s = _npz_array(zf, CALVIN_STATE_KEY)
            for v in views:
                shape, dtype, offset = _npz_member(zf, CALVIN_IMAGE_KEYS[v])
                if len(shape) != 3 or shape[-1] != 3 or dtype != np.uint8:
                    raise ValueError(f"{CALVIN_IMAGE_KEYS[v]} must be uint8 (h, w, 3), found {dtype} {shape}")
                if image_shapes.setdefault(v, shape) != shape:
                    raise ValueError(f"{CALVIN_IMAGE_KEYS[v]} has shape {shape}, other frames have {image_shapes[v]}")
                offsets.append(offset)
    except FileNotFoundError:
        raise ValueError("frame file is missing") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise ValueError(f"corrupt or truncated npz ({type(e).__name__}: {e})") from None
    if a.shape != (ACTION_DIM,):
        raise ValueError(f"{CALVIN_ACTION_KEY} must have shape ({ACTION_DIM},), found {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{CALVIN_ACTION_KEY} contains NaN/inf: {a.tolist()}")
    if s.shape != (CALVIN_STATE_DIM,):
        raise ValueError(f"{CALVIN_STATE_KEY} must have shape ({CALVIN_STATE_DIM},), found {s.shape}")
    return a, s, offsets


class CalvinDataset(WindowDataset):
    """Windows from a CALVIN split (task_ABC_D, task_ABCD_D, task_D_D, calvin_debug_dataset) as distributed.

    root/<split>/episode_%07d.npz, lang_annotations/auto_lang_ann.npy and ep_start_end_ids.npy. Only
    language-annotated segments (inclusive (start, end) frame ids) give windows; actions are rel_actions.
    Design (measured in benchmarks/bench_data.py): construction reads the small arrays (rel_actions,
    robot_obs) of every annotated frame into memory once, checks every frame (corrupt npz, shapes, NaN/inf)
    and records where each image's raw bytes sit inside its npz; a sample then reads just the H frames' image
    bytes at those offsets (inflating through zipfile instead if the npz is compressed).
    few_shot: k segments per task (seeded), or the official {task: [[start, end], ...]} dict / JSON file.
    stats: required for split="validation" (pass the training split's .stats).
    skip_bad: drop annotations touching a bad frame and count them in .n_bad instead of raising.
    cache_dir: optional folder for the per-frame scan (a full CALVIN split has millions of frames).
    cache_images: also keep every used frame, already resized to S, in uint8 memory-mapped arrays under
      cache_dir (built once, resumable: 2 x 3 x S x S bytes per frame, 301 KB at S = 224). Decoding and resizing
      dominate the default path; with the cache a sample is one contiguous memmap slice per view.
      Build it once (e.g. on one rank) before starting several processes on it.
    """

    def __init__(self, root, split="training", window=16, chunk=10, views=VIEWS, image_size=224, stats=None,
                 few_shot=None, fraction=None, key="calvin", seed=0, state=False, norm_mode="quantile",
                 skip_bad=False, cache_dir=None, cache_images=False):
        window, chunk, views, image_size = _check_window_args(window, chunk, views, image_size)
        self.root, self.split_dir = Path(root), Path(root) / split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: CALVIN root directory not found (expected e.g. .../task_D_D with "
                            f"training/ and validation/ inside)")
        if not self.split_dir.is_dir():
            raise DataError(f"{self.split_dir}: split directory not found; {self.root} has "
                            f"{sorted(p.name for p in self.root.iterdir() if p.is_dir())}")
        if stats is None and split != "training":
            raise DataError(f"{self.split_dir}: statistics come from the training split; pass "
                            f"stats=CalvinDataset(root, 'training', ...).stats")
        seg, instr, tasks = load_calvin_annotations(self.split_dir)
        if isinstance(few_shot, (dict, str, Path)):  # the official list of (start, end) pairs per task
            wanted = json.loads(Path(few_shot).read_text()) if isinstance(few_shot, (str, Path)) else few_shot
            wanted = {(int(s), int(e)) for pairs in wanted.values() for s, e in pairs}
            keep = [k for k in range(len(seg)) if (int(seg[k, 0]), int(seg[k, 1])) in wanted]
            seg, instr, tasks, few_shot = seg[keep], [instr[k] for k in keep], [tasks[k] for k in keep], None
        crossing = self._check_recordings(seg)
        fids = np.unique(np.concatenate([np.arange(s, e + 1) for s, e in seg])) if len(seg) else np.zeros(0, int)
        actions, robot_obs, self.offsets, bad, self.image_shapes = self._scan(fids, views, cache_dir)
        self.with_state, self.n_bad, self.bad = bool(state), 0, []
        ok = []
        for k, (s, e) in enumerate(seg):
            hit = [f for f in bad if s <= f <= e]
            if k in crossing:
                msg = (f"{self.split_dir / 'ep_start_end_ids.npy'}: annotation #{k} [{s}, {e}] {instr[k]!r} is not "
                       f"inside one recording (its frames would jump across a reset)")
            elif hit:
                msg = (f"{calvin_frame_path(self.split_dir, hit[0])} (frame {hit[0]}, in annotation #{k} "
                       f"[{s}, {e}] {instr[k]!r}): {bad[hit[0]]}")
            else:
                ok.append(k)
                continue
            if not skip_bad:
                raise DataError(msg + "; pass skip_bad=True to skip and count such annotations")
            self.n_bad += 1
            self.bad.append(msg)
        if not ok:
            raise DataError(f"{self.split_dir}: no usable annotated segments")
        if self.n_bad:
            warnings.warn(f"CalvinDataset skipped {self.n_bad} annotation(s) with bad frames (skip_bad=True); "
                          f"first: {self.bad[0]}")
        seg = seg[ok]
        self.frame_ids = fids  # (N,) global CALVIN frame id of each row
        self._build(key, actions, robot_obs if state else None, np.searchsorted(fids, seg[:, 0]),
                    np.searchsorted(fids, seg[:, 1]), [instr[k] for k in ok], [tasks[k] for k in ok], window,
                    chunk, views, image_size, stats, norm_mode, few_shot, fraction, seed)
        self._mm, self._cache = None, None
        if cache_images:
            if cache_dir is None:
                raise ValueError("cache_images=True needs cache_dir=<a folder with room for the resized frames>")
            self._build_image_cache(Path(cache_dir))

    def _where(self, row):
        fid = int(self.frame_ids[row])
        return f"{calvin_frame_path(self.split_dir, fid)} (frame {fid})"

    def _build_image_cache(self, cache_dir):
        n, s = len(self.frame_ids), self.image_size
        tag = hashlib.sha1(f"{self.split_dir.resolve()}|{s}".encode() + self.frame_ids.tobytes()).hexdigest()[:16]
        self._cache = {v: cache_dir / f"calvin_images_{tag}_{v}_{s}.u8" for v in self.views}
        need = np.zeros(n, bool)
        for a, b in zip(self.seg_start, self.seg_end):
            need[a:b + 1] = True
        cache_dir.mkdir(parents=True, exist_ok=True)
        for v, path in self._cache.items():
            filled_path = path.with_suffix(".filled.npy")
            filled = np.load(filled_path) if filled_path.exists() and path.exists() else np.zeros(n, bool)
            todo = np.nonzero(need & ~filled)[0]
            if not len(todo):
                continue
            mm = np.memmap(path, np.uint8, "r+" if path.exists() else "w+", shape=(n, 3, s, s))
            for i in range(0, len(todo), 256):  # flush, then mark as filled: an interrupted build resumes
                rows = todo[i:i + 256]
                for j in range(0, len(rows), 32):
                    mm[rows[j:j + 32]] = resize_images(self._load_frames(0, rows[j:j + 32], (v,))[v], s).numpy()
                mm.flush()
                filled[rows] = True
                np.save(filled_path.with_suffix(".tmp.npy"), filled)
                os.replace(filled_path.with_suffix(".tmp.npy"), filled_path)
            del mm

    def _images(self, seg, frames):
        if self._cache is None:
            return super()._images(seg, frames)
        if self._mm is None:  # opened lazily: a memmap must not be pickled into DataLoader workers
            shape = (len(self.frame_ids), 3, self.image_size, self.image_size)
            self._mm = {v: np.memmap(p, np.uint8, "r", shape=shape) for v, p in self._cache.items()}
        a, b = int(frames[0]), int(frames[-1]) + 1  # the H rows of a window are contiguous
        return torch.from_numpy(np.stack([self._mm[v][a:b] for v in self.views], 1))  # (H, V, 3, S, S)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        return d

    def _check_recordings(self, seg):
        """Indices of annotations not inside one contiguous recording of ep_start_end_ids.npy. The file is
        required: without it a window could silently jump across a reset between two recordings."""
        path = self.split_dir / "ep_start_end_ids.npy"
        if not path.is_file():
            raise DataError(f"{path}: not found; every CALVIN split has it (int array (N, 2), the inclusive [start, "
                            f"end] frame ids of its contiguous recordings) and windows must not cross a reset: copy "
                            f"it from the downloaded split")
        if not len(seg):
            return set()
        try:
            rec = np.asarray(np.load(path), dtype=np.int64).reshape(-1, 2)
        except Exception as e:
            raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); expected an int array (N, 2)") from e
        rec = rec[np.argsort(rec[:, 0])]
        j = np.searchsorted(rec[:, 0], seg[:, 0], side="right") - 1  # recording that starts at or before
        return set(np.nonzero((j < 0) | (seg[:, 1] > rec[np.maximum(j, 0), 1]))[0].tolist())

    def _scan(self, fids, views, cache_dir):
        """Per annotated frame: rel_actions (N, 7), robot_obs (N, 15), image byte offsets (N, V) (-1: read through
        zipfile), {frame id: problem}, {view: image shape}."""
        cache = None
        if cache_dir is not None:
            ann = self.split_dir / "lang_annotations" / "auto_lang_ann.npy"
            st = ann.stat() if ann.exists() else None
            tag = f"v2|{self.split_dir.resolve()}|{st and (st.st_size, st.st_mtime_ns)}|{len(fids)}|{list(views)}"
            cache = Path(cache_dir) / f"calvin_scan_{hashlib.sha1(tag.encode()).hexdigest()[:16]}.npz"
            try:  # a missing, stale or unreadable cache is simply rebuilt
                z = np.load(cache)
                if np.array_equal(z["fids"], fids):
                    shapes = {v: tuple(sh) for v, sh in zip(views, z["shapes"].tolist())}
                    return (z["actions"], z["robot_obs"], z["offsets"],
                            dict(zip(z["bad_ids"].tolist(), z["bad_msgs"].tolist())), shapes)
            except (OSError, KeyError, ValueError, zipfile.BadZipFile):
                pass
        actions = np.zeros((len(fids), ACTION_DIM), np.float32)
        robot_obs = np.zeros((len(fids), CALVIN_STATE_DIM), np.float32)
        offsets = np.full((len(fids), len(views)), -1, np.int64)
        bad, shapes = {}, {}
        for r, fid in enumerate(fids):
            try:
                actions[r], robot_obs[r], offsets[r] = _scan_calvin_frame(calvin_frame_path(self.split_dir, fid),
                                                                          views, shapes)
            except ValueError as e:
                bad[int(fid)] = str(e)
        if cache is not None and len(shapes) == len(views):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.stem + ".tmp.npz")
            np.savez(tmp, fids=fids, actions=actions, robot_obs=robot_obs, offsets=offsets,
                     shapes=np.array([shapes[v] for v in views]), bad_ids=np.asarray(list(bad), dtype=np.int64),
                     bad_msgs=np.asarray(list(bad.values()), dtype=str))
            os.replace(tmp, cache)
        return actions, robot_obs, offsets, bad, shapes

    def _load_frames(self, seg, frames, views=None):
        views = views or self.views
        out = {v: np.empty((len(frames), *self.image_shapes[v]), np.uint8) for v in views}  # (H, h, w, 3) each
        split_dir = str(self.split_dir)
        for i, (r, fid) in enumerate(zip(frames, self.frame_ids[frames])):
            path = os.path.join(split_dir, f"episode_{fid:07d}.npz")
            try:
                if (self.offsets[r] >= 0).all():  # stored npz: read the raw bytes where the scan found them
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        for v in views:  # straight into the output array, no intermediate copy
                            n = os.preadv(fd, [out[v][i]], int(self.offsets[r, self.views.index(v)]))
                            if n != out[v][i].nbytes:
                                raise EOFError(f"read {n} of {out[v][i].nbytes} bytes")
                    finally:
                        os.close(fd)
                else:
                    with zipfile.ZipFile(path) as zf:
                        for v in views:
                            out[v][i] = _npz_array(zf, CALVIN_IMAGE_KEYS[v])
            except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
                raise DataError(f"{path} (frame {fid}): cannot read images ({type(e).__name__}: {e}); "
                                f"did the file change after the dataset was indexed?") from e
        return out


# -----------------------------------------------------------------------------------------------------------
# 4c. Mixtures (§II-E co-training)
# -----------------------------------------------------------------------------------------------------------

class MixtureDataset(torch.utils.data.Dataset):
    """Several datasets sampled with weights; each sample keeps its own dataset's key and normalization.

    MixtureDataset([(calvin, 1.0), (hdf5, 0.5)], length=None, seed=0): index i maps to (dataset k, window j)
    through a table drawn once: k ~ weights, and each dataset's windows are visited in a seeded permuted
    cycle, so a map-style sampler (random or DistributedSampler) sees the weighted mixture. Call
    .resample(seed) between epochs for a fresh draw. length defaults to the sum of the datasets' lengths.
    """

    def __init__(self, datasets_and_weights, length=None, seed=0):
        pairs = list(datasets_and_weights)
        if not pairs:
            raise ValueError("MixtureDataset needs at least one (dataset, weight) pair")
        self.datasets = [d for d, _ in pairs]
        w = np.asarray([float(w) for _, w in pairs])
        if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()
        first = self.datasets[0]
        for d in self.datasets:
            if len(d) == 0:
                raise DataError(f"dataset {d.key!r} in the mixture has no windows")
            same = (d.window, d.chunk, tuple(d.views), d.image_size, d.with_state)
            if same != (first.window, first.chunk, tuple(first.views), first.image_size, first.with_state):
                raise ValueError(f"dataset {d.key!r} gives windows (H, L, views, size, state) = {same}, but "
                                 f"{first.key!r} gives {(first.window, first.chunk, first.views, first.image_size, first.with_state)}; "
                                 f"batches need one shape: build all datasets with the same arguments")
        self._stats = {}
        for d in self.datasets:
            if d.key in self._stats and self._stats[d.key] != d.stats:
                raise ValueError(f"two datasets share the key {d.key!r} but have different statistics; give "
                                 f"each a unique key=...")
            self._stats[d.key] = d.stats
        self.length = int(length) if length is not None else sum(len(d) for d in self.datasets)
        self.window, self.chunk, self.views, self.image_size = first.window, first.chunk, first.views, first.image_size
        self.with_state = first.with_state
        self.resample(seed)

    def resample(self, seed):
        rng = np.random.default_rng(seed)
        self.which = rng.choice(len(self.datasets), size=self.length, p=self.weights)  # (length,) dataset index
        self.inner = np.zeros(self.length, dtype=np.int64)  # (length,) window index inside that dataset
        for k, d in enumerate(self.datasets):
            slots = np.nonzero(self.which == k)[0]
            reps = -(-len(slots) // len(d))  # ceil
            cycle = np.concatenate([rng.permutation(len(d)) for _ in range(max(reps, 1))])
            self.inner[slots] = cycle[:len(slots)]

    @property
    def stats_by_key(self):
        return dict(self._stats)

    @property
    def stats(self):
        raise AttributeError("a MixtureDataset has one set of statistics per dataset: use .stats_by_key")

    @property
    def camera_sizes(self):
        """{view: [h, w]} where every dataset of the mixture agrees (see WindowDataset.camera_sizes)."""
        sizes = [d.camera_sizes for d in self.datasets]
        return {v: hw for v, hw in sizes[0].items() if all(s.get(v) == hw for s in sizes)}

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.datasets[self.which[i]][int(self.inner[i])]


# -----------------------------------------------------------------------------------------------------------
# 4d. LeRobotDataset and RLDS: shared pieces (cameras, the 7-d action, optional imports)
# -----------------------------------------------------------------------------------------------------------

WRIST_WORDS = ("wrist", "hand", "gripper")  # a camera key naming one of these is the gripper camera


def _need(module, pip_name, what):
    """Import an optional dependency only when a dataset of its format is opened; say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading {what} needs the Python package '{pip_name}' ({e}); install it with "
                          f"`pip install {pip_name}` (README: optional dataset formats)") from None


def parse_cameras(spec):
    """'static=observation.images.top,wrist=observation.images.wrist' -> {view: key}; None/'' /'auto' -> {}."""
    if not spec or spec == "auto":
        return {}
    out = {}
    for item in spec.split(","):
        view, sep, key = item.partition("=")
        if not sep or view not in VIEWS or not key:
            raise ValueError(f"camera mapping {spec!r}: expected VIEW=KEY pairs separated by commas with VIEW in "
                             f"{VIEWS}, e.g. 'static=observation.images.top,wrist=observation.images.wrist'")
        out[view] = key
    return out


def pick_cameras(available, views, override=None, where=""):
    """{view: the dataset's camera key} for each of `views`.

    Default: 'wrist' = the first key whose last component names a wrist/hand/gripper camera, 'static' = the first
    other key (in the dataset's own order). override {view: key} (--cameras) wins.
    """
    override = dict(override or {})
    unknown = {v: k for v, k in override.items() if k not in available}
    if unknown:
        raise DataError(f"{where}: camera mapping {unknown} names keys the dataset does not have; its cameras are "
                        f"{list(available)}")
    last = [k.replace("/", ".").rsplit(".", 1)[-1].lower() for k in available]
    wrist = [k for k, s in zip(available, last) if any(w in s for w in WRIST_WORDS)]
    other = [k for k in available if k not in wrist]
    default = {"static": other[0] if other else None, "wrist": wrist[0] if wrist else None}
    out = {}
    for v in views:
        out[v] = override.get(v, default[v])
        if out[v] is None:
            raise DataError(f"{where}: no camera for view {v!r} among {list(available)}; name one with "
                            f"--cameras {v}=KEY, or train without it (--views {','.join(x for x in views if x != v)})")
    return out


def gripper_pm1(g, closed_high=False):
    """Gripper command (N,) -> +1 open / -1 closed (the project's convention, normalize_action).

    Values within [0, 1] (bridge: 1 = open) are split at 0.5, values with negatives ([-1, 1]) at 0.
    closed_high: the dataset's high value means closed (e.g. a 0 = open, 1 = closed gripper).
    """
    g = np.asarray(g, np.float32)
    out = np.where(g > (0.5 if g.size and g.min() >= 0 else 0.0), 1.0, -1.0).astype(np.float32)
    return -out if closed_high else out


def relative_to_absolute_gripper(rel):
    """fractal's gripper_closedness_action (+1 close, -1 open, 0 keep; |x| <= 0.1 counts as 0) -> +1 open / -1
    closed. Before the first event the gripper is in the opposite state of the one that event sets (a first
    "close" means it was open); no event at all: open the whole episode (OpenVLA's rt1 transform)."""
    rel = np.asarray(rel, np.float32).reshape(-1)
    events = np.nonzero(np.abs(rel) > 0.1)[0]
    out, state = np.empty(len(rel), np.float32), 1.0 if not len(events) or rel[events[0]] > 0 else -1.0
    for t, x in enumerate(rel):
        state = -1.0 if x > 0.1 else 1.0 if x < -0.1 else state
        out[t] = state
    return out


JOINT_WORDS = ("joint", "motor", "shoulder", "elbow", "qpos")


def map_action7(parts, where, dims=None, names=None):
    """A dataset's action -> (N, 7) [xyz delta, rpy delta, gripper] with the gripper still in the dataset's units.

    parts: {"": (N, D)} for a flat action vector (LeRobot `action`, RLDS bridge_orig `steps/action`), or the
    leaves of an action dict (RLDS OXE: world_vector (3), rotation_delta (3) and open_gripper or
    gripper_closedness_action). dims: 7 indices into a flat vector, for action spaces whose layout differs.
    Returns (actions (N, 7), gripper kind: "absolute" or "relative"). Anything else is refused, naming its shape.
    """
    if "" in parts:
        a = np.asarray(parts[""], np.float32)
        a = a.reshape(len(a), -1)
        joints = [n for n in (names or []) if any(w in str(n).lower() for w in JOINT_WORDS)]
        if dims is not None:
            if len(dims) != 7 or max(dims) >= a.shape[1] or min(dims) < 0:
                raise DataError(f"{where}: action_dims {list(dims)} must be 7 indices into the {a.shape[1]}-d action")
            return a[:, list(dims)], "absolute"
        if a.shape[1] != ACTION_DIM or joints:
            named = f" with names {names}" if names else ""
            raise DataError(f"{where}: the action has shape (T, {a.shape[1]}){named}; "
                            f"this project trains 7-d actions (xyz delta, rpy delta, gripper) and cannot map this "
                            f"action space{' (joint-space: ' + str(joints[:3]) + ')' if joints else ''}. If 7 of its "
                            f"dims are exactly those, pick them with action_dims=[i0, ..., i6] (python data.py convert "
                            f"SRC --to out.h5 --action-dims i0,...,i6); otherwise convert the actions to end-effector "
                            f"deltas first")
        return a, "absolute"
    grip = [k for k in ("open_gripper", "gripper_closedness_action") if k in parts]
    if "world_vector" in parts and "rotation_delta" in parts and grip:
        n = len(parts["world_vector"])
        g = np.asarray(parts[grip[0]], np.float32).reshape(n, -1)[:, :1]
        a = np.concatenate([np.asarray(parts["world_vector"], np.float32).reshape(n, 3),
                            np.asarray(parts["rotation_delta"], np.float32).reshape(n, 3), g], 1)
        return a, "relative" if grip[0] == "gripper_closedness_action" else "absolute"
    shapes = {k: tuple(np.shape(v)[1:]) for k, v in parts.items()}
    raise DataError(f"{where}: cannot map the action dict {shapes} to 7-d (xyz delta, rpy delta, gripper): known "
                    f"layouts are a flat 7-vector or world_vector (3) + rotation_delta (3) + open_gripper / "
                    f"gripper_closedness_action")


def decode_image(buf):
    """Encoded JPEG/PNG bytes -> uint8 (h, w, 3) RGB (Pillow sniffs the format from the magic bytes)."""
    import io
    from PIL import Image
    with Image.open(io.BytesIO(buf)) as im:
        return np.asarray(im.convert("RGB"))


def decode_video_frames(container, times, tolerance_s, where):
    """uint8 (len(times), h, w, 3): the frames of the first video stream at `times` (seconds, ascending).

    One pass: seek to the keyframe at or before the first time, decode forward until past the last; each
    time takes the nearest decoded frame, which must lie within tolerance_s (LeRobot's default 1e-4 s).
    """
    s = container.streams.video[0]
    tb = float(s.time_base)
    container.seek(max(0, int((times[0] - tolerance_s) / tb)), stream=s, backward=True, any_frame=False)
    pts, frames = [], []
    for fr in container.decode(s):
        if fr.pts is None:
            continue
        t = fr.pts * tb
        if t >= times[0] - tolerance_s:
            pts.append(t)
            frames.append(fr)
        if t >= times[-1] - tolerance_s:  # the last wanted frame (or the one after it) is decoded
            break
    pts = np.asarray(pts)
    out = []
    for q in times:
        j = int(np.abs(pts - q).argmin()) if len(pts) else -1
        if j < 0 or abs(pts[j] - q) > tolerance_s:
            near = f"nearest decoded frame at {pts[j]:.5f} s" if j >= 0 else "no frame decoded there"
            raise DataError(f"{where}: no video frame within {tolerance_s} s of t = {q:.5f} s ({near}); the video "
                            f"and the parquet timestamps disagree (pass tolerance_s=... to accept a looser match)")
        out.append(frames[j].to_ndarray(format="rgb24"))
    return np.stack(out)


class _FormatDataset(WindowDataset):
    """Common tail of the LeRobot and RLDS readers: segments of a flat frame table -> windows."""

    def _finish(self, key, actions, state, seg_start, seg_end, instructions, stats, gripper_closed_high,
                window, chunk, views, image_size, norm_mode, few_shot, fraction, seed, cache_dir=None):
        actions = np.asarray(actions, np.float32)
        if not np.isfinite(actions).all():
            row = np.argwhere(~np.isfinite(actions))[0]
            raise DataError(f"dataset {key!r}: action row {row[0]} dim {row[1]} is NaN/inf; fix or drop that episode")
        actions[:, 6] = gripper_pm1(actions[:, 6], gripper_closed_high)
        self._build(key, actions, state, seg_start, seg_end, instructions, list(instructions), window, chunk,
                    views, image_size, stats, norm_mode, few_shot, fraction, seed)
        self._cache_dir, self._cache, self._mm = cache_dir, None, None

    def cache_frames(self):
        """Decode every frame once, resized to S, into one uint8 memmap (N, V, 3, S, S) under cache_dir.

        Video and JPEG decoding cost several times an HDF5 read per sample (benchmarks/bench_formats.py); with
        the cache a sample is one slice. Segment by segment, in order (one seek per video file and segment);
        written to a temporary name and renamed when complete, so an interrupted build is simply redone.
        Call it after construction (the readers do when given cache_dir), before DataLoader workers start.
        """
        s, n = self.image_size, len(self.raw_actions)
        tag = hashlib.sha1(json.dumps([str(Path(self.root).resolve()), self.key, s, list(self.views), self.cameras,
                                       self.seg_start.tolist(), self.seg_end.tolist()]).encode()).hexdigest()[:16]
        path = Path(self._cache_dir) / f"frames_{self.key}_{tag}_{s}.u8"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            mm = np.memmap(tmp, np.uint8, "w+", shape=(n, len(self.views), 3, s, s))
            for seg in range(len(self.seg_start)):
                rows = np.arange(self.seg_start[seg], self.seg_end[seg] + 1)
                for a in range(0, len(rows), 64):  # bounded memory for long episodes
                    frames = self._load_frames(seg, rows[a:a + 64])
                    for k, v in enumerate(self.views):
                        mm[rows[a:a + 64], k] = resize_images(frames[v], s).numpy()
            mm.flush()
            del mm
            os.replace(tmp, path)
        self._cache, self._mm = path, None
        return path

    def _images(self, seg, frames):
        if self._cache is None:
            return super()._images(seg, frames)
        if self._mm is None:  # opened lazily: a memmap must not be pickled into DataLoader workers
            self._mm = np.memmap(self._cache, np.uint8, "r", shape=(len(self.raw_actions), len(self.views), 3,
                                                                    self.image_size, self.image_size))
        return torch.from_numpy(np.array(self._mm[int(frames[0]):int(frames[-1]) + 1]))  # (H, V, 3, S, S)

    def __getstate__(self):  # workers get a copy without open decoders or memmaps
        d = dict(self.__dict__)
        d.update(_mm=None, _containers={}, _pid=None)
        return d

    @property
    def episodes(self):  # one entry per segment, like HDF5Dataset.episodes (train.py prints the count)
        return list(range(len(self.seg_start)))

    def episode_frames(self, seg):
        """{view: uint8 (T, h, w, 3)}, actions (T, 7) raw, instruction of segment `seg` (data.py convert)."""
        rows = np.arange(self.seg_start[seg], self.seg_end[seg] + 1)
        return self._load_frames(seg, rows), self.raw_actions[rows], self.instructions[seg]


# -----------------------------------------------------------------------------------------------------------
# 4e. LeRobotDataset reader (codebase v3.0; v2.0 / v2.1)
# -----------------------------------------------------------------------------------------------------------

class LeRobotDataset(_FormatDataset):
    """Windows from a local LeRobotDataset folder (docs/data_formats.md), without the lerobot package.

    Reads meta/info.json (fps, features, path templates), the episodes table (v3: meta/episodes/*/*.parquet, v2:
    meta/episodes.jsonl), the tasks (v3: meta/tasks.parquet, v2: meta/tasks.jsonl) and the data parquet files
    (action, timestamp, episode/frame/task index, observation.state). Camera frames come from the mp4 files
    (dtype video: decoded with PyAV at the episode's offset in the file + the parquet timestamp) or from the
    PNG bytes in the parquet (dtype image). A segment is a run of one episode's frames under one task.
    Statistics are computed from the mapped 7-d actions (meta/stats.json describes the raw action, and its
    quantiles are histogram estimates). cameras: {view: feature key} (default: pick_cameras).
    cache_dir: decode every frame once into a resized uint8 memmap there (cache_frames); tolerance_s: how far
    a decoded frame's time may lie from the parquet timestamp (LeRobot's default 1e-4 s).
    """

    def __init__(self, root, window, chunk, views=VIEWS, image_size=224, stats=None, key=None, cameras=None,
                 action_dims=None, gripper_closed_high=False, state=False, few_shot=None, fraction=None, seed=0,
                 norm_mode="quantile", tolerance_s=1e-4, cache_dir=None):
        pq = _need("pyarrow.parquet", "pyarrow", "a LeRobotDataset")
        self.root = root = Path(root)
        window, chunk, views, image_size = _check_window_args(window, chunk, views, image_size)
        try:
            info = json.loads((root / "meta" / "info.json").read_text())
            version, feats, self.control_hz = str(info["codebase_version"]), info["features"], float(info["fps"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{root}/meta/info.json: not a LeRobotDataset info file ({type(e).__name__}: {e})") from e
        if version not in ("v2.0", "v2.1", "v3.0"):
            raise DataError(f"{root}: LeRobotDataset codebase_version {version!r}; this reader knows v2.0, v2.1, v3.0")
        v3, where = version == "v3.0", f"{root} (LeRobotDataset {version})"
        cams = [k for k, f in feats.items() if f.get("dtype") in ("video", "image") and not
                (f.get("info") or {}).get("video.is_depth_map", (f.get("info") or {}).get("is_depth_map"))]
        self.cameras = pick_cameras(cams, views, cameras, where)  # depth videos are not cameras here
        if "action" not in feats:
            raise DataError(f"{where}: no 'action' feature (features: {sorted(feats)})")
        if v3:  # tasks.parquet keeps the task string as the pandas index
            t = pq.read_table(root / "meta" / "tasks.parquet").to_pydict()
            task_of = dict(zip(t["task_index"], t.get("task") or t.get("__index_level_0__")))
            eps = _concat_parquet(pq, sorted((root / "meta" / "episodes").glob("*/*.parquet")),
                                  ["episode_index", "length", "data/chunk_index", "data/file_index"] +
                                  [f"videos/{k}/{c}" for k in self.cameras.values() if feats[k]["dtype"] == "video"
                                   for c in ("chunk_index", "file_index", "from_timestamp")])
        else:
            task_of = {d["task_index"]: d["task"] for d in _jsonl(root / "meta" / "tasks.jsonl")}
            eps = {}
            for d in _jsonl(root / "meta" / "episodes.jsonl"):
                for k in ("episode_index", "length"):
                    eps.setdefault(k, []).append(d[k])
        self.video = {}  # {episode: {camera: (mp4 path, the episode's first frame time in it)}}
        files = {}  # data parquet path -> episodes in it
        for i, ep in enumerate(eps["episode_index"]):
            if v3:
                path = info["data_path"].format(chunk_index=eps["data/chunk_index"][i],
                                                file_index=eps["data/file_index"][i])
                vid = {k: (info["video_path"].format(video_key=k, chunk_index=eps[f"videos/{k}/chunk_index"][i],
                                                     file_index=eps[f"videos/{k}/file_index"][i]),
                           float(eps[f"videos/{k}/from_timestamp"][i]))
                       for k in self.cameras.values() if feats[k]["dtype"] == "video"}
            else:
                c = ep // int(info.get("chunks_size", 1000))
                path = info["data_path"].format(episode_chunk=c, episode_index=ep)
                vid = {k: (info["video_path"].format(episode_chunk=c, video_key=k, episode_index=ep), 0.0)
                       for k in self.cameras.values() if feats[k]["dtype"] == "video"}
            files.setdefault(path, set()).add(ep)
            self.video[ep] = {k: (str(root / p), t0) for k, (p, t0) in vid.items()}
        images = [k for k in self.cameras.values() if feats[k]["dtype"] == "image"]
        cols = ["episode_index", "frame_index", "timestamp", "task_index", "action"] + images + \
               (["observation.state"] if state else [])
        tabs = []
        for path, want in files.items():
            try:
                tab = pq.read_table(root / path, columns=cols)
            except Exception as e:  # missing file, missing column (ArrowInvalid), damaged footer
                raise DataError(f"{root / path}: cannot read columns {cols} ({type(e).__name__}: {e})") from e
            keep = np.isin(tab.column("episode_index").to_numpy(), list(want))
            tabs.append(tab.filter(keep) if not keep.all() else tab)
        import pyarrow as pa
        tab = pa.concat_tables(tabs)
        ep_col, fi = tab.column("episode_index").to_numpy(), tab.column("frame_index").to_numpy()
        order = np.lexsort((fi, ep_col))  # rows sorted by (episode, frame)
        ep_col, fi = ep_col[order], fi[order]
        self.timestamps = tab.column("timestamp").to_numpy().astype(np.float64)[order]  # (N,) seconds
        task = tab.column("task_index").to_numpy()[order]
        actions = _list_column(tab, "action")[order]  # (N, D)
        self._png = {k: tab.column(k).take(pa.array(order)).combine_chunks().field("bytes") for k in images}
        new_ep = np.r_[True, ep_col[1:] != ep_col[:-1]]
        gap = np.nonzero(~new_ep & (fi != np.r_[-1, fi[:-1]] + 1))[0]
        if len(gap):
            raise DataError(f"{where}: episode {ep_col[gap[0]]} jumps from frame_index {fi[gap[0] - 1]} to "
                            f"{fi[gap[0]]}: frames are missing or repeated in the data files")
        n_rows = np.bincount(ep_col, minlength=max(eps["episode_index"]) + 1)
        bad = [(e, n) for e, n in zip(eps["episode_index"], eps["length"]) if n_rows[e] != n]
        if bad:
            raise DataError(f"{where}: episode {bad[0][0]} has length {bad[0][1]} in the episodes table but "
                            f"{n_rows[bad[0][0]]} rows in the data files")
        start = np.nonzero(new_ep | np.r_[True, task[1:] != task[:-1]])[0]  # segment = one task within an episode
        end = np.r_[start[1:] - 1, len(task) - 1]
        unknown = sorted(set(task[start].tolist()) - set(task_of))
        if unknown:
            raise DataError(f"{where}: task_index {unknown[:5]} not in the tasks table (has {sorted(task_of)[:10]})")
        a7, _ = map_action7({"": actions}, where, action_dims, _feature_names(feats["action"]))
        self.seg_ep = ep_col[start]
        self.tolerance_s, self._containers, self._pid = tolerance_s, {}, None
        st = _list_column(tab, "observation.state")[order] if state else None  # (N, D)
        self._finish(key or root.name, a7, st, start, end, [task_of[t] for t in task[start]], stats,
                     gripper_closed_high, window, chunk, views, image_size, norm_mode, few_shot, fraction, seed,
                     cache_dir)
        self.with_state, self.n_bad, self.bad = bool(state), 0, []
        self.seg_ep = self.seg_ep[self.seg_keep]
        if cache_dir:
            self.cache_frames()

    def _load_frames(self, seg, frames):
        if self._pid != os.getpid():  # decoders must not cross a fork: reopen in each worker
            self._containers, self._pid = {}, os.getpid()
        ep, out = int(self.seg_ep[seg]), {}
        for v in self.views:
            k = self.cameras[v]
            if k in self._png:
                out[v] = np.stack([decode_image(self._png[k][int(r)].as_py()) for r in frames])
                continue
            path, t0 = self.video[ep][k]
            if path not in self._containers:
                av = _need("av", "av", "LeRobotDataset videos")
                if len(self._containers) >= 16:  # bound the open files per worker
                    self._containers.pop(next(iter(self._containers))).close()
                try:
                    self._containers[path] = c = av.open(path)
                    # one decoding thread: the DataLoader workers are the parallelism, and FFmpeg's threads do
                    # not survive fork (workers forked from a process that had encoded video, as the tests do,
                    # hung in a threaded decoder)
                    c.streams.video[0].codec_context.thread_count = 1
                except (OSError, av.FFmpegError) as e:
                    raise DataError(f"{path}: cannot open the video of camera {k!r} ({e})") from e
            out[v] = decode_video_frames(self._containers[path], t0 + self.timestamps[frames], self.tolerance_s,
                                         f"{path} (episode {ep}, camera {k!r})")
        return out


def _jsonl(path):
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable JSON-lines file ({type(e).__name__}: {e})") from e


def _concat_parquet(pq, paths, columns):
    """`columns` of several parquet files -> {column: list}."""
    if not paths:
        raise DataError("LeRobotDataset v3: no meta/episodes/chunk-*/file-*.parquet files found")
    out = {}
    for p in paths:
        try:
            tab = pq.read_table(p, columns=columns)
        except Exception as e:  # pyarrow raises several types for a missing column or a damaged file
            raise DataError(f"{p}: cannot read episode columns {columns} ({type(e).__name__}: {e})") from e
        for k, v in tab.to_pydict().items():
            out.setdefault(k, []).extend(v)
    return out


def _list_column(tab, name):
    """A fixed-size-list parquet column (LeRobot shape (D,)) -> float32 (N, D)."""
    import pyarrow.compute as pc
    col = tab.column(name)
    flat = pc.list_flatten(col).to_numpy().astype(np.float32)
    return flat.reshape(len(col), -1)


def _feature_names(feat):
    names = feat.get("names")
    if isinstance(names, dict):  # {"motors": [...]} in older files
        names = next(iter(names.values()), None)
    return names if isinstance(names, list) else None


# -----------------------------------------------------------------------------------------------------------
# 4f. RLDS / TFDS reader (Open X-Embodiment TFRecord shards, no TensorFlow)
# -----------------------------------------------------------------------------------------------------------

RLDS_CONTROL_HZ = {"fractal20220817_data": 3, "bridge": 5, "bridge_dataset": 5, "bridge_orig": 5}  # OXE spreadsheet
RLDS_INSTRUCTION_KEYS = ("steps/language_instruction", "steps/observation/natural_language_instruction",
                         "steps/observation/language_instruction")


def _masked_crc(b):
    import crc32c  # installed with the tfrecord package
    c = crc32c.crc32c(b)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_records(path, verify=True):
    """Yield (offset, bytes) of every record of an uncompressed TFRecord file.

    Framing per record (little-endian): uint64 length, uint32 masked CRC-32C of those 8 bytes, the data, uint32
    masked CRC-32C of the data. verify: check both CRCs (a damaged shard raises, naming the offset).
    """
    with open(path, "rb") as f:
        while True:
            off = f.tell()
            head = f.read(12)
            if not head:
                return
            n = int.from_bytes(head[:8], "little")
            body = f.read(n + 4) if len(head) == 12 else b""
            if len(body) != n + 4 or (verify and (_masked_crc(head[:8]) != int.from_bytes(head[8:], "little") or
                                                  _masked_crc(body[:n]) != int.from_bytes(body[n:], "little"))):
                raise DataError(f"{path}: damaged TFRecord at byte {off} (truncated or CRC mismatch); a GZIP/ZLIB-"
                                f"compressed shard is not supported, re-download or decompress it")
            yield off, body[:n]


def _tfds_leaves(node, prefix=""):
    """features.json (a TFDS FeaturesDict tree) -> {flat key: leaf spec}; steps/... keys are the per-step ones."""
    if "featuresDict" in node:
        out = {}
        for k, v in node["featuresDict"]["features"].items():
            out.update(_tfds_leaves(v, f"{prefix}{k}/"))
        return out
    if "sequence" in node:  # the RLDS `steps` Dataset: its leaves gain the leading step dim
        return _tfds_leaves(node["sequence"]["feature"], prefix)
    spec = node.get("tensor") or node.get("image") or {}
    cls = node.get("pythonClassName", "").rsplit(".", 1)[-1]  # Tensor, Scalar, Image, Text (bridge_orig's instruction)
    return {prefix[:-1]: {"cls": cls, "dtype": "string" if cls == "Text" else spec.get("dtype"),
                          "shape": [int(d) for d in spec.get("shape", {}).get("dimensions", [])],
                          "encoding": spec.get("encoding", "none"), "description": node.get("description", "")}}


def _example_values(feature, spec, t, where):
    """One Example feature -> numpy (T, *shape) (tensors) or a list of T bytes (images, strings)."""
    import zlib
    kind = feature.WhichOneof("kind")
    if spec["cls"] == "Image" or spec["dtype"] == "string":
        vals = list(feature.bytes_list.value)
        return vals if spec["cls"] == "Image" else [v.decode("utf-8", "replace") for v in vals]
    if spec["encoding"] in ("bytes", "zlib"):  # raw numpy bytes, one entry per step (TFDS tensor_feature)
        vals = [zlib.decompress(v) if spec["encoding"] == "zlib" else v for v in feature.bytes_list.value]
        return np.stack([np.frombuffer(v, spec["dtype"]).reshape(spec["shape"]) for v in vals])
    vals = np.asarray(feature.float_list.value if kind == "float_list" else feature.int64_list.value)
    if vals.size != t * int(np.prod(spec["shape"])):
        raise DataError(f"{where}: {vals.size} values, expected {t} steps x shape {spec['shape']}")
    return vals.reshape(t, *spec["shape"])


class RLDSDataset(_FormatDataset):
    """Windows from a local RLDS dataset as TFDS writes it (Open X-Embodiment: bridge, fractal, ...), no TensorFlow.

    Reads dataset_info.json (name, splits) and features.json (the key tree), then every TFRecord shard
    <name>-<split>.tfrecord-XXXXX-of-YYYYY: one tf.train.Example per episode, parsed with the `tfrecord`
    package's Example class, step fields flattened as steps/observation/image etc. and packed over the steps.
    Construction reads every episode once (actions, instruction, length, record offset); a sample re-reads
    its episode's record and decodes the H JPEG/PNG frames it needs. A segment is a run of one episode's steps
    under one instruction, without the is_last step (RLDS: the last step's action is not valid). Steps
    without an instruction are skipped (counted in .n_bad). cameras: {view: key under steps/observation/}.
    cache_dir: decode every frame once into a resized uint8 memmap there (cache_frames). verify: check CRCs.
    """

    def __init__(self, root, window, chunk, views=VIEWS, image_size=224, stats=None, key=None, cameras=None,
                 split="train", action_dims=None, gripper_closed_high=False, state=False, few_shot=None,
                 fraction=None, seed=0, norm_mode="quantile", verify=True, control_hz=None, cache_dir=None):
        example_pb2 = _need("tfrecord.example_pb2", "tfrecord", "an RLDS dataset")
        self.root = root = Path(root)
        window, chunk, views, image_size = _check_window_args(window, chunk, views, image_size)
        try:
            info = json.loads((root / "dataset_info.json").read_text())
            leaves = _tfds_leaves(json.loads((root / "features.json").read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{root}: not a TFDS dataset folder (dataset_info.json + features.json): "
                            f"{type(e).__name__}: {e}") from e
        name, where = info.get("name", root.name), f"{root} (RLDS)"
        self.control_hz = control_hz or RLDS_CONTROL_HZ.get(name)
        obs = "steps/observation/"
        cams = [k[len(obs):] for k, s in leaves.items() if k.startswith(obs) and s["cls"] == "Image"]
        self.cameras = pick_cameras(cams, views, cameras, where)
        instr_key = next((k for k in RLDS_INSTRUCTION_KEYS if k in leaves), None)
        act_keys = [k for k in leaves if k == "steps/action" or k.startswith("steps/action/")]
        if instr_key is None or not act_keys:
            missing = f"language instruction {RLDS_INSTRUCTION_KEYS}" if instr_key is None else "steps/action"
            raise DataError(f"{where}: features.json has no {missing}; "
                            f"step keys: {sorted(k for k in leaves if k.startswith('steps/'))}")
        state_key = obs + "state" if state else None
        if state and state_key not in leaves:
            raise DataError(f"{where}: state=True but features.json has no {state_key}")
        self.shards = sorted(str(p) for p in root.glob(f"{name}-{split}.tfrecord-*"))
        if not self.shards:
            raise DataError(f"{where}: no TFRecord shards {name}-{split}.tfrecord-* (files: "
                            f"{sorted(p.name for p in root.iterdir())[:10]}); splits in dataset_info.json: "
                            f"{[s.get('name') for s in info.get('splits', [])]}")
        self._pb, self._leaves, self.verify = example_pb2, leaves, verify
        self.records, acts, sts, instrs, lengths, self.n_bad, self.bad = [], [], [], [], [], 0, []
        for si, shard in enumerate(self.shards):
            for off, rec in tfrecord_records(shard, verify):
                ex, w = self._parse(rec), f"{shard} record at byte {off}"
                if "steps/is_first" not in ex:
                    raise DataError(f"{w}: no steps/is_first field; is this an RLDS episode (TFDS Example)?")
                t = len(ex["steps/is_first"].int64_list.value)  # the episode's step count
                last = np.asarray(ex["steps/is_last"].int64_list.value if "steps/is_last" in ex else [0] * t, bool)
                n = t - int(bool(t) and last[-1])  # steps with a valid action
                instr = [s.strip() for s in _example_values(ex[instr_key], leaves[instr_key], t, w)[:n]]
                parts = {k[len("steps/action/"):] if k != "steps/action" else "":
                         _example_values(ex[k], leaves[k], t, w)[:n] for k in act_keys}
                a7, kind = map_action7(parts, w, action_dims, [leaves[k]["description"] for k in act_keys])
                if kind == "relative":  # gripper events integrate over the whole episode
                    a7[:, 6] = relative_to_absolute_gripper(a7[:, 6])
                st = _example_values(ex[state_key], leaves[state_key], t, w)[:n].reshape(n, -1) if state else None
                cut = [0] + [i for i in range(1, n) if instr[i] != instr[i - 1]] + [n]  # one segment per instruction
                for a, b in zip(cut[:-1], cut[1:]):
                    if not instr[a]:
                        self.n_bad += 1
                        self.bad.append(f"{w}: steps {a}..{b - 1} have no language instruction")
                        continue
                    acts.append(a7[a:b])
                    sts.append(st[a:b] if state else None)
                    instrs.append(instr[a])
                    lengths.append(b - a)
                    self.records.append((si, off, a))
        if not self.records:
            raise DataError(f"{where}: no usable episodes ({self.n_bad} skipped; first: {self.bad[:1]})")
        if self.n_bad:
            warnings.warn(f"RLDSDataset {root}: skipped {self.n_bad} episode(s); first: {self.bad[0]}")
        lengths = np.asarray(lengths)
        start = np.cumsum(lengths) - lengths
        self._finish(key or name, np.concatenate(acts), np.concatenate(sts) if state else None, start,
                     start + lengths - 1, instrs, stats, gripper_closed_high, window, chunk, views, image_size,
                     norm_mode, few_shot, fraction, seed, cache_dir)
        self.with_state = bool(state)
        self.records = [self.records[i] for i in self.seg_keep]
        if cache_dir:
            self.cache_frames()

    def _parse(self, rec):
        ex = self._pb.Example()
        ex.ParseFromString(rec)
        return ex.features.feature

    def _load_frames(self, seg, frames):
        si, off, step0 = self.records[seg]
        with open(self.shards[si], "rb") as f:  # one record: the episode
            f.seek(off)
            n = int.from_bytes(f.read(12)[:8], "little")
            ex = self._parse(f.read(n))
        lo = int(self.seg_start[seg]) - step0  # row of the episode's step 0
        out = {}
        for v in self.views:
            imgs = ex["steps/observation/" + self.cameras[v]].bytes_list.value
            out[v] = np.stack([decode_image(imgs[int(r) - lo]) for r in frames])
        return out


# -----------------------------------------------------------------------------------------------------------
# 4g. Which reader: a path -> its format -> a dataset
# -----------------------------------------------------------------------------------------------------------

def detect_format(path):
    """'lerobot' (a folder with meta/info.json), 'rlds' (dataset_info.json + features.json), 'calvin' (any
    other folder: a CALVIN split directory) or 'hdf5' (a file)."""
    p = Path(path)
    if (p / "meta" / "info.json").is_file():
        return "lerobot"
    if (p / "dataset_info.json").is_file() and (p / "features.json").is_file():
        return "rlds"
    return "calvin" if p.is_dir() else "hdf5"


def open_dataset(path, window, chunk, views=VIEWS, image_size=224, cameras=None, **kw):
    """Any supported dataset at `path` (detect_format); kw goes to its reader (stats, key, state, ...)."""
    fmt = detect_format(path)
    if fmt == "lerobot":
        return LeRobotDataset(path, window, chunk, views, image_size, cameras=cameras, **kw)
    if fmt == "rlds":
        return RLDSDataset(path, window, chunk, views, image_size, cameras=cameras, **kw)
    if fmt == "calvin":
        root, split = os.path.split(os.path.normpath(path))
        return CalvinDataset(root, split, window, chunk, views, image_size, **kw)
    return HDF5Dataset(path, window, chunk, views, image_size, **kw)


def convert_to_hdf5(ds, out, control_hz=None):
    """Write every segment of a LeRobot/RLDS dataset to an HDF5 episode file (native image size, 7-d actions with
    the gripper at +-1, one episode per segment), keyed with the dataset's key. Returns the episode count."""
    hz = control_hz or getattr(ds, "control_hz", None)
    if not hz:
        raise DataError(f"{ds.root}: the control rate is not stored in this dataset; pass --control-hz")
    attrs = {"control_hz": float(hz), "dataset_key": ds.key, "source": str(ds.root),
             "action_convention": "xyz delta, rpy delta as recorded by the source dataset; gripper +1 open / -1 closed"}
    with EpisodeWriter(out, attrs) as w:
        for seg in range(len(ds.seg_start)):
            images, actions, instruction = ds.episode_frames(seg)
            state = ds.state[ds.seg_start[seg]:ds.seg_end[seg] + 1] if ds.with_state else None
            w.add_episode(images, actions, instruction, instruction, state)
    return len(ds.seg_start)


# -----------------------------------------------------------------------------------------------------------
# 5. DataLoader (workers, DistributedSampler)
# -----------------------------------------------------------------------------------------------------------

def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2 ** 32  # torch gives every worker its own seed; pass it on to numpy
    np.random.seed(seed)


def make_dataloader(dataset, batch_size, num_workers=0, shuffle=True, drop_last=True, distributed=None, seed=0,
                    pin_memory=None, num_replicas=None, rank=None):
    """DataLoader over windows. distributed=None: use a DistributedSampler when torch.distributed is initialized.

    With a DistributedSampler call loader.sampler.set_epoch(epoch) at every epoch (as torch requires).
    Workers are not persistent, so a MixtureDataset.resample(epoch) between epochs reaches them.
    """
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                                      shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False if sampler is None else None,
        num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=_seed_worker,
        prefetch_factor=2 if num_workers > 0 else None)


# -----------------------------------------------------------------------------------------------------------
# Command line: check a dataset and write its statistics
# -----------------------------------------------------------------------------------------------------------

def convert_main(argv):
    """python data.py convert SRC --to out.h5: a LeRobot or RLDS dataset folder -> one HDF5 episode file."""
    import argparse

    p = argparse.ArgumentParser(prog="data.py convert", description=convert_main.__doc__)
    p.add_argument("src", help="a LeRobotDataset folder (meta/info.json) or an RLDS/TFDS folder (features.json)")
    p.add_argument("--to", required=True, help="the HDF5 file to write (appended to if it exists)")
    p.add_argument("--views", default="static,wrist", help="cameras to keep (data.VIEWS names)")
    p.add_argument("--cameras", default=None, help="VIEW=KEY,... (default: picked by name, data.pick_cameras)")
    p.add_argument("--action-dims", default=None, help="7 comma-separated indices into a flat action vector")
    p.add_argument("--control-hz", type=float, default=None, help="needed when the source does not store it")
    p.add_argument("--state", action="store_true", help="also copy observation.state")
    args = p.parse_args(argv)
    if detect_format(args.src) not in ("lerobot", "rlds"):
        raise SystemExit(f"{args.src}: not a LeRobotDataset folder (meta/info.json) or an RLDS folder "
                         f"(dataset_info.json + features.json)")
    dims = [int(i) for i in args.action_dims.split(",")] if args.action_dims else None
    try:
        ds = open_dataset(args.src, 1, 1, tuple(args.views.split(",")), 224, cameras=parse_cameras(args.cameras),
                          action_dims=dims, state=args.state)
        n = convert_to_hdf5(ds, args.to, args.control_hz)
    except (DataError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.src} -> {args.to}: {n} episodes, {len(ds.raw_actions)} frames, cameras {ds.cameras}, "
          f"key {ds.key!r}")


def main(argv=None):
    """python data.py PATH [...]: validate a CALVIN root or HDF5 file(s), print counts, optionally save stats.
    python data.py convert SRC --to out.h5: convert a LeRobot / RLDS dataset (convert_main)."""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("paths", nargs="+", help="a CALVIN root (with training/) or one or more HDF5 episode files")
    p.add_argument("--split", default="training", help="CALVIN split folder")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--views", default="static,wrist")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad episodes instead of stopping")
    p.add_argument("--cache-dir", default=None, help="CALVIN: keep the per-frame scan here")
    p.add_argument("--stats-out", default=None, help="write {dataset_key: stats} JSON here")
    args = p.parse_args(argv)
    views = tuple(v for v in args.views.split(",") if v)
    if len(args.paths) == 1 and detect_format(args.paths[0]) in ("lerobot", "rlds"):
        ds = open_dataset(args.paths[0], args.window, args.chunk, views)
        extra = f"cameras {ds.cameras}, control rate {ds.control_hz} Hz"
    elif len(args.paths) == 1 and Path(args.paths[0]).is_dir():
        ds = CalvinDataset(args.paths[0], args.split, args.window, args.chunk, views, skip_bad=args.skip_bad,
                           cache_dir=args.cache_dir)
        extra = f"{len(ds.frame_ids)} annotated frames"
    else:
        ds = HDF5Dataset(args.paths, args.window, args.chunk, views, skip_bad=args.skip_bad)
        extra = f"{ds.n_incomplete} incomplete (interrupted) episodes ignored"
    print(f"dataset {ds.key!r}: {len(ds.seg_start)} segments, {len(ds)} windows (H={ds.window}, L={ds.chunk}), "
          f"{ds.n_short} segments shorter than H, {ds.n_bad} bad skipped, {extra}")
    for msg in ds.bad[:10]:
        print("  bad:", msg)
    print("action q01:", np.round(ds.stats["q01"], 4).tolist())
    print("action q99:", np.round(ds.stats["q99"], 4).tolist())
    if args.stats_out:
        save_stats(ds.stats_by_key, args.stats_out)
        print("statistics written to", args.stats_out)
    return ds


if __name__ == "__main__":
    main()
