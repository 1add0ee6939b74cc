"""The VLA: the four formulations of §III-C around a VLM, the closed-loop Policy, checkpoints.

Stands on: backbones.py (the VLMs), data.py (image preprocessing, action statistics and normalization eq. (5)-(6)),
heads.py (policy heads, the action expert, the losses eq. (7)-(8)). Offers, top to bottom:
  1. the discrete action tokenizer (§III-B-1) and 2. the execution strategies of Table II (Chunk / First /
     Ensemble), pure action math;
  3. VLAConfig (presets tiny / metaworld / paper), the VLA itself, how each formulation predicts, the Policy used
     by every environment, and checkpoints (save_checkpoint / load_checkpoint).

Notation follows the paper: H = history window (frames), L = action chunk length, actions are 7-d
[dx, dy, dz, droll, dpitch, dyaw, gripper] with the gripper canonically +1 = open, -1 = closed (CALVIN's
convention). Note the official code calls H `window_size` and L `fwd_pred_next_n`.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings

import numpy as np
import torch
import torch.nn as nn

import backbones
import data
import heads
from data import ACTION_DIM, OFFICIAL_BOUND, check_finite_actions, unnormalize_action

# -----------------------------------------------------------------------------------------------------------
# 1. Discrete actions (§III-B-1, following RT-2 / OpenVLA)
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
        check_finite_actions(a, "ActionTokenizer.encode")
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
# 2. Execution strategies for a stream of predicted chunks (Table II: Chunk / First / Ensemble)
# -----------------------------------------------------------------------------------------------------------

EXECUTIONS = ("chunk", "first", "ensemble")  # Table II's execution strategies, ActionExecutor's modes


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
        if mode not in EXECUTIONS:
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
            preds = [ch[self.t - s] for s, ch in self.chunks if 0 <= self.t - s < len(ch)]
            if not preds:
                raise RuntimeError(f"no stored chunk covers step {self.t}: call add_chunk first")
            if self.mode == "first":
                action = preds[-1]
            else:
                w = ensemble_weights(len(preds), self.k)
                action = (w[:, None] * np.stack(preds)).sum(0)
            # forget chunks that end at this step
            self.chunks = [(s, ch) for s, ch in self.chunks if self.t + 1 - s < len(ch)]
        self.t += 1
        return np.asarray(action, dtype=np.float32)


# -----------------------------------------------------------------------------------------------------------
# 3. The VLA (configuration, the four formulations of §III-C, the closed-loop Policy, checkpoints)
# -----------------------------------------------------------------------------------------------------------

FORMULATIONS = ("one_step_discrete", "one_step_continuous", "interleaved", "policy_head")  # §III-C
HEADS = heads.TRUNKS  # VLAConfig.head: the policy head's trunk
ACTION_LOSSES = ("huber", "mse", "flow")  # eq. (7) official / paper text, flow matching (Table II)
ATTENTIONS = ("auto", "prefix", "causal")  # the LM's mask, see VLAConfig.attention


@dataclasses.dataclass
class VLAConfig:
    """Everything that defines a VLA. Presets: VLAConfig.tiny() (CPU, minutes) and VLAConfig.paper()."""
    formulation: str = "policy_head"  # one of FORMULATIONS
    window: int = 16  # H, history frames per sample (official window_size)
    chunk: int = 10  # L, actions predicted per frame (official fwd_pred_next_n)
    head: str = "lstm"  # "mlp" | "lstm" | "gpt" (policy_head); one-step / interleaved always use the MLP head
    action_loss: str = "huber"  # "huber" (official) | "mse" (paper eq. 7) | "flow" (Table II)
    lam: float = 0.01  # gripper BCE weight in eq. (7) (official arm_gripper_loss_ratio)
    moe: bool = False  # pi0-style action expert (Table IIb); one_step_continuous only
    backbone: str = "tiny"
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)  # size overrides for the backbone
    views: tuple = ("static", "wrist")  # camera names in the data's view order
    image_size: int = 224
    train_vision: bool = True  # which backbone parts train (official KosMos: everything)
    train_language: bool = True
    train_embeddings: bool = True
    head_width: int = 1024  # LSTM hidden / GPT width / MLP-trunk width (official 1024)
    head_layers: int = 4  # LSTM layers (official 4); GPT layers (official 8)
    head_heads: int = 8  # GPT heads (official 8)
    head_mlp: tuple = (1024, 512, 256)  # output MLP hidden sizes (official MLPTanhHead)
    expert_width: int = 0  # MoE expert width, 0 = the VLM's width
    flow_steps: int = 10  # Euler steps at inference (pi0)
    n_bins: int = 256  # discrete action bins (§III-B-1)
    shift_aug: bool = True  # official random-shift augmentation in training
    action_norm: str = "quantile"  # how the training data was normalized (data.ACTION_NORMS)
    norm_bound: float = OFFICIAL_BOUND
    # LM attention: "auto" = as the backbone was pretrained (PaliGemma: prefix-LM, i.e. [BOS], images and prompt
    # see each other, what follows is causal; transformers' token_type_ids, pi0; every other family: causal),
    # "prefix" | "causal" to force one (see VLA.prefix_lm and docs/backbones.md)
    attention: str = "auto"
    # {view: [h, w]} of the training data's camera images (data.camera_sizes; {} = not recorded): Policy.act
    # refuses images that cannot come from that camera (see check_camera_image)
    camera_sizes: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def tiny(cls, **overrides):
        """CPU preset: ~1.1M-parameter VLM (+0.05-0.3M head), 64x64 images, 16 tokens per view. One-step
        formulations default to window=1 (pass window=H to train H independent frames per sample)."""
        base = dict(window=4, chunk=4, image_size=64, head_width=128, head_layers=2, head_heads=4,
                    head_mlp=(128,), backbone="tiny")
        if overrides.get("formulation", "").startswith("one_step"):
            base["window"] = 1
        return cls(**{**base, **overrides})

    @classmethod
    def metaworld(cls, **overrides):
        """The main job's preset (`python train.py` with no flags): the tiny model on Meta-World's 64x64 renders,
        a history of H=2 frames and chunks of L=8 actions, whatever the formulation.

        Deviation from the official recipe: no random-shift augmentation (shift_aug=False). Meta-World's corner
        camera never moves, so where a thing is in the image is where it is on the table; shifting the 64 px
        frame by up to +-3 px (the official 10 px at 224) blurs exactly the cue the button needs, and the
        policy pressed beside it. Without the shift: 97.3% instead of 88.0% (docs/main_job.md)."""
        return cls.tiny(**{"window": 2, "chunk": 8, "image_size": 64, "shift_aug": False, **overrides})

    @classmethod
    def paper(cls, backbone, **overrides):
        """The official code's sizes (Kosmos-2 policy head, CALVIN): H=16, L=10, LSTM 4x1024, 224 px.
        backbone: a pretrained VLM folder (official default: microsoft/kosmos-2-patch14-224 downloaded locally)."""
        base = dict(window=16, chunk=10, head="lstm", head_width=1024, head_layers=4, head_heads=8,
                    head_mlp=(1024, 512, 256), image_size=224, backbone=backbone)
        if overrides.get("head") == "gpt":
            base["head_layers"] = 8  # official GPTDecoder: 8 layers, 8 heads
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d):
        """A saved config (config.json's "config") -> VLAConfig, checked like a flag: every key must be a known
        field of the right JSON type (e.g. "window": 2, not "2"; "views": ["static"], not "static"); then
        validate(). Errors name the key."""
        if not isinstance(d, dict):
            raise ValueError(f"a VLAConfig must be a JSON object {{field: value}}, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown VLAConfig field(s) {unknown}; was the checkpoint written by a newer version?")
        d = dict(d)
        d.setdefault("attention", "causal")  # written before the field existed: those runs trained causally
        item = {"views": str, "head_mlp": int}  # element type of the tuple fields
        for k, v in d.items():
            t = fields[k].type
            ok = {bool: lambda x: isinstance(x, bool),
                  int: lambda x: isinstance(x, int) and not isinstance(x, bool),
                  float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                  str: lambda x: isinstance(x, str),
                  dict: lambda x: isinstance(x, dict),
                  tuple: lambda x: isinstance(x, (list, tuple)) and all(
                      isinstance(e, item[k]) and not isinstance(e, bool) for e in x)}[t](v)
            if not ok:
                want = {tuple: f"a list of {item.get(k, str).__name__}", dict: "an object {...}"}.get(t, t.__name__)
                raise ValueError(f"key {k!r} must be {want}, got {v!r} ({type(v).__name__}); e.g. "
                                 f"{json.dumps(dataclasses.asdict(cls())[k])}")
            if t is tuple:
                d[k] = tuple(v)
            elif t is float:
                d[k] = float(v)
        return cls(**d).validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"invalid VLAConfig: {msg}")
        if self.formulation not in FORMULATIONS:
            bad(f"formulation must be one of {FORMULATIONS}, got {self.formulation!r}")
        if self.head not in HEADS:
            bad(f"head must be 'mlp', 'lstm' or 'gpt', got {self.head!r}")
        if self.action_loss not in ACTION_LOSSES:
            bad(f"action_loss must be 'huber', 'mse' or 'flow', got {self.action_loss!r}")
        if self.window < 1 or self.chunk < 1:
            bad(f"window (H) and chunk (L) must be >= 1, got H={self.window}, L={self.chunk}")
        if self.formulation == "one_step_discrete":
            if self.moe or self.action_loss == "flow":
                bad("one_step_discrete predicts tokens with the LM head: moe and flow do not apply")
        if self.moe and self.formulation != "one_step_continuous":
            bad(f"moe (the pi0-style action expert, Table IIb) is implemented for one_step_continuous, "
                f"got {self.formulation}")
        if not self.views:
            bad("views must name at least one camera, e.g. ('static', 'wrist')")
        if self.attention not in ATTENTIONS:
            bad(f"attention must be 'auto' (the backbone's own: prefix-LM for PaliGemma), 'prefix' or 'causal', "
                f"got {self.attention!r}")
        if len(set(self.views)) != len(self.views):
            bad(f"views must not repeat a camera, got {self.views}")
        for k in ("image_size", "head_width", "head_layers", "head_heads", "flow_steps"):
            if getattr(self, k) < 1:
                bad(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.n_bins < 2:
            bad(f"n_bins must be >= 2, got {self.n_bins}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            bad(f"lam (gripper loss weight) must be a finite number >= 0, got {self.lam}")
        if self.action_norm not in data.ACTION_NORMS:
            bad(f"action_norm must be 'quantile' or 'bounds', got {self.action_norm!r}")
        if not (self.norm_bound > 0 and math.isfinite(self.norm_bound)):
            bad(f"norm_bound must be a finite number > 0, got {self.norm_bound}")
        for v, hw in self.camera_sizes.items():
            if not (isinstance(hw, (list, tuple)) and len(hw) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in hw)):
                bad(f"camera_sizes[{v!r}] must be [height, width] in pixels, got {hw!r}")
        return self


def _pack(valid, *tensors):
    """Move each row's valid entries to the front, keeping their order. valid (B, K); tensors (B, K, ...)."""
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # (B, K)
    out = []
    for t in (valid,) + tensors:
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
        out.append(t.gather(1, idx))
    return out


class VLA(nn.Module):
    """A VLM backbone + one of the four formulations of §III-C + a head.

    forward(batch) -> (loss, metrics). batch: the default collation of data.py windows:
      images uint8 (B, H, V, 3, S, S), actions (B, H, L, 7) normalized, action_mask bool (B, H, L),
      instruction list[str] (B). (A `state` entry is ignored: the paper's setting uses no proprioception.)
    Token layout per frame (official): [BOS] [wrist image] [static image] [text] [LRN] [EOS], sequences
    padded at the end. The LM attends causally, except PaliGemma (config.attention "auto"): a prefix-LM over
    [BOS] images text, as pretrained (prefix_mask). Which parts train: config.train_vision / train_language / train_embeddings set
    requires_grad of the backbone parts; [LRN], heads and the MoE expert always train.
    trainable_parameters() lists what the optimizer should see.
    """

    def __init__(self, config, tokenizer_path=None, backbone_folder=None):
        super().__init__()
        self.config = c = config.validate()
        # backbone_folder (load_checkpoint): the run's copy of a pretrained folder, without weights (the run has them)
        no_weights = {"weights": False} if backbone_folder else {}
        self.backbone = backbones.build_backbone(backbone_folder or c.backbone, image_size=c.image_size,
                                                 tokenizer_path=tokenizer_path, **c.backbone_kwargs, **no_weights)
        bb = self.backbone
        if bb.tokenizer is None:  # backbones.load_vlm allows it (logit checks); a VLA cannot train or act without it
            folder = os.path.expanduser(backbone_folder or c.backbone)
            raise FileNotFoundError(f"backbone folder {folder} has no tokenizer file {bb.tokenizer_filename!r} (found "
                                    f"{sorted(os.listdir(folder))}); copy it from the model's release next to "
                                    f"config.json")
        if bb.image_size != c.image_size:
            raise ValueError(f"backbone {c.backbone} takes {bb.image_size}px images but config.image_size is "
                             f"{c.image_size}")
        if c.formulation in ("interleaved", "one_step_discrete") and not bb.image_tokens_inline:
            raise ValueError(f"{c.formulation} needs a decoder-only backbone (image tokens in the sequence); "
                             f"{c.backbone} is cross-attention based: use policy_head or one_step_continuous")
        if c.attention == "prefix" and not isinstance(bb, backbones.PretrainedVLM):
            raise ValueError(f"attention='prefix' needs a backbone that takes an attention mask (the Kosmos-2, "
                             f"PaliGemma and LLaVA families); {c.backbone} is always causal: use attention='auto'")
        # PaliGemma was pretrained as a prefix-LM (bidirectional over [BOS] images prompt); see prefix_mask
        self.prefix_lm = c.attention == "prefix" or (c.attention == "auto" and getattr(bb, "family", "") == "paligemma")
        d = bb.hidden_size
        self.lrn = nn.Parameter(torch.zeros(d))  # the learnable [LRN] token, zero-initialised (official)
        objective = "flow" if c.action_loss == "flow" else "regress"
        if c.formulation == "one_step_discrete":
            self.action_tokenizer = ActionTokenizer(bb.vocab_size, n_bins=c.n_bins)
        elif c.moe:
            self.expert = heads.ActionExpert(bb, c.chunk, objective, width=c.expert_width or None)
        else:
            trunk = c.head if c.formulation == "policy_head" else "mlp"  # eq. (10), (13): an MLP on [LRN]
            self.head = heads.PolicyHead(d, c.chunk, trunk, objective, width=c.head_width, layers=c.head_layers,
                                         heads=c.head_heads, max_frames=c.window, out_hidden=c.head_mlp)
        # official multi-view order: wrist tokens before static tokens, other cameras after, in config order
        self.view_order = sorted(range(len(c.views)), key=lambda i: {"wrist": 0, "static": 1}.get(c.views[i], 2))
        groups = bb.trainable_groups()
        for name, flag in (("vision", c.train_vision), ("language", c.train_language),
                           ("embeddings", c.train_embeddings)):
            for p in groups[name]:
                p.requires_grad_(flag)
        self._ids = {}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self):
        return self.lrn.device

    # --- inputs ---

    def text_ids(self, instruction):
        """Prompt token ids (no BOS/EOS). Continuous: the backbone's own format; discrete: the official
        PhiPromptBuilder question (with K = L, not CALVIN's L + 1 quirk)."""
        ids = self._ids.get(instruction)
        if ids is None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
            if self.config.formulation == "one_step_discrete":
                L = self.config.chunk
                ask = "What action" if L == 1 else f"What {L} step actions"
                text = f"Input: {ask} should the robot take to {instruction}?\nOutput: "
            else:
                text = self.backbone.prompt(instruction)
            ids = self._ids[instruction] = list(self.backbone.tokenizer.encode(text))
        return ids

    def image_tokens(self, images):
        """uint8 (N, V, 3, S, S) -> (N, V * T_img, d): augment (train), normalize, encode, wrist first."""
        c, bb = self.config, self.backbone
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[1] != len(c.views) \
                or tuple(images.shape[2:]) != (3, c.image_size, c.image_size):
            raise ValueError(f"expected uint8 images (N, {len(c.views)}, 3, {c.image_size}, {c.image_size}) for "
                             f"views {c.views}, got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.device)
        x = data.normalize_images(images, bb.image_mean, bb.image_std)  # (N, V, 3, S, S) float
        if self.training and c.shift_aug:  # official pads (10 static, 4 wrist) are for 224 px: scale them
            x = torch.stack([data.random_shift(x[:, i], round(data.SHIFT_PAD.get(v, 0) * c.image_size / 224))
                             for i, v in enumerate(c.views)], 1)
        N, V = x.shape[:2]
        img_tok = bb.encode_images(x.flatten(0, 1))  # (N * V, T_img, d)
        img_tok = img_tok.view(N, V, *img_tok.shape[1:])[:, self.view_order]
        return img_tok.flatten(1, 2)  # (N, V * T_img, d)

    def sequences(self, img_tok, tails):
        """Build [BOS] [image tokens] [tail] per row, padded at the end.

        img_tok (N, T_img, d); tails: N lists of token ids, where -1 marks the [LRN] slot.
        -> embeds (N, T, d), valid (N, T), is_lrn (N, T), ids (N, T) (-1 for image and [LRN] slots).
        """
        bb, dev = self.backbone, self.device
        N, T_img, d = img_tok.shape
        width = max(len(t) for t in tails)
        ids = torch.full((N, width), bb.tokenizer.pad_id, dtype=torch.long)
        valid = torch.zeros(N, width, dtype=torch.bool)
        for i, t in enumerate(tails):
            ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            valid[i, :len(t)] = True
        ids, valid = ids.to(dev), valid.to(dev)
        is_lrn = ids == -1
        emb = bb.embed_tokens(ids.clamp(min=0))
        emb = torch.where(is_lrn[..., None], self.lrn.to(emb.dtype), emb)  # (N, width, d)
        inline = bb.image_tokens_inline  # False (Flamingo style): images enter through media=, not the sequence
        parts, pre = ([img_tok, emb], T_img) if inline else ([emb], 0)
        if bb.tokenizer.bos_id is not None:
            bos = torch.full((N, 1), bb.tokenizer.bos_id, dtype=torch.long, device=dev)
            parts.insert(0, bb.embed_tokens(bos))
            pre += 1
        x = torch.cat(parts, 1)
        lead = torch.ones(N, pre, dtype=torch.bool, device=dev)
        img_ids = torch.full((N, pre), -1, dtype=torch.long, device=dev)
        if bb.tokenizer.bos_id is not None:
            img_ids[:, 0] = bb.tokenizer.bos_id
        return (x, torch.cat([lead, valid], 1), torch.cat([~lead, is_lrn], 1), torch.cat([img_ids, ids], 1))

    def lrn_tail(self, instruction):
        eos = self.backbone.tokenizer.eos_id
        return self.text_ids(instruction) + [-1] + ([eos] if eos is not None else [])  # [LRN] before EOS

    @staticmethod
    def _mask_kw(mask):
        """backbone(..., **_mask_kw(mask)): only the families that take a mask (PretrainedVLM) ever get one."""
        return {} if mask is None else {"mask": mask}

    def context_tokens(self, instruction):
        """Tokens of the longest sequence the LM sees for one instruction: [BOS] [images] prompt [LRN] [EOS] per
        frame (images only inline for decoder-only VLMs), H segments back to back for `interleaved`, the 7 L action
        tokens for `one_step_discrete`."""
        c, bb = self.config, self.backbone
        n_img = len(c.views) * bb.n_image_tokens if bb.image_tokens_inline else 0
        bos = int(bb.tokenizer.bos_id is not None)
        if c.formulation == "one_step_discrete":
            return bos + n_img + len(self.text_ids(instruction)) + ACTION_DIM * c.chunk + 1
        per_frame = bos + n_img + len(self.lrn_tail(instruction))
        return per_frame * (c.window if c.formulation == "interleaved" else 1)

    def check_context(self, instruction):
        """Refuse an instruction whose sequence does not fit the backbone's context (backbone.max_positions): a
        10,000-character instruction otherwise runs, slowly, on positions the LM never saw."""
        limit = getattr(self.backbone, "max_positions", None)
        n = self.context_tokens(instruction)
        if limit is not None and n > limit:
            text = len(self.text_ids(instruction))
            raise ValueError(f"instruction of {len(instruction)} characters ({text} tokens) gives a sequence of {n} "
                             f"tokens, but the backbone {self.config.backbone!r} has a context of {limit} positions "
                             f"(max_positions); shorten the instruction to the task itself, e.g. 'open the drawer'")
        return n

    def media(self, img_tok):
        """What forward(media=) gets: None for decoder-only VLMs (images are inline), else the image tokens."""
        return None if self.backbone.image_tokens_inline else img_tok

    @staticmethod
    def positions(x):
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)

    def prefix_mask(self, valid, n_prefix):
        """The LM's attention mask for rows whose first n_prefix (N,) positions are the prefix: [BOS], image
        tokens and the instruction prompt. Prefix-LM (self.prefix_lm): every query sees every valid prefix key,
        the rest ([LRN], action tokens, [EOS], later interleaved frames) is causal, as transformers' PaliGemma
        with token_type_ids 0 on the prefix. -> bool (N, 1, T, T), or None for the backbone's causal mask."""
        if not self.prefix_lm:
            return None
        T = valid.shape[1]
        prefix = torch.arange(T, device=valid.device)[None] < torch.as_tensor(n_prefix, device=valid.device)[:, None]
        return backbones.padding_attention_mask(valid, T, bidir_keys=prefix & valid)

    def n_prefix(self, x, tails, instructions):
        """(N,) prefix length of each row of sequences(x, tails): [BOS] + image tokens + the prompt's tokens."""
        lead = x.shape[1] - max(len(t) for t in tails)  # [BOS] + image tokens, the same in every row
        return torch.tensor([lead + len(self.text_ids(s)) for s in instructions], device=x.device)

    # --- per-formulation feature extraction ---

    def frame_features(self, images, instructions):
        """Independent per-frame passes (policy_head, one_step_continuous; eq. 10, 14).
        images uint8 (B, H, V, 3, S, S), instructions (B) -> [LRN] last-layer hidden states (B, H, d)."""
        B, H = images.shape[:2]
        img_tok = self.image_tokens(images.flatten(0, 1))  # (B*H, V*T_img, d)
        instructions = [instructions[b] for b in range(B) for _ in range(H)]
        tails = [self.lrn_tail(s) for s in instructions]
        x, valid, is_lrn, _ = self.sequences(img_tok, tails)
        mask = self.prefix_mask(valid, self.n_prefix(x, tails, instructions))
        hidden, _ = self.backbone(x, self.positions(x), media=self.media(img_tok), **self._mask_kw(mask))  # (B*H, T, d)
        return hidden[is_lrn].view(B, H, -1)

    def interleaved_features(self, images, instructions):
        """One causal sequence of H segments per sample (eq. 12-13) -> every [LRN]_t's hidden state (B, H, d)."""
        B, H = images.shape[:2]
        img_tok = self.image_tokens(images.flatten(0, 1))  # (B*H, V*T_img, d)
        return self.interleaved_from_tokens(img_tok.view(B, H, *img_tok.shape[1:]), instructions)

    def interleaved_from_tokens(self, img_tok, instructions):
        """interleaved_features from image tokens already encoded, img_tok (B, H, V*T_img, d). The vision tower sees
        each frame alone, so tokens encoded one frame at a time (Policy caches them) give the same result."""
        B, H = img_tok.shape[:2]
        img_tok = img_tok.flatten(0, 1)  # (B*H, V*T_img, d)
        tails = [self.lrn_tail(instructions[b]) for b in range(B) for _ in range(H)]
        x, valid, is_lrn, _ = self.sequences(img_tok, tails)  # (B*H, n, d): one segment per row
        n_pre = self.n_prefix(x, tails, [instructions[b] for b in range(B) for _ in range(H)]).view(B, H)[:, 0]
        x, valid, is_lrn = (t.reshape(B, H * t.shape[1], *t.shape[2:]) for t in (x, valid, is_lrn))
        valid, x, is_lrn = _pack(valid, x, is_lrn)  # segments back to back, padding at the end of each row
        # prefix-LM: only the first frame's [BOS] images prompt is the prefix; from its [LRN] on all is causal
        hidden, _ = self.backbone(x, self.positions(x), **self._mask_kw(self.prefix_mask(valid, n_pre)))
        return hidden[is_lrn].view(B, H, -1)

    def vl_prefix(self, images, instructions):
        """MoE: the vision-language prefix [BOS][images][text] of each frame through the plain VLM.
        images (N, V, 3, S, S) -> (hidden (N, T, d), per-layer cache, valid (N, T), action positions (N, L))."""
        img_tok = self.image_tokens(images)
        x, valid, _, _ = self.sequences(img_tok, [self.text_ids(s) for s in instructions])
        mask = self.prefix_mask(valid, valid.sum(1))  # prefix-LM: the whole VL prefix is bidirectional (pi0)
        hidden, cache = self.backbone(x, self.positions(x), media=self.media(img_tok), **self._mask_kw(mask))
        pos = valid.sum(1, keepdim=True) + torch.arange(self.config.chunk, device=x.device)  # after the prefix
        return hidden, cache, valid, pos

    # --- training ---

    def forward(self, batch, generator=None):
        """-> (loss, metrics). generator: optional torch.Generator for the flow-matching noise and times."""
        c = self.config
        images, instructions = batch["images"], list(batch["instruction"])
        actions = batch["actions"].to(self.device, torch.float32)
        mask = batch["action_mask"].to(self.device).bool()
        B, H = images.shape[:2]
        if tuple(actions.shape) != (B, H, c.chunk, ACTION_DIM) or tuple(mask.shape) != (B, H, c.chunk):
            raise ValueError(f"expected actions (B, H, {c.chunk}, 7) and action_mask (B, H, {c.chunk}) matching "
                             f"images (B={B}, H={H}); got {tuple(actions.shape)} and {tuple(mask.shape)}: "
                             f"build the dataset with chunk={c.chunk}")
        if len(instructions) != B:
            raise ValueError(f"got {len(instructions)} instructions for a batch of {B}")
        if H > c.window:
            raise ValueError(f"batch has {H} frames per sample but the model was configured with window={c.window}")
        kind = "mse" if c.action_loss == "flow" else c.action_loss
        if c.formulation == "one_step_discrete":
            return self._discrete_loss(images, instructions, actions, mask)
        if c.moe:
            _, cache, valid, pos = self.vl_prefix(images.flatten(0, 1), [s for s in instructions for _ in range(H)])
            return self.expert.loss(cache, valid, pos, actions.flatten(0, 1), mask.flatten(0, 1), c.lam, kind,
                                    generator)
        if c.formulation == "interleaved":
            feats = self.interleaved_features(images, instructions)
        else:
            feats = self.frame_features(images, instructions)
        return self.head.loss(feats, actions, mask, lam=c.lam, kind=kind, generator=generator)

    def _discrete_loss(self, images, instructions, actions, mask):
        """eq. (8): teacher-forced next-token CE on the 7·L action tokens (+ EOS, official predict_stop_token).
        One-step: the H frames of a window (if H > 1) are independent samples (no interleaved-discrete, §III-C)."""
        B, H = images.shape[:2]
        instructions = [s for s in instructions for _ in range(H)]
        images, actions, mask, B = images.flatten(0, 1), actions.flatten(0, 1), mask.flatten(0, 1), B * H
        img_tok = self.image_tokens(images)
        act_ids = self.action_tokenizer.encode(actions).flatten(1).tolist()  # (B, 7L)
        step_ok = mask.repeat_interleave(ACTION_DIM, 1).tolist()  # (B, 7L): masked steps are not targets
        eos = self.backbone.tokenizer.eos_id
        tails, sup = [], []
        for b in range(B):
            p = self.text_ids(instructions[b])
            tails.append(p + act_ids[b] + ([eos] if eos is not None else []))
            sup.append([False] * len(p) + step_ok[b] + ([True] if eos is not None else []))
        x, valid, _, ids = self.sequences(img_tok, tails)
        target = torch.zeros_like(valid)  # (B, T) True where the token is an action/EOS target
        T_pre = x.shape[1] - max(len(t) for t in tails)  # [BOS] + image tokens
        for b in range(B):
            target[b, T_pre:T_pre + len(sup[b])] = torch.tensor(sup[b], device=target.device)
        mask = self.prefix_mask(valid, self.n_prefix(x, tails, instructions))  # actions + EOS are causal
        hidden, _ = self.backbone(x, self.positions(x), **self._mask_kw(mask))
        logits = self.backbone.lm_logits(hidden)  # (B, T, vocab)
        # logits at position p predict the token at p + 1
        return heads.discrete_action_loss(logits[:, :-1], ids[:, 1:].clamp(min=0), target[:, 1:])

    # --- inference on whole windows (teacher forced; tests, offline evaluation) ---

    @torch.no_grad()
    def predict(self, images, instructions, generator=None):
        """images uint8 (B, H, V, 3, S, S) -> normalized chunks (B, H, L, 7) for every frame (gripper in [-1, 1])."""
        c = self.config
        B, H = images.shape[:2]
        if c.formulation == "one_step_discrete":
            return torch.stack([torch.stack([self.decode_chunk(images[b, t:t + 1], instructions[b])[0]
                                             for t in range(H)]) for b in range(B)])
        if c.moe:
            _, cache, valid, pos = self.vl_prefix(images.flatten(0, 1), [s for s in instructions for _ in range(H)])
            out = self.expert.predict(cache, valid, pos, generator, c.flow_steps)
            return out.view(B, H, c.chunk, ACTION_DIM)
        feats = (self.interleaved_features if c.formulation == "interleaved" else self.frame_features)(
            images, instructions)
        return self.head.predict(feats, generator, c.flow_steps)

    @torch.no_grad()
    def decode_chunk(self, images, instruction):
        """one_step_discrete: greedy decoding of the whole chunk (7·L tokens) with a KV cache (the official
        code decodes one action only). images uint8 (1, V, 3, S, S) -> normalized chunk (1, L, 7)."""
        img_tok = self.image_tokens(images)
        x, valid, _, _ = self.sequences(img_tok, [self.text_ids(instruction)])
        mask = self.prefix_mask(valid, valid.sum(1))  # the prompt is all prefix; decoded tokens are causal (cache)
        hidden, cache = self.backbone(x, self.positions(x), **self._mask_kw(mask))
        at, pos, out = self.action_tokenizer, x.shape[1], []
        for _ in range(ACTION_DIM * self.config.chunk):
            logits = self.backbone.lm_logits(hidden[:, -1])[:, at.id_min:at.id_max + 1]  # only action ids
            nxt = logits.argmax(-1, keepdim=True) + at.id_min  # (1, 1)
            out.append(nxt)
            hidden, cache = self.backbone(self.backbone.embed_tokens(nxt), torch.full_like(nxt, pos), cache)
            pos += 1
        return at.decode(torch.cat(out, 1)).view(1, self.config.chunk, ACTION_DIM)

    # --- closed loop: how each formulation predicts from the frames recorded so far (Policy asks here) ---

    @torch.no_grad()
    def record_frame(self, images, instruction, cache=True, kv_state=None):
        """What the closed loop keeps of one new frame, images uint8 (1, V, 3, S, S), for predict_step:
          cache=False or a one-step formulation: the frame itself;
          policy_head:  its [LRN] feature (1, d) (per-frame passes are independent, so this is exact);
          interleaved:  its image tokens (1, V*T_img, d) (the vision tower sees one frame at a time: exact);
                        cache="approximate": the new [LRN] feature (1, d) of interleaved_step's KV cache, which
                        lives in kv_state (a dict the caller keeps, {} after a reset)."""
        c = self.config
        if c.formulation == "interleaved" and cache == "approximate":
            return self.interleaved_step(images, instruction, kv_state)
        if not cache or c.formulation not in ("policy_head", "interleaved"):
            return images
        if c.formulation == "policy_head":
            return self.frame_features(images[None], [instruction])[:, 0]
        return self.image_tokens(images)

    @torch.no_grad()
    def predict_step(self, frames, instruction, cache=True, generator=None):
        """The newest frame's normalized chunk (L, 7) from the last H frames recorded by record_frame (oldest
        first, the same `cache`): equal to predict() over the raw frames (cache="approximate" aside)."""
        c = self.config
        if c.formulation not in ("policy_head", "interleaved"):  # one-step formulations: no history
            return self.predict(frames[-1][None], [instruction], generator)[0, -1]
        if c.formulation == "interleaved" and cache == "approximate":
            feats = frames[-1][:, None]  # (1, 1, d)
        elif c.formulation == "policy_head":
            window = torch.stack(list(frames), 1)  # (1, h, d) features, or (1, h, V, 3, S, S) raw frames
            feats = window if cache else self.frame_features(window, [instruction])  # (1, h, d)
        else:
            window = torch.stack(list(frames), 1)  # (1, h, V*T_img, d) image tokens, or raw frames
            feats = (self.interleaved_from_tokens if cache else self.interleaved_features)(window, [instruction])
            feats = feats[:, -1:]  # (1, 1, d): the newest [LRN] of a pass over the last H frames
        return self.head.predict(feats, generator, c.flow_steps, last=True)[0, -1]

    @torch.no_grad()
    def interleaved_step(self, images, instruction, state):
        """APPROXIMATE streaming interleaved inference (Policy(cache="approximate")): append one segment
        [BOS][img][text][LRN][EOS] to a KV cache and evict the oldest once H segments are cached.

        images uint8 (1, V, 3, S, S); state: a dict the caller keeps between steps ({} after a reset).
        Costs one frame's tokens. Exact (== a pass over the same frames, what training sees) only while at most
        H frames have been seen. Afterwards it is NOT the trained model: the kept frames' keys/values were
        computed while the evicted frames were still visible (training never shows a frame its predecessors
        beyond the window), and the positions keep counting past anything seen in training; RoPE's relative
        angles do not remove the first effect (docs/history.md has the measured error). With absolute position embeddings (Kosmos-2's sinusoids) the positions
        themselves leave the trained range, so this is refused there (see approximate_cache_error).
        -> the new [LRN]'s last-layer hidden state (1, d).
        """
        err = approximate_cache_error(self.backbone)
        if err:
            raise ValueError(err)
        img_tok = self.image_tokens(images)
        x, _, is_lrn, _ = self.sequences(img_tok, [self.lrn_tail(instruction)])
        n, cache, n_seg = x.shape[1], state.get("cache"), state.get("n_seg", 0)
        if cache is not None and n_seg >= self.config.window:
            cache = [(k[:, :, n:], v[:, :, n:]) for k, v in cache]  # evict the oldest segment
            n_seg -= 1
        start = state.get("next_pos", 0)
        pos = torch.arange(start, start + n, device=x.device)[None]  # (1, n)
        # prefix-LM: the first segment's [BOS] images prompt is the prefix (as interleaved_features)
        mask = self.prefix_mask(torch.ones(1, n, dtype=torch.bool, device=x.device),
                                self.n_prefix(x, [self.lrn_tail(instruction)], [instruction])) if cache is None else None
        hidden, cache = self.backbone(x, pos, cache, **self._mask_kw(mask))
        state.update(cache=cache, n_seg=n_seg + 1, next_pos=start + n)
        return hidden[is_lrn].view(1, -1)


