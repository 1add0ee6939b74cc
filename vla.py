"""The VLA: action arithmetic, the four formulations around a VLM, losses, and the closed-loop Policy.

Read top to bottom:
  1. action math (pure functions): statistics, normalization eq. (5)-(6), the discrete action tokenizer
     (§III-B-1), the losses eq. (7)-(8), and the execution strategies of Table II (Chunk / First / Ensemble).
  2. the VLA itself (formulations of §III-C), the Policy used by every environment, checkpoints.

Notation follows the paper: H = history window (frames), L = action chunk length, actions are 7-d
[dx, dy, dz, droll, dpitch, dyaw, gripper] with the gripper canonically +1 = open, -1 = closed (CALVIN's
convention). Note the official code calls H `window_size` and L `fwd_pred_next_n`.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

ACTION_DIM = 7  # 6 pose dims + 1 binary gripper
POSE_DIM = 6

# -----------------------------------------------------------------------------------------------------------
# 1. Action statistics
# -----------------------------------------------------------------------------------------------------------

# Above this many rows, quantiles come from a streaming histogram instead of an exact sort (see below).
EXACT_QUANTILE_MAX_ROWS = 500_000
HIST_BINS = 8192  # histogram resolution: quantile error <= (max - min) / 8192 ~ 1.2e-4 of the range
STATS_CHUNK_ROWS = 262_144  # rows processed at a time in the streaming path


def compute_action_stats(actions):
    """Per-dimension statistics of an action array (N, D), D is usually 7.

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

    def chunks():
        for i in range(0, n, STATS_CHUNK_ROWS):
            c = np.asarray(actions[i:i + STATS_CHUNK_ROWS], dtype=np.float64)
            if not np.isfinite(c).all():
                row, dim = np.argwhere(~np.isfinite(c))[0]
                raise ValueError(f"action row {i + row}, dim {dim} is {c[row, dim]}: statistics need finite "
                                 f"actions; fix or drop the episode that contains it")
            yield c

    # pass 1: moments and range (float64 sums are accurate enough for millions of rows)
    s, s2 = np.zeros(d), np.zeros(d)
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    for c in chunks():
        s += c.sum(0)
        s2 += (c * c).sum(0)
        lo, hi = np.minimum(lo, c.min(0)), np.maximum(hi, c.max(0))
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))

    if n <= EXACT_QUANTILE_MAX_ROWS:
        a = np.asarray(actions[:], dtype=np.float64)
        q01, q99 = np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0)
    else:
        # pass 2: per-dimension histograms between min and max
        width = np.where(hi > lo, (hi - lo) / HIST_BINS, 1.0)
        counts = np.zeros((d, HIST_BINS), dtype=np.int64)
        for c in chunks():
            idx = np.clip(((c - lo) / width).astype(np.int64), 0, HIST_BINS - 1)  # (n_chunk, d)
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
# 2. Normalization, eq. (5)-(6)
# -----------------------------------------------------------------------------------------------------------

GRIPPER_THRESHOLD = 0.5  # raw gripper > 0.5 means open: maps {0, 1} and {-1, 1} alike onto {-1, +1}
OFFICIAL_BOUND = 0.65  # official CALVIN configs: norm_min -0.65, norm_max 0.65 (clip, then divide by 0.65)
DEGENERATE_RANGE = 1e-8  # q99 - q01 below this: the dimension is constant, normalize it to 0


def _check_finite(a, what):
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
    _check_finite(a, "normalize_action")
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
    _check_finite(a, "unnormalize_action")
    lo, hi = _bounds(a, stats, mode, bound)
    lib = torch if torch.is_tensor(a) else np
    pose = lib.minimum(lib.maximum(a[..., :POSE_DIM], -lib.ones_like(lo)), lib.ones_like(hi))
    pose = (pose + 1) / 2 * (hi - lo) + lo
    grip = lib.where(a[..., POSE_DIM:] > 0, 1.0, -1.0)
    if torch.is_tensor(a):
        return torch.cat([pose, grip.to(a.dtype)], -1)
    return np.concatenate([pose, grip.astype(a.dtype)], -1)


# -----------------------------------------------------------------------------------------------------------
# 3. Discrete actions (§III-B-1, following RT-2 / OpenVLA)
# -----------------------------------------------------------------------------------------------------------

