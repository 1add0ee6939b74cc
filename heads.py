"""Policy heads: what turns VLM features into action chunks, and the losses they are trained with.

Stands on: backbones.RMSNorm and data's ACTION_DIM / POSE_DIM. Offers: continuous_action_loss eq. (7),
discrete_action_loss eq. (8), flow matching (flow_loss, flow_sample), PolicyHead, ActionExpert.

  PolicyHead     a temporal trunk over the H per-frame [LRN] features (MLP = per frame, LSTM, or causal GPT;
                 eq. 10 and eq. 15) followed by an output stage:
                   "regress": pose MLP with tanh (6·L) + gripper MLP logits (L), trained with eq. (7);
                   "flow":    a flow-matching velocity network conditioned on the trunk feature (Table II).
  ActionExpert   the pi0-style mixture-of-experts action expert (Extended Fig. 2a, Table IIb): L action tokens
                 with their own norms, Q/K/V/O and FFN in every layer, sharing each layer's attention softmax
                 with the (cached) vision-language keys/values of the VLM. VL tokens never see action tokens.

Shapes: B batch, H frames, L chunk length, d VLM width. Every trunk is causal in time, so frame t's output
only depends on frames <= t (dense per-frame supervision, and streaming == batch at inference).
Flow-matching conventions follow openpi's pi0: x_t = t·eps + (1 - t)·a (t = 1 is noise), target
u = eps - a, t ~ Beta(1.5, 1)·0.999 + 0.001, inference = 10 Euler steps from t = 1 with dt = -1/10.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import RMSNorm
from data import ACTION_DIM, POSE_DIM


# -----------------------------------------------------------------------------------------------------------
# Losses, eq. (7) (continuous) and eq. (8) (discrete)
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
# Heads
# -----------------------------------------------------------------------------------------------------------


TRUNKS = ("mlp", "lstm", "gpt")  # PolicyHead's temporal trunks (VLAConfig.head, train.py --head)


def mlp(d_in, hidden, d_out):
    """Linear-ReLU stack d_in -> hidden[0] -> ... -> d_out (official MLPTanhHead uses hidden 1024-512-256)."""
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def xavier_init(module):
    """Official heads: xavier_uniform weights and zero biases for every Linear (base_policy.initialize_param)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def time_embedding(t, dim, min_period=4e-3, max_period=4.0):
    """pi0 sin/cos embedding of the flow time t (...,) -> (..., dim): geometric periods, [sin, cos] order."""
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** frac  # (dim/2,)
    ang = 2 * math.pi * t.float()[..., None] / period
    return torch.cat([ang.sin(), ang.cos()], -1)


def sample_flow_time(shape, generator=None, device="cpu"):
    """t ~ Beta(1.5, 1)·0.999 + 0.001. Beta(a, 1) has CDF x^a, so x = u^(1/a) (inverse CDF; seedable)."""
    u = torch.rand(shape, generator=generator, device=device)
    return u.pow(1 / 1.5) * 0.999 + 0.001


def flow_loss(velocity_fn, actions, mask, generator=None):
    """Flow-matching loss. actions (..., L, 7) normalized, mask (..., L) bool. velocity_fn(x_t, t) -> (..., L, 7)."""
    noise = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
    t = sample_flow_time(actions.shape[:-2], generator, actions.device).to(actions.dtype)  # (...)
    tt = t[..., None, None]
    x_t = tt * noise + (1 - tt) * actions  # t = 1: noise, t = 0: data
    err = (velocity_fn(x_t, t) - (noise - actions)).pow(2).mean(-1)  # (..., L), MSE over the 7 action dims
    m = mask.to(err.dtype)
    loss = (err * m).sum() / m.sum().clamp(min=1)
    return loss, {"loss_flow": loss.item()}