def position_kind(backbone):
    """How a backbone's LM encodes positions: "rope" (rotary: attention sees position differences), "alibi"
    (MPT: a bias on key - query distance) or "absolute" (position embeddings added to the input, Kosmos-2).
    Read off the interface: rope() rotates unless the LM adds absolute positions or uses ALiBi."""
    lm = getattr(backbone, "lm", None)
    if isinstance(lm, backbones.MptLM):
        return "alibi"
    q = torch.ones(1, 1, 2, backbone.head_dim)
    p = next(backbone.parameters())
    q = q.to(p.device, p.dtype)
    rotated = backbone.rope(q, torch.tensor([[0, 3]], device=p.device))
    return "absolute" if torch.equal(rotated, q) else "rope"


def approximate_cache_error(backbone):
    """Why Policy(cache="approximate") is refused on this backbone, or "" where its error stays bounded."""
    kind = position_kind(backbone)
    if kind == "absolute":
        return (f"cache='approximate' is refused for this backbone ({getattr(backbone, 'family', 'absolute')}): "
                f"its LM adds absolute position embeddings, and a streaming KV cache keeps counting positions "
                f"past anything seen in training (tens of thousands over one CALVIN subtask), so the error is "
                f"unbounded; use cache=True (exact)")
    return ""


def _select_stats(stats, dataset_key):
    """{dataset_key: stats} (or one stats dict) -> the stats to unnormalize with. Missing key = error."""
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"action statistics must be a dict {{dataset_key: stats}}, got {type(stats).__name__}")
    if "q01" in stats:  # a single stats dict
        return stats
    if dataset_key is None:
        if len(stats) != 1:
            raise ValueError(f"the checkpoint has statistics for several datasets {sorted(stats)}: pass "
                             f"dataset_key=... to choose the one whose action units the robot expects")
        dataset_key = next(iter(stats))
    if dataset_key not in stats:
        raise KeyError(f"no action statistics for dataset {dataset_key!r}; the checkpoint has {sorted(stats)}")
    return stats[dataset_key]