class ActionTokenizer:
    """Maps each normalized action dim in [-1, 1] to one of n_bins uniform bins, and each bin to a token id.

    Bin b (0 = most negative) covers [-1 + b*w, -1 + (b+1)*w), w = 2 / n_bins, and decodes to its centre, so
    decode(encode(a)) is within w / 2 of a. The ids are the last n_bins ids of the vocabulary before `offset`
    reserved ids at the very end: id = vocab_size - offset - n_bins + b, i.e. [id_min, id_max] inclusive.
    Deviation from the official code: it uses 256 bin *edges* (255 usable centres) and a reversed id order;
    here all 256 bins are usable. Decoding an id outside [id_min, id_max] raises ValueError: the VLA restricts
    greedy decoding to action ids, so such an id means a caller bug, not a model choice.
    """

    def __init__(self, vocab_size, n_bins=256, offset=10):
        if vocab_size < n_bins + offset + 1:
            raise ValueError(f"vocabulary of {vocab_size} ids is too small for {n_bins} action bins plus "
                             f"{offset} reserved ids; use a larger vocabulary or fewer bins")
        self.vocab_size, self.n_bins, self.offset = vocab_size, n_bins, offset
        self.id_max = vocab_size - offset - 1
        self.id_min = self.id_max - n_bins + 1
        self.bin_width = 2.0 / n_bins

    def encode(self, a):
        """Normalized actions (...) in [-1, 1] (values outside are clipped) -> ids (...) int64."""
        _check_finite(a, "ActionTokenizer.encode")
        if torch.is_tensor(a):
            b = ((a.float().clamp(-1, 1) + 1) / self.bin_width).floor().long().clamp(0, self.n_bins - 1)
            return b + self.id_min
        b = np.clip(np.floor((np.clip(np.asarray(a, np.float64), -1, 1) + 1) / self.bin_width), 0, self.n_bins - 1)
        return b.astype(np.int64) + self.id_min

    def decode(self, ids):
        """ids (...) -> bin centres (...) as float32."""
        if not self.is_action(ids).all():
            lib_ids = ids.tolist() if torch.is_tensor(ids) else np.asarray(ids).tolist()
            raise ValueError(f"token ids must lie in the action range [{self.id_min}, {self.id_max}], got "
                             f"{lib_ids}; mask non-action logits before decoding")
        if torch.is_tensor(ids):
            return -1 + (ids - self.id_min + 0.5).float() * self.bin_width
        return (-1 + (np.asarray(ids) - self.id_min + 0.5) * self.bin_width).astype(np.float32)

    def is_action(self, ids):
        return (ids >= self.id_min) & (ids <= self.id_max)


# -----------------------------------------------------------------------------------------------------------
# 4. Losses, eq. (7) (continuous) and eq. (8) (discrete)
# -----------------------------------------------------------------------------------------------------------

def continuous_action_loss(pred_pose, pred_gripper_logit, target, mask, lam=0.01, kind="huber"):
    """eq. (7): regression on the 6 pose dims + lam * BCE on the gripper, averaged over valid entries.

    pred_pose (..., 6), pred_gripper_logit (...), target (..., 7) normalized with gripper ±1, mask (...) bool
    (False where a chunk runs past the end of its segment). The paper's text uses MSE; the official code uses
    Huber (delta = 1) and lam = 0.01 (arm_gripper_loss_ratio), our defaults.
    Returns (loss, metrics) with metrics loss_pose, loss_gripper, acc_gripper as floats.
    """
    if pred_pose.shape[-1] != POSE_DIM or target.shape[-1] != ACTION_DIM:
        raise ValueError(f"expected pred_pose (..., 6) and target (..., 7), got {tuple(pred_pose.shape)} "
                         f"and {tuple(target.shape)}")
    m = mask.to(pred_pose.dtype)  # (...)
    n = m.sum().clamp(min=1)
    if kind == "huber":
        pose_err = F.huber_loss(pred_pose, target[..., :POSE_DIM], reduction="none", delta=1.0)
    elif kind == "mse":
        pose_err = F.mse_loss(pred_pose, target[..., :POSE_DIM], reduction="none")
    else:
        raise ValueError(f"loss kind must be 'huber' or 'mse', got {kind!r}")
    loss_pose = (pose_err.mean(-1) * m).sum() / n  # mean over the 6 dims, masked mean over entries
    label = (target[..., POSE_DIM] > 0).to(pred_gripper_logit.dtype)  # BCE labels: 1 = open, 0 = closed
    bce = F.binary_cross_entropy_with_logits(pred_gripper_logit, label, reduction="none")
    loss_grip = (bce * m).sum() / n
    acc = (((pred_gripper_logit > 0).to(m.dtype) == label).to(m.dtype) * m).sum() / n
    loss = loss_pose + lam * loss_grip
    return loss, {"loss_pose": loss_pose.item(), "loss_gripper": loss_grip.item(), "acc_gripper": acc.item()}