def flow_sample(velocity_fn, shape, generator=None, device="cpu", steps=10, noise=None):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 with `steps` Euler steps. -> (..., L, 7)."""
    x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
    dt = -1.0 / steps
    for i in range(steps):
        t = torch.full(shape[:-2], 1.0 + i * dt, device=device, dtype=x.dtype)
        x = x + dt * velocity_fn(x, t)
    return x


# -----------------------------------------------------------------------------------------------------------
# Temporal trunks over per-frame features (B, H, d) -> (B, H, w)
# -----------------------------------------------------------------------------------------------------------

class MLPTrunk(nn.Module):
    """Official FCDecoder's trunk: Linear(d, d/2)-ReLU-Linear(-> w), applied to each frame on its own."""

    def __init__(self, d, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, width))

    def forward(self, x):
        return self.net(x)


class LSTMTrunk(nn.Module):
    """Official LSTMDecoder's trunk (4 layers, hidden 1024 in the paper preset), run from a zero state."""

    def __init__(self, d, width, layers):
        super().__init__()
        self.lstm = nn.LSTM(d, width, num_layers=layers, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class GPTBlock(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.qkv, self.proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w))

    def forward(self, x):
        B, T, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, w/heads)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, w))
        return x + self.mlp(self.ln2(x))