MIN_CAMERA_PX = 16  # no camera of a manipulation dataset is smaller; 1x1 or 4x4 images are a bug upstream
CAMERA_ASPECT_TOLERANCE = 1.5  # max ratio between the live and the trained camera's aspect (w / h), see below
CAMERA_MIN_SCALE = 0.25  # live images at least 1/4 of the trained camera's height and width


def check_camera_image(view, hw, trained_hw, image_size):
    """Can an image of (h, w) pixels come from the camera a policy was trained on? Raises ValueError if not;
    returns a warning text (or None) when the training camera size was not recorded.

    Every image is resized to the model's square input (data.resize_images), so a wrong camera does not crash:
    it silently changes the scene's geometry. Rule: each side >= MIN_CAMERA_PX; if the training data's size
    (h0, w0) is known (VLAConfig.camera_sizes), the aspect ratio must be within a factor 1.5 of w0 / h0 and
    each side at least 1/4 of the trained one. The factor 1.5, not exact equality, because datasets are often
    stored already squashed to a square (robot.py --record-size, Bridge at 256x256) while the live camera
    streams its native 4:3 or 5:4 frames (SimplerEnv 640x480 / 640x512), which training squashed the same way.
    """
    h, w = int(hw[0]), int(hw[1])
    if min(h, w) < MIN_CAMERA_PX:
        raise ValueError(f"camera {view!r} image is {h}x{w} (h x w) pixels: below the minimum of {MIN_CAMERA_PX} "
                         f"px per side" + (f"; this policy was trained on {trained_hw[0]}x{trained_hw[1]} images"
                                           if trained_hw else "") + "; pass the camera's full frame")
    if not trained_hw:
        if max(h / w, w / h) > 1.05:
            return (f"camera {view!r}: the checkpoint does not record its training camera size (VLAConfig."
                    f"camera_sizes is empty: saved before it existed, or not by train.py), so this {h}x{w} image is "
                    f"squashed to {image_size}x{image_size} unchecked; make sure the training images had the same "
                    f"aspect ratio")
        return None
    h0, w0 = trained_hw
    aspect, aspect0 = w / h, w0 / h0
    if max(aspect / aspect0, aspect0 / aspect) > CAMERA_ASPECT_TOLERANCE or h < CAMERA_MIN_SCALE * h0 \
            or w < CAMERA_MIN_SCALE * w0:
        raise ValueError(f"camera {view!r} image is {h}x{w} (h x w) pixels, but this policy was trained on "
                         f"{h0}x{w0} images from that camera (aspect {aspect:.2f} vs {aspect0:.2f}, allowed factor "
                         f"{CAMERA_ASPECT_TOLERANCE}; at least {CAMERA_MIN_SCALE:g} x the trained size): is it the "
                         f"right camera and resolution? Crop/resize to {h0}x{w0}, or pass "
                         f"Policy(check_cameras=False) if the difference is intended")
    return None