def discrete_action_loss(logits, target_ids, mask):
    """eq. (8): cross-entropy over action tokens only. logits (..., V), target_ids (...), mask (...) bool."""
    m = mask.to(logits.dtype)
    n = m.sum().clamp(min=1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target_ids.reshape(-1).long(),
                         reduction="none").view(target_ids.shape)
    loss = (ce * m).sum() / n
    acc = ((logits.argmax(-1) == target_ids).to(m.dtype) * m).sum() / n
    return loss, {"loss_tokens": loss.item(), "acc_tokens": acc.item()}


# -----------------------------------------------------------------------------------------------------------
# 5. Execution strategies for a stream of predicted chunks (Table II: Chunk / First / Ensemble)
# -----------------------------------------------------------------------------------------------------------

def ensemble_weights(n, k=0.01):
    """ACT temporal-ensemble weights for n stored predictions of one step, oldest first: w_i = exp(-k i) / sum."""
    w = np.exp(-k * np.arange(n, dtype=np.float64))
    return w / w.sum()


class ActionExecutor:
    """Turns predicted chunks (L, 7) into one action per control step.

    chunk:    execute the first n_exec actions of a chunk open loop (default the whole chunk), then re-plan.
    first:    re-plan every step and execute a[0] (what the official CALVIN evaluation effectively does).
    ensemble: re-plan every step; the action for step t is the weighted mean of every stored chunk's
              prediction for t, w_i = exp(-k i) with i = 0 the oldest (ACT). Zero actions are kept as valid.
    Usage per control step: `if ex.needs_chunk(): ex.add_chunk(predict())`, then `a = ex.next_action()`.
    """

    def __init__(self, mode="chunk", n_exec=None, k=0.01):
        if mode not in ("chunk", "first", "ensemble"):
            raise ValueError(f"execution mode must be 'chunk', 'first' or 'ensemble', got {mode!r}")
        if n_exec is not None and n_exec < 1:
            raise ValueError(f"n_exec must be >= 1, got {n_exec}")
        self.mode, self.n_exec, self.k = mode, n_exec, k
        self.reset()

    def reset(self):
        self.t = 0  # control step counter
        self.queue = []  # chunk mode: actions still to execute
        self.chunks = []  # ensemble / first: (start step, chunk (L, 7))

    def needs_chunk(self):
        if self.mode == "chunk":
            return len(self.queue) == 0
        return True  # first and ensemble re-plan at every step

    def add_chunk(self, chunk):
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"expected a chunk of shape (L, D) with L >= 1, got {chunk.shape}")
        if self.mode == "chunk":
            self.queue = list(chunk[: self.n_exec or len(chunk)])
        elif self.mode == "first":
            self.chunks = [(self.t, chunk)]
        else:
            self.chunks.append((self.t, chunk))

    def next_action(self):
        if self.mode == "chunk":
            if not self.queue:
                raise RuntimeError("no action left: call add_chunk when needs_chunk() is True")
            action = self.queue.pop(0)
        else:
            # predictions for the current step, oldest chunk first
            preds = [c[self.t - s] for s, c in self.chunks if 0 <= self.t - s < len(c)]
            if not preds:
                raise RuntimeError(f"no stored chunk covers step {self.t}: call add_chunk first")
            if self.mode == "first":
                action = preds[-1]
            else:
                w = ensemble_weights(len(preds), self.k)
                action = (w[:, None] * np.stack(preds)).sum(0)
            # forget chunks that end at this step
            self.chunks = [(s, c) for s, c in self.chunks if self.t + 1 - s < len(c)]
        self.t += 1
        return np.asarray(action, dtype=np.float32)