class GPTTrunk(nn.Module):
    """Official GPTDecoder's trunk: Linear(d -> w), learned positions (n_positions = H), causal GPT-2 blocks."""

    def __init__(self, d, width, layers, heads, max_frames):
        super().__init__()
        self.max_frames = max_frames
        self.inp = nn.Linear(d, width)
        self.pos = nn.Parameter(torch.zeros(max_frames, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([GPTBlock(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)

    def forward(self, x):
        T = x.shape[1]
        if T > self.max_frames:
            raise ValueError(f"GPT head was built for at most {self.max_frames} frames (window H), got {T}")
        h = self.inp(x) + self.pos[:T]
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h)


# -----------------------------------------------------------------------------------------------------------
# The policy head: trunk + output stage
# -----------------------------------------------------------------------------------------------------------

class PolicyHead(nn.Module):
    """[LRN] features (B, H, d) -> a chunk of L actions per frame.

    trunk: "mlp" | "lstm" | "gpt"; objective: "regress" (pose tanh + gripper logits) | "flow".
    width / layers / heads: trunk size (paper preset: LSTM 4x1024, GPT 8 layers 8 heads 1024 wide).
    out_hidden: hidden sizes of the output MLPs (official: 1024-512-256).
    """

    def __init__(self, d, chunk, trunk="lstm", objective="regress", width=1024, layers=4, heads=8,
                 max_frames=16, out_hidden=(1024, 512, 256)):
        super().__init__()
        self.chunk, self.objective = chunk, objective
        if trunk == "mlp":
            self.trunk = MLPTrunk(d, width)
        elif trunk == "lstm":
            self.trunk = LSTMTrunk(d, width, layers)
        elif trunk == "gpt":
            self.trunk = GPTTrunk(d, width, layers, heads, max_frames)
        else:
            raise ValueError(f"head must be 'mlp', 'lstm' or 'gpt' (TRUNKS), got {trunk!r}")
        if objective == "regress":
            self.pose = mlp(width, out_hidden, POSE_DIM * chunk)  # followed by tanh
            self.gripper = mlp(width, out_hidden, chunk)  # logits of "open"
            xavier_init(self.pose)
            xavier_init(self.gripper)
        elif objective == "flow":
            # velocity network v(x_t, t | feature) = MLP([feature, Linear(x_t), temb(t)]) + s(t) * x_t.
            # The skip s(t) * x_t is our addition (not pi0's): the exact velocity of a single target is
            # (x_t - a) / t, linear in x_t with a t-dependent gain that a plain MLP learns slowly.
            self.x_in = nn.Linear(chunk * ACTION_DIM, width)
            self.t_dim = width
            self.velocity = mlp(3 * width, out_hidden, chunk * ACTION_DIM)
            self.x_scale = nn.Linear(width, chunk * ACTION_DIM)
            xavier_init(self.velocity)
        else:
            raise ValueError(f"head objective must be 'regress' or 'flow', got {objective!r}")

    def forward(self, feats):
        """feats (B, H, d) -> regress: (pose (B, H, L, 6) in [-1, 1], gripper logits (B, H, L))."""
        if self.objective != "regress":
            raise RuntimeError("a flow head has no single forward output: use loss() or predict()")
        h = self.trunk(feats)  # (B, H, w)
        B, H = h.shape[:2]
        pose = torch.tanh(self.pose(h)).view(B, H, self.chunk, POSE_DIM)
        return pose, self.gripper(h).view(B, H, self.chunk)

    def _velocity(self, h):
        def fn(x_t, t):  # x_t (..., L, 7), t (...) -> (..., L, 7)
            te = time_embedding(t, self.t_dim).to(h.dtype)
            z = torch.cat([h, self.x_in(x_t.flatten(-2)), te], -1)
            return (self.velocity(z) + self.x_scale(te) * x_t.flatten(-2)).view(*x_t.shape)
        return fn

    def loss(self, feats, actions, mask, lam=0.01, kind="huber", generator=None):
        """feats (B, H, d), actions (B, H, L, 7) normalized, mask (B, H, L) -> (loss, metrics)."""
        if self.objective == "regress":
            pose, grip = self(feats)
            return continuous_action_loss(pose, grip, actions, mask, lam=lam, kind=kind)
        return flow_loss(self._velocity(self.trunk(feats)), actions, mask, generator)

    @torch.no_grad()
    def predict(self, feats, generator=None, steps=10, last=False):
        """feats (B, H, d) -> normalized chunks (B, H, L, 7); gripper in [-1, 1] (> 0 means open).
        last=True: only the newest frame's chunk (B, 1, L, 7) (closed loop; flow then samples one chunk)."""
        if self.objective == "regress":
            pose, grip = self(feats)
            out = torch.cat([pose, (2 * torch.sigmoid(grip) - 1)[..., None]], -1)
            return out[:, -1:] if last else out
        h = self.trunk(feats)
        h = h[:, -1:] if last else h
        shape = (*h.shape[:2], self.chunk, ACTION_DIM)
        x = flow_sample(self._velocity(h), shape, generator, h.device, steps)
        return torch.cat([x[..., :POSE_DIM].clamp(-1, 1), x[..., POSE_DIM:]], -1)


# -----------------------------------------------------------------------------------------------------------
# Mixture-of-experts action expert (pi0 style)
# -----------------------------------------------------------------------------------------------------------

class ExpertLayer(nn.Module):
    """One layer of the action expert: own norms, Q/K/V/O and FFN; attention shared with the VLM layer."""

    def __init__(self, width, n_heads, n_kv_heads, head_dim):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.q = nn.Linear(width, n_heads * head_dim, bias=False)
        self.k = nn.Linear(width, n_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(width, n_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, width, bias=False)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def qkv(self, x, positions, rope):
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return rope(q, positions), rope(k, positions), v

    def forward(self, x, vl_kv, vl_valid, positions, rope):
        """x (B, L, w) action tokens; vl_kv = this VLM layer's (k, v) (B, h_kv, T_vl, hd); vl_valid (B, T_vl)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, positions, rope)
        k_all, v_all = torch.cat([vl_kv[0], k], 2), torch.cat([vl_kv[1], v], 2)  # one sequence, one softmax
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k_all, v_all = k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1)
        # action tokens see every valid VL token and every action token (bidirectional within the chunk, pi0)
        allowed = torch.cat([vl_valid, torch.ones(B, T, dtype=torch.bool, device=x.device)], 1)  # (B, T_vl+L)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed[:, None, None, :])
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        return x + self.ffn(self.norm2(x))


class ActionExpert(nn.Module):
    """pi0-style action expert over a backbone's per-layer KV cache of the vision-language prefix.

    Because VL tokens never attend to action tokens, the VLM's forward over the VL tokens is exactly the
    plain backbone forward; its per-layer (k, v) are all the expert needs. In layer i the action tokens
    compute their own q/k/v, concatenate k/v with the VLM's layer-i k/v along the sequence, and take one
    softmax over both (shared attention). At inference the VL prefix runs once; flow sampling then runs
    only the expert for each Euler step (as openpi does with its KV cache).

    objective "regress": L learned query tokens -> Linear -> pose (tanh) + gripper logit per token, eq. (7).
    objective "flow":    tokens = MLP([Linear(x_t), time_emb(t)]) (pi0's action_time_mlp) -> velocity.
    Chunk slots: every token gets a learned per-slot embedding `slot_pos` (L, w) added before the first layer,
    on top of whatever the backbone's rope() does. pi0 relies on RoPE alone, but rope() is the identity for
    absolute-position LMs (Kosmos-2) and ALiBi LMs (MPT): without slot_pos the flow velocity network would be
    exactly permutation-equivariant over the L slots there, unable to tell step 1 of the chunk from step L.
    """

    def __init__(self, backbone, chunk, objective="regress", width=None):
        super().__init__()
        w = width or backbone.hidden_size
        self.chunk, self.objective, self.width = chunk, objective, w
        self.rope = backbone.rope
        self.layers = nn.ModuleList([ExpertLayer(w, backbone.n_heads, backbone.n_kv_heads, backbone.head_dim)
                                     for _ in range(backbone.n_layers)])
        self.slot_pos = nn.Parameter(torch.randn(chunk, w) * 0.02)  # (L, w), GPT-2 style init as GPTTrunk.pos
        self.norm = RMSNorm(w)
        self.out = nn.Linear(w, ACTION_DIM)
        if objective == "regress":
            self.queries = nn.Parameter(torch.randn(chunk, w) * 0.02)
        elif objective == "flow":
            self.action_in = nn.Linear(ACTION_DIM, w)
            self.action_time = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w))
        else:
            raise ValueError(f"expert objective must be 'regress' or 'flow', got {objective!r}")

    def run(self, tokens, vl_cache, vl_valid, positions):
        """tokens (B, L, w), vl_cache = list of n_layers (k, v), positions (B, L) -> (B, L, 7) raw outputs."""
        if len(vl_cache) != len(self.layers):
            raise ValueError(f"expert has {len(self.layers)} layers but the VLM cache has {len(vl_cache)}")
        if tokens.shape[1] != self.chunk:
            raise ValueError(f"expert was built for chunks of {self.chunk} actions, got {tokens.shape[1]} tokens")
        x = tokens + self.slot_pos.to(tokens.dtype)  # (B, L, w): which chunk step each token is
        for layer, kv in zip(self.layers, vl_cache):
            x = layer(x, kv, vl_valid, positions, self.rope)
        return self.out(self.norm(x))

    def _velocity(self, vl_cache, vl_valid, positions):
        def fn(x_t, t):  # x_t (B, L, 7), t (B,)
            te = time_embedding(t, self.width).to(x_t.dtype)[:, None].expand(-1, x_t.shape[1], -1)
            tok = self.action_time(torch.cat([self.action_in(x_t), te], -1))
            return self.run(tok, vl_cache, vl_valid, positions)
        return fn

    def _regress(self, vl_cache, vl_valid, positions):
        B = positions.shape[0]
        y = self.run(self.queries[None].expand(B, -1, -1), vl_cache, vl_valid, positions)  # (B, L, 7)
        return torch.tanh(y[..., :POSE_DIM]), y[..., POSE_DIM]

    def loss(self, vl_cache, vl_valid, positions, actions, mask, lam=0.01, kind="huber", generator=None):
        """actions (B, L, 7) normalized, mask (B, L) -> (loss, metrics)."""
        if self.objective == "regress":
            pose, grip = self._regress(vl_cache, vl_valid, positions)
            return continuous_action_loss(pose, grip, actions, mask, lam=lam, kind=kind)
        return flow_loss(self._velocity(vl_cache, vl_valid, positions), actions, mask, generator)

    @torch.no_grad()
    def predict(self, vl_cache, vl_valid, positions, generator=None, steps=10):
        """-> normalized chunk (B, L, 7), gripper in [-1, 1]."""
        if self.objective == "regress":
            pose, grip = self._regress(vl_cache, vl_valid, positions)
            return torch.cat([pose, (2 * torch.sigmoid(grip) - 1)[..., None]], -1)
        B = positions.shape[0]
        x = flow_sample(self._velocity(vl_cache, vl_valid, positions), (B, self.chunk, ACTION_DIM), generator,
                        positions.device, steps)
        return torch.cat([x[..., :POSE_DIM].clamp(-1, 1), x[..., POSE_DIM:]], -1)