class Policy:
    """A trained VLA in closed loop: reset() at each episode/subtask, act(obs, instruction) every step.

    obs: {"static": HxWx3 uint8, "wrist": HxWx3 uint8, ["state": ...]} (the cameras named in config.views).
    Returns the action (7,) float32 in the dataset's original units, gripper exactly ±1.
    The closed loop is the trained model: every step equals a fresh pass over the last H frames, as in
    training (to float tolerance; tests/test_matrix.py checks it on every backbone). The Policy only records
    frames (self.history, what VLA.record_frame keeps of each) and asks VLA.predict_step for the chunk; the
    VLA is the one place that knows how each formulation predicts. History caches:
      cache=True (default, exact):
        policy_head: the per-frame [LRN] features of the last H frames; a step runs the VLM on the new frame
                     only and the head over the cached features (exact: per-frame passes are independent).
        interleaved: the per-frame image tokens of the last H frames (the vision tower sees one frame at a
                     time, so this is exact); a step encodes the new frame and reruns the LM over the window
                     (the kept frames' hidden states change once the oldest frame leaves the window, so no
                     KV cache is exact past H frames).
      cache=False: recompute the whole window from the raw frames every step (the official wrapper's way).
      cache="approximate": interleaved only differs: a KV cache of the last H segments (VLA.interleaved_step),
                     one frame's tokens per step, NOT equal to the trained model past H frames; refused on
                     backbones with absolute positions (Kosmos-2), where its error is unbounded.
    A changed instruction resets the history (as SimplerEnv's wrapper does).
    execution: "chunk" | "first" | "ensemble" (ActionExecutor, Table II). seed: flow-matching noise, reseeded
    at every reset() so evaluations are reproducible.
    """

    def __init__(self, vla, stats, execution="chunk", dataset_key=None, n_exec=None, k=0.01, seed=0, cache=True,
                 check_cameras=True):
        self.vla = vla.eval()
        self.config = vla.config
        self.stats = _select_stats(stats, dataset_key)
        self.check_cameras = check_cameras  # False: skip check_camera_image (e.g. a 16:9 camera squashed to square)
        self._warned_cameras = set()
        self.executor = ActionExecutor(execution, n_exec=n_exec, k=k)
        if cache not in (True, False, "approximate"):
            raise ValueError(f"cache must be True (exact per-frame caches, the default), False (recompute the "
                             f"window from raw frames) or 'approximate' (interleaved KV cache), got {cache!r}")
        if cache == "approximate" and self.config.formulation == "interleaved":
            err = approximate_cache_error(vla.backbone)
            if err:
                raise ValueError(err)
        self.seed, self.cache = seed, cache
        self.generator = torch.Generator(device=vla.device)
        self.reset()

    @classmethod
    def from_pretrained(cls, run_dir, execution="chunk", dataset_key=None, device="cpu", verify=True, **kwargs):
        """Load a run directory (verified against its manifest.json, see load_checkpoint) as a Policy. Verifying
        reads every file once more (seconds for a multi-GB run, docs/history.md)."""
        vla, stats, _ = load_checkpoint(run_dir, device, verify=verify)
        return cls(vla, stats, execution=execution, dataset_key=dataset_key, **kwargs)

    def reset(self):
        self.executor.reset()
        self.generator.manual_seed(self.seed)
        self.instruction = None
        self.history = collections.deque(maxlen=self.config.window)  # VLA.record_frame of the last H frames
        self.kv_state = {}  # interleaved, cache="approximate": the KV cache of VLA.interleaved_step
        self.last_chunk = None  # the latest normalized chunk (L, 7), for inspection

    def images(self, obs):
        """obs dict -> uint8 (1, V, 3, S, S) in config.views order, resized with data.resize_images."""
        c = self.config
        missing = [v for v in c.views if v not in obs]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}: this policy was trained on views {c.views}, "
                           f"got keys {sorted(obs)}")
        out = []
        for v in c.views:
            img = obs[v]
            if not torch.is_tensor(img):
                img = np.asarray(img)
                if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                    raise ValueError(f"observation {v!r} must be one uint8 RGB image (h, w, 3), got {img.dtype} "
                                     f"{img.shape}; convert float images in [0, 1] with (x * 255).round()."
                                     f"astype(np.uint8)")
            if self.check_cameras:
                warn = check_camera_image(v, tuple(img.shape[:2]), c.camera_sizes.get(v), c.image_size)
                if warn and v not in self._warned_cameras:
                    self._warned_cameras.add(v)
                    warnings.warn(warn)
            out.append(data.resize_images(img, c.image_size))  # any numpy view, negative strides too
        return torch.stack(out)[None]

    @torch.no_grad()
    def predict_chunk(self, obs, instruction, need=True):
        """Update the history with this observation; if `need`, return the newest frame's chunk (L, 7) normalized."""
        if instruction != self.instruction:
            self.vla.check_context(instruction)  # once per instruction: refuse what does not fit the LM's context
            self.reset()
            self.instruction = instruction
        vla = self.vla
        img = self.images(obs).to(vla.device)  # (1, V, 3, S, S)
        self.history.append(vla.record_frame(img, instruction, self.cache, self.kv_state))
        out = vla.predict_step(self.history, instruction, self.cache, self.generator) if need else None
        if out is not None:
            self.last_chunk = out.float().cpu().numpy()
        return self.last_chunk if need else None

    def act(self, obs, instruction):
        need = self.executor.needs_chunk() or instruction != self.instruction
        chunk = self.predict_chunk(obs, instruction, need)
        if chunk is not None:
            self.executor.add_chunk(chunk)
        a = self.executor.next_action()
        return unnormalize_action(a, self.stats, mode=self.config.action_norm,
                                  bound=self.config.norm_bound).astype(np.float32)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: model.safetensors + config.json + action_stats.json + the tokenizer file, in one directory
# -----------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "robovlms-vla"


def _atomic_write(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a half-written file (e.g. the disk filled up) must not stay behind
        raise
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def _tied_aliases(module):
    """{alias: kept name} for state-dict entries that are one and the same tensor (tied weights, e.g. an LM head
    that reuses the embedding): the file stores each once, under the first name in sorted order (the name
    safetensors.torch.save_model keeps, so files written by it load too)."""
    groups = {}
    for k, v in module.state_dict(keep_vars=True).items():
        key = (v.device, v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else k
        groups.setdefault(key, []).append(k)
    return {a: sorted(g)[0] for g in groups.values() for a in sorted(g)[1:]}


def save_weights(module, path):
    """module's weights -> a safetensors file. Not safetensors.torch.save_model: on CUDA, cuDNN packs an
    LSTM's weights into one flat buffer (flatten_parameters) and save_model refuses tensors that share a
    buffer without covering it; such views are copied out here (the rest is written as is)."""
    from safetensors.torch import save_file
    alias = _tied_aliases(module)
    sd = {}
    for k, v in module.state_dict().items():
        if k in alias:
            continue
        v = v.detach().contiguous()
        if v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # a view into a bigger buffer: its own storage
        sd[k] = v
    save_file(sd, path, metadata={"format": "pt"})


def load_weights(module, path):
    """A safetensors file -> module, strictly: every weight present (tied aliases excepted), none unknown."""
    from safetensors.torch import load_file
    sd = load_file(path)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    aliases = _tied_aliases(module)
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise RuntimeError(f"missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                           f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


def _copy_backbone_files(folder, dst):
    """A pretrained backbone folder's config and tokenizer files (not its weights: model.safetensors of the run
    holds every weight) -> dst, so that the run directory alone rebuilds the model."""
    if os.path.isfile(os.path.join(dst, "config.json")):
        return  # copied at an earlier checkpoint of this run (the folder's files do not change)
    tmp = f"{dst}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name in os.listdir(folder):
        src = os.path.join(folder, name)
        if os.path.isfile(src) and not name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
            shutil.copyfile(src, os.path.join(tmp, name))
    os.replace(tmp, dst)


# ---- digests: manifest.json = {file (relative path): {"bytes": n, "sha256": hex}}, written last ----

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A damaged or invalid run directory; the message names the file (and key) and what to do."""


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(run_dir, names):
    """Record size + sha256 of each file `names` (paths relative to run_dir) in run_dir/manifest.json,
    atomically. After editing a checkpoint file on purpose: write_manifest(d, read_manifest(d))."""
    names = sorted(str(n) for n in names if str(n) != MANIFEST)
    m = {n: {"bytes": os.path.getsize(os.path.join(run_dir, n)), "sha256": file_sha256(os.path.join(run_dir, n))}
         for n in names}
    _atomic_write(os.path.join(run_dir, MANIFEST), lambda p: open(p, "w").write(json.dumps(m, indent=1)))
    return m


def read_manifest(run_dir):
    """run_dir/manifest.json -> {name: {"bytes", "sha256"}}, or None when the directory has none (older runs)."""
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
        if not isinstance(m, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
                                              for e in m.values()):
            raise ValueError("expected {file: {'bytes': n, 'sha256': hex}}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the run directory's digests are damaged: copy the run "
                              f"directory again, or delete {MANIFEST} to load it unverified") from None
    return m


def verify_manifest(run_dir, required=()):
    """Check every file listed in run_dir/manifest.json (size, then sha256: one read of each file).
    Raises CheckpointError naming the first file that does not match; returns False (after a warning) for a run
    directory without a manifest (written before digests were stored, or by hand), True when verified."""
    m = read_manifest(run_dir)
    if m is None:
        warnings.warn(f"{run_dir} has no {MANIFEST} (saved by an older version, or assembled by hand): its files "
                      f"are loaded unverified. Re-save it with vla.save_checkpoint to store their digests")
        return False
    for name in required:
        if name not in m:
            raise CheckpointError(f"{os.path.join(run_dir, MANIFEST)} does not list {name}: the manifest belongs "
                                  f"to another save; copy the run directory again")
    for name, e in sorted(m.items()):
        path = os.path.join(run_dir, name)
        fix = (f"the file changed after it was saved (a damaged copy or disk, or an interrupted save). Copy the run "
               f"directory again or use a checkpoint from {os.path.join(run_dir, 'checkpoints', 'step_*')}; if you "
               f"edited it on purpose: vla.write_manifest(d, vla.read_manifest(d)) records the new digests")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing but listed in {MANIFEST}: copy the run directory again")
        size = os.path.getsize(path)
        if size != e["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, {MANIFEST} says {e['bytes']} (truncated?): {fix}")
        if file_sha256(path) != e["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {MANIFEST}: {fix}")
    return True


def check_action_stats(stats, where):
    """Refuse action statistics that would make the policy emit NaN or garbage: {dataset_key: {"q01": [7 finite
    floats], "q99": [...], ...}} with q01 <= q99. where: the file, for the message."""
    if not isinstance(stats, dict) or not stats:
        raise CheckpointError(f"{where}: expected {{dataset_key: statistics}}, got {type(stats).__name__} "
                              f"{str(stats)[:80]}")
    for key, st in stats.items():
        if not isinstance(st, dict):
            raise CheckpointError(f"{where}: dataset {key!r} has {type(st).__name__} statistics, expected an object")
        for k in ("q01", "q99", "mean", "std", "min", "max"):
            if k not in st:
                if k in ("q01", "q99"):
                    raise CheckpointError(f"{where}: dataset {key!r} lacks key {k!r} (has {sorted(st)}); recompute "
                                          f"the statistics with data.compute_action_stats")
                continue
            v = st[k]
            if not (isinstance(v, list) and len(v) == ACTION_DIM
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                n = len(v) if isinstance(v, list) else type(v).__name__
                raise CheckpointError(f"{where}: dataset {key!r} key {k!r} must be a list of {ACTION_DIM} numbers "
                                      f"(one per action dim), got {n}: {str(v)[:80]}; recompute the statistics "
                                      f"with data.compute_action_stats on the training actions (N, {ACTION_DIM})")
            bad = [i for i, x in enumerate(v) if not math.isfinite(x)]
            if bad:
                raise CheckpointError(f"{where}: dataset {key!r} key {k!r} has NaN/inf in dim(s) {bad}: {v}; the "
                                      f"policy would emit NaN actions. Recompute the statistics from the data")
        lo, hi = np.asarray(st["q01"]), np.asarray(st["q99"])
        if (lo > hi).any():
            i = int(np.argmax(lo > hi))
            raise CheckpointError(f"{where}: dataset {key!r} has q01 > q99 in dim {i} ({lo[i]} > {hi[i]}); the "
                                  f"statistics are damaged: recompute them")
    return stats


def save_checkpoint(run_dir, vla, stats, extra=None, manifest=True):
    """Write the checkpoint files into run_dir (each atomically), then manifest.json (size + sha256 of each, last):
    load_checkpoint verifies every file against it. manifest=False: the caller writes one covering more files
    (train.py's checkpoints/step_N), so the weights are hashed once.

    stats: {dataset_key: stats dict from compute_action_stats}; extra: JSON-able dict (step, metrics, ...).
    """
    if not isinstance(stats, dict) or not stats or "q01" in stats or \
            not all(isinstance(s, dict) and "q01" in s for s in stats.values()):
        raise ValueError("save_checkpoint needs stats as {dataset_key: compute_action_stats(...)}, e.g. "
                         "{'metaworld': stats}; got " + repr(stats)[:200])
    check_action_stats(stats, "save_checkpoint(stats=...)")
    os.makedirs(run_dir, exist_ok=True)
    _atomic_write(os.path.join(run_dir, "model.safetensors"), lambda p: save_weights(vla, p))
    _atomic_write(os.path.join(run_dir, vla.backbone.tokenizer_filename), vla.backbone.tokenizer.save)

    def dump(obj):
        return lambda p: open(p, "w").write(json.dumps(obj, indent=1))
    _atomic_write(os.path.join(run_dir, "action_stats.json"), dump(stats))
    names = ["model.safetensors", vla.backbone.tokenizer_filename, "action_stats.json", "config.json"]
    if os.path.isdir(os.path.expanduser(vla.config.backbone)):  # a pretrained folder: keep its small files
        _copy_backbone_files(os.path.expanduser(vla.config.backbone), os.path.join(run_dir, "backbone"))
        names += [os.path.join("backbone", f) for f in os.listdir(os.path.join(run_dir, "backbone"))]
    cfg = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(vla.config), "extra": extra or {}}
    _atomic_write(os.path.join(run_dir, "config.json"), dump(cfg))
    if manifest:
        write_manifest(run_dir, names)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path}: not valid JSON{where}: {getattr(e, 'msg', e)}; the file is damaged or was "
                              f"edited by hand: restore it from the run's checkpoints/step_* copy") from None


def load_checkpoint(run_dir, device="cpu", verify=True):
    """-> (vla in eval mode, stats {dataset_key: stats}, extra dict).

    Every file is first checked against manifest.json (verify=False skips it; a run directory without a
    manifest loads with a warning); then config.json is validated like the flags (VLAConfig.from_dict) and
    action_stats.json like fresh statistics (check_action_stats). Errors name the file and key."""
    run_dir = str(run_dir)
    need = ["config.json", "model.safetensors", "action_stats.json"]
    missing = [f for f in need if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a complete checkpoint: missing {missing} (written by "
                                f"vla.save_checkpoint; config.json is written last)")
    if verify:
        verify_manifest(run_dir, required=need)
    cfg_path = os.path.join(run_dir, "config.json")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("format") != CHECKPOINT_FORMAT or "config" not in cfg:
        raise CheckpointError(f"{cfg_path} is not a {CHECKPOINT_FORMAT} checkpoint config (expected an object with "
                              f"\"format\": \"{CHECKPOINT_FORMAT}\" and \"config\")")
    try:
        config = VLAConfig.from_dict(cfg["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: \"config\": {e}") from None
    stats_path = os.path.join(run_dir, "action_stats.json")
    stats = check_action_stats(_read_json(stats_path), stats_path)
    tok_file = os.path.join(run_dir, backbones.TinyVLM.tokenizer_filename)
    folder = os.path.join(run_dir, "backbone")  # a pretrained backbone's config + tokenizer (save_checkpoint)
    vla = VLA(config, tokenizer_path=tok_file if os.path.isfile(tok_file) else None,
              backbone_folder=folder if os.path.isfile(os.path.join(folder, "config.json")) else None)
    weights = os.path.join(run_dir, "model.safetensors")
    try:
        load_weights(vla, weights)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {weights} do not fit the model built from its "
                           f"config.json ({e}); was the checkpoint written by another version?") from None
    except Exception as e:  # safetensors' own errors (a truncated or overwritten file): name the file
        raise CheckpointError(f"{weights}: cannot read the weights ({type(e).__name__}: {e}); the file is truncated "
                              f"or not a safetensors file: copy the run directory again or use a checkpoint from "
                              f"{os.path.join(run_dir, 'checkpoints', 'step_*')}") from None
    return vla.to(device).eval(), stats, cfg.get("extra", {})
