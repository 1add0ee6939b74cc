"""The VLMs a VLA is built on: vision towers, projectors, language models, tokenizers.

Stands on: torch (with data.py, the bottom floor: no module of ours). Offers: build_backbone (tiny presets and
pretrained folders), load_vlm, and the backbone interface below that vla.py and heads.py use.

THE BACKBONE INTERFACE (all that vla.py and heads.py use; every VLM family in this file implements it)
-------------------------------------------------------------------------------------------------------
A backbone is an nn.Module built by `build_backbone(name, **kwargs)`, with these attributes:

  hidden_size: int         d, the width of the language model's token embeddings and hidden states
  image_size: int          S, the square input resolution (data.resize_images resizes to it)
  image_mean, image_std    3-tuples for data.normalize_images (CLIP statistics for the tiny model)
  n_layers, n_heads, n_kv_heads, head_dim
                           the LM's attention geometry; the mixture-of-experts action expert (heads.py)
                           builds per-layer Q/K/V of exactly this shape to share each layer's softmax
  vocab_size: int          rows of the LM head (>= tokenizer.vocab_size; may reserve ids for actions)
  tokenizer                .encode(str) -> list[int] (no BOS/EOS), .bos_id, .eos_id (int or None),
                           .pad_id, .vocab_size, .save(path) (writes the sentencepiece model file)
  tokenizer_filename: str  file name the checkpoint uses for the tokenizer (e.g. "tokenizer.model")
  image_tokens_inline: bool
                           True for decoder-only VLMs (image tokens are placed in the token sequence).
                           False for Flamingo-style models: the VLA then passes the image features as
                           `media=` to forward() and the sequence holds text (+ [LRN]) only; the
                           `interleaved` and `one_step_discrete` formulations require True (paper §III-C).
and these methods:

  prompt(instruction: str) -> str
      the text format this VLM was pretrained with, for the continuous formulations (official code:
      Kosmos-2 "<grounding>An image of a robot {instr}", PaliGemma "{instr}\\n", ...).
  encode_images(x: float (N, 3, S, S), already normalized) -> (N, T_img, d)
      vision tower + projector/resampler; outputs live in the LM's input-embedding space.
  embed_tokens(ids: long (B, T)) -> (B, T, d)
      the LM's word embeddings (the same space as encode_images' outputs and the [LRN] token).
  forward(embeds (B, T, d), positions long (B, T), cache=None, media=None) -> (hidden (B, T, d), cache)
      the causal LM over input embeddings (any input scaling, e.g. Kosmos-2's x sqrt(d), happens inside).
      hidden = last layer after the final norm (MoonDream: before it, as RoboVLMs; see its section).
      `positions` are absolute positions (RoPE angles or learned position rows). `cache` is a list with one
      (k, v) per layer, each (B, n_kv_heads, T_past, head_dim),
      holding keys AFTER positional rotation; the new tokens attend causally to cache + themselves, and
      the returned cache has the new keys/values appended. Passing cache=None starts empty.
      Sequences are padded at the END only, so a causal mask alone keeps real tokens away from padding.
  lm_logits(hidden (B, T, d)) -> (B, T, vocab_size)
  rope(x (B, h, T, head_dim), positions (B, T)) -> x
      the positional rotation the LM applies to queries and keys (identity for LMs with absolute position
      embeddings); the MoE action expert applies it to its own queries/keys.
  trainable_groups() -> {"vision": [params], "language": [params], "embeddings": [params]}
      how VLAConfig's train_vision / train_language / train_embeddings flags freeze parts.

Families: `tiny` (first section below), the pretrained Kosmos-2 / PaliGemma / LLaVA-1.5 families (section
"pretrained families"), OpenFlamingo (Flamingo-style; its MPT LM and checkpoint layout follow), then Qwen-VL and
UForm-Gen2 (section "Qwen-VL and UForm", closing the file).
`tiny` is a small decoder-only VLM with random initialization
(ViT image encoder -> 2x2 patch-merge MLP projector -> causal transformer LM with RoPE, tied LM head, KV cache)
and a byte-fallback BPE sentencepiece tokenizer trained on the fly from a built-in robot-instruction corpus.
It is CPU-fast (about 1.05M parameters at the defaults) and exists so the whole VLA pipeline trains in
minutes; it has no pretrained knowledge.
"""

import base64
import io
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # official image processor statistics (CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------------------------------------
# Tokenizer: sentencepiece (every real family ships a sentencepiece model; the tiny one is trained here)
# -----------------------------------------------------------------------------------------------------------

# A small corpus of robot instructions (written for this project) used to train the tiny tokenizer. Byte
# fallback makes any text encodable, so words missing here still tokenize (as bytes).
_TINY_CORPUS = """
open the drawer. close the drawer. pull the handle to open the drawer. push the drawer shut.
pick up the red block. lift the blue block from the table. lift the pink block from the slider.
place the block in the drawer. put the grasped object into the drawer. stack the blocks on top of each other.
take the stacked blocks apart. rotate the red block to the right. rotate the blue block to the left.
push the pink block to the left. push the red block to the right. slide the block across the table.
move the slider to the left. move the slider to the right. turn on the light bulb. turn off the light bulb.
turn on the green led. turn off the led light. press the button on the wall. push the button down from the top.
reach the goal position with the gripper. push the puck to the goal. pick the puck and place it at the target.
open the door. close the door. open the window. close the window. turn the faucet on. turn the faucet off.
insert the peg into the hole. pull the lever up. press the handle down. sweep the cube into the bin.
put the cup on the coaster. hammer the nail. unplug the cable. plug the cable into the socket.
pick up the coke can. move the apple near the orange. put the carrot on the plate. put the spoon on the towel.
put the eggplant in the basket. stack the green cube on the yellow cube. place the apple into the top drawer.
open the top drawer. close the middle drawer. open the bottom drawer. grasp the handle and pull.
what action should the robot take to complete the task? an image of a robot arm on a table.
input: what step actions should the robot take? output: the robot moves its gripper forward and down.
"""


class SentencePieceTokenizer:
    """A sentencepiece model with the small interface the VLA needs (see the module docstring)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else (self.eos_id or 0)

    def encode(self, text: str):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.proto)

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} not found: a checkpoint directory must contain the "
                                    f"sentencepiece model saved by vla.save_checkpoint")
        with open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def train_tiny(cls, vocab_size=512):
        """Train a byte-fallback BPE model on _TINY_CORPUS (deterministic, a few milliseconds)."""
        import sentencepiece as spm
        buf = io.BytesIO()
        lines = [s.strip() + "." for s in _TINY_CORPUS.replace("\n", " ").split(".") if s.strip()]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
        return cls(buf.getvalue())


# -----------------------------------------------------------------------------------------------------------
# Shared transformer pieces
# -----------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_rotate(x, positions, base=10000.0):
    """Rotary position embedding (split-halves convention). x (B, h, T, hd), positions (B, T) long."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))  # (hd/2,)
    ang = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, hd/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., : hd // 2], x.float()[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


def attend(q, k, v, mask=None, causal_offset=None):
    """Scaled dot-product attention. q (B, h, Tq, hd), k/v (B, h_kv, Tk, hd) (h a multiple of h_kv).

    mask: bool (B or 1, 1, Tq, Tk), True = may attend. causal_offset=P builds the causal mask of Tq new tokens
    placed after P cached ones (query i sees keys 0..P+i). Neither: full attention.
    """
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the KV heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if causal_offset is not None:
        tq, tk = q.shape[2], k.shape[2]
        if causal_offset == 0 and tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        i = torch.arange(tq, device=q.device)[:, None] + causal_offset
        mask = (torch.arange(tk, device=q.device)[None, :] <= i)[None, None]  # (1, 1, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block. causal=True: decoder block with RoPE and a KV cache."""

    def __init__(self, d, n_heads, mlp_ratio=4, causal=True):
        super().__init__()
        self.n_heads, self.head_dim, self.causal = n_heads, d // n_heads, causal
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp = MLP(d, mlp_ratio * d)

    def heads(self, x):  # (B, T, d) -> (B, h, T, hd)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def qkv(self, x, positions):
        """Normed input -> rotated q, k and v, each (B, h, T, hd). Used by the MoE expert too."""
        h = self.norm1(x)
        q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))
        if self.causal:
            q, k = rope_rotate(q, positions), rope_rotate(k, positions)
        return q, k, v

    def forward(self, x, positions=None, kv=None):
        B, T, d = x.shape
        q, k, v = self.qkv(x, positions)
        past = 0
        if kv is not None:
            past = kv[0].shape[2]
            k, v = torch.cat([kv[0], k], 2), torch.cat([kv[1], v], 2)
        y = attend(q, k, v, causal_offset=past if self.causal else None)  # (B, h, T, hd)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, d))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


# -----------------------------------------------------------------------------------------------------------
# The tiny decoder-only VLM
# -----------------------------------------------------------------------------------------------------------

class TinyVLM(nn.Module):
    """ViT (patch p) -> 2x2 patch merge + MLP projector -> causal LM with RoPE and a tied LM head.

    Image tokens per view: (S / p / 2)^2, e.g. 16 for S=64, p=8. The LM vocabulary is the tokenizer's pieces
    followed by `n_reserved` extra ids, so the discrete formulation's action ids (ActionTokenizer takes the
    top ids) never collide with text pieces (OpenVLA instead overwrites the least used text tokens).
    """

    image_tokens_inline = True
    tokenizer_filename = "tokenizer.model"
    max_positions = 2048  # RoPE has no hard limit; the context Policy.act allows (as Kosmos-2's), far above the
    # ~60 tokens of a tiny frame (VLA.check_context)

    def __init__(self, image_size=64, patch=8, vision_dim=64, vision_layers=2, vision_heads=4,
                 d=128, layers=4, heads=4, n_reserved=256 + 10, tokenizer=None, tokenizer_vocab=512):
        super().__init__()
        if image_size % (2 * patch) != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of 2 * patch = {2 * patch} "
                             f"(patches are merged 2x2 by the projector)")
        self.tokenizer = tokenizer or SentencePieceTokenizer.train_tiny(tokenizer_vocab)
        self.image_size, self.patch = image_size, patch
        self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        self.hidden_size, self.n_layers, self.n_heads, self.n_kv_heads = d, layers, heads, heads
        self.head_dim = d // heads
        self.vocab_size = self.tokenizer.vocab_size + n_reserved
        g = image_size // patch  # patches per side
        self.grid = g
        self.n_image_tokens = (g // 2) ** 2  # per view, after the 2x2 merge
        # vision tower (bidirectional ViT, learned positions)
        self.patch_embed = nn.Conv2d(3, vision_dim, patch, stride=patch)
        self.vision_pos = nn.Parameter(torch.randn(g * g, vision_dim) * 0.02)
        self.vision_blocks = nn.ModuleList([Block(vision_dim, vision_heads, causal=False)
                                            for _ in range(vision_layers)])
        self.vision_norm = RMSNorm(vision_dim)
        # projector: merge 2x2 neighbouring patches (4 * vision_dim) -> MLP -> LM width
        self.projector = nn.Sequential(nn.Linear(4 * vision_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        # language model
        self.wte = nn.Embedding(self.vocab_size, d)
        self.blocks = nn.ModuleList([Block(d, heads, causal=True) for _ in range(layers)])
        self.norm = RMSNorm(d)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("o.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def prompt(self, instruction):
        return instruction  # the plain instruction, like the official LLaVA / Qwen formats (fewest tokens)

    def encode_images(self, x):
        N, C, S, _ = x.shape
        if S != self.image_size or C != 3:
            raise ValueError(f"tiny VLM expects images (N, 3, {self.image_size}, {self.image_size}), got "
                             f"{tuple(x.shape)}; resize with data.resize_images(..., {self.image_size})")
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.vision_pos  # (N, g*g, dv)
        for blk in self.vision_blocks:
            h, _ = blk(h)
        h = self.vision_norm(h)
        g = self.grid
        h = h.view(N, g // 2, 2, g // 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(N, (g // 2) ** 2, -1)
        return self.projector(h)  # (N, T_img, d)

    def embed_tokens(self, ids):
        return self.wte(ids)

    def forward(self, embeds, positions, cache=None, media=None):
        if media is not None:
            raise ValueError("the tiny VLM is decoder-only: image tokens go inline, not as media=")
        new_cache = []
        x = embeds
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, positions, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.norm(x), new_cache

    def lm_logits(self, hidden):
        return hidden @ self.wte.weight.t()  # tied weights (nanoGPT)

    def rope(self, x, positions):
        return rope_rotate(x, positions)

    def trainable_groups(self):
        vision = [p for n, p in self.named_parameters() if n.startswith(("patch_embed", "vision_", "projector"))]
        emb = [self.wte.weight]
        language = [p for n, p in self.named_parameters() if n.startswith(("blocks", "norm"))]
        return {"vision": vision, "language": language, "embeddings": emb}


def build_backbone(name, image_size=None, tokenizer_path=None, **kwargs):
    """name -> a backbone implementing the interface above. tokenizer_path: reload a saved tokenizer."""
    tok = SentencePieceTokenizer.load(tokenizer_path) if tokenizer_path else None
    if name == "tiny":
        if image_size is not None:
            kwargs["image_size"] = image_size
        return TinyVLM(tokenizer=tok, **kwargs)
    if name in TINY_FAMILIES or os.path.isdir(os.path.expanduser(name)):  # see "pretrained families" below
        return build_pretrained_family(name, image_size, tokenizer_path, **kwargs)
    if name == "tiny-flamingo":
        return tiny_flamingo(image_size or 64, tokenizer_path, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; available: 'tiny', 'tiny-flamingo', {sorted(TINY_FAMILIES)} or "
                     f"the path of a model folder (Kosmos-2, PaliGemma, LLaVA-1.5, converted OpenFlamingo, "
                     f"Qwen-VL, UForm-Gen2)")


# ---- pretrained families ----
# Kosmos-2, PaliGemma (1) and LLaVA-1.5 read straight from a Hugging Face folder: config.json, model.safetensors
# (or shards + model.safetensors.index.json) and the sentencepiece file, with no `transformers` at run time.
# One set of pieces serves all three: a pre-norm `FamilyBlock` (LayerNorm or RMSNorm, with or without biases,
# RoPE or not, grouped-query attention, plain or gated MLP, Kosmos-2's extra "sub-LN" norms, a KV cache), a ViT
# (CLIP or SigLIP) and a decoder LM. Module names follow the checkpoint keys, so loading is the short list of
# renames in `_RENAMES`. tests/test_backbones.py checks every family's logits against `transformers` (pinned in
# requirements-dev.txt) on tiny random configs. Entry points: build_backbone(<folder> | "tiny-kosmos2" |
# "tiny-paligemma" | "tiny-llava" | "tiny-flamingo", resampler=64 optional), load_vlm(folder, dtype, device).
# More in docs/backbones.md.

ACTS = {
    "gelu": F.gelu,  # exact erf GELU (Kosmos-2 text, LLaVA projector)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma, SigLIP
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "silu": F.silu,  # LLaMA
    "relu": F.relu,  # IDEFICS' perceiver MLP
}


def _act(name):
    if name not in ACTS:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTS)}")
    return ACTS[name]


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: normalize and scale by (1 + w) both in fp32, then cast back (w is stored as an offset)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def _norm(kind, d, eps):  # "ln" (CLIP, SigLIP, Kosmos-2), "rms" (LLaMA: cast back, then x w), "gemma"
    return {"ln": nn.LayerNorm, "rms": RMSNorm, "gemma": GemmaRMSNorm}[kind](d, eps=eps)


def sinusoidal_positions(positions, d, padding_idx=None):
    """fairseq / tensor2tensor sinusoids for integer positions (B, T) -> (B, T, d): [sin | cos] halves with
    frequencies exp(-log(10000) k / (d/2 - 1)); the `padding_idx` row is zero (Kosmos-2's text positions)."""
    half = d // 2
    freq = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    ang = positions[..., None].float() * freq  # (B, T, d/2)
    emb = F.pad(torch.cat([ang.sin(), ang.cos()], -1), (0, d % 2))
    if padding_idx is not None:
        emb = emb.masked_fill((positions == padding_idx)[..., None], 0.0)
    return emb


def padding_attention_mask(pad_mask, T, causal=True, bidir_keys=None):
    """Bool mask (B, 1, T, S) for the last T of S positions, True = may attend. pad_mask (B, S) 1 = real token;
    causal: query i sees keys j <= i; bidir_keys (B, S): keys every query sees (PaliGemma's prefix).
    Each query always sees itself, so padding rows never become empty (SDPA would return NaN)."""
    B, S = pad_mask.shape
    qi = torch.arange(S - T, S, device=pad_mask.device)[:, None]  # (T, 1)
    kj = torch.arange(S, device=pad_mask.device)[None, :]  # (1, S)
    ok = (kj <= qi) if causal else torch.ones(T, S, dtype=torch.bool, device=pad_mask.device)
    ok = ok[None].expand(B, T, S)
    if bidir_keys is not None:
        ok = ok | bidir_keys.bool()[:, None, :]
    ok = (ok & pad_mask.bool()[:, None, :]) | (kj == qi)[None]
    return ok[:, None]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, optional RoPE, optional LayerNorm on the context before the
    output projection (Kosmos-2's `inner_attn_ln`), a KV cache, self- or cross-attention (`kv=`)."""

    def __init__(self, d, n_heads, n_kv=None, head_dim=None, bias=True, sub_ln_eps=None, kv_dim=None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv or n_heads, head_dim or d // n_heads
        if n_heads % self.n_kv:
            raise ValueError(f"num_attention_heads {n_heads} must be a multiple of num_key_value_heads {self.n_kv}")
        inner = n_heads * self.head_dim
        self.q_proj = nn.Linear(d, inner, bias=bias)
        self.k_proj = nn.Linear(kv_dim or d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim or d, self.n_kv * self.head_dim, bias=bias)
        self.inner_attn_ln = None if sub_ln_eps is None else nn.LayerNorm(inner, eps=sub_ln_eps)
        self.o_proj = nn.Linear(inner, d, bias=bias)
        self.clip_qkv, self.q_ln, self.k_ln = None, None, None  # MPT options: clamp q/k/v, LayerNorm on q and k

    def forward(self, x, rope=None, cache=None, mask=None, causal=False, kv=None):
        """x (B, T, d); rope: fn(t (B, h, T, hd)) -> rotated t; cache (k, v) each (B, n_kv, T_past, hd), keys
        already rotated; mask bool (B, 1, T, S) or causal=True. Returns (out (B, T, d), (k, v) incl. the new)."""
        B, T, _ = x.shape
        src = x if kv is None else kv
        q, k, v = self.q_proj(x), self.k_proj(src), self.v_proj(src)
        if self.clip_qkv:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.q_ln is not None:
            q, k = self.q_ln(q), self.k_ln(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = k.view(B, -1, self.n_kv, self.head_dim).transpose(1, 2)  # (B, h_kv, S, hd)
        v = v.view(B, -1, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q), rope(k)
        past = 0
        if cache is not None:
            past = cache[0].shape[2]
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        y = attend(q, k, v, mask=mask, causal_offset=past if (causal and mask is None) else None)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, h * hd)
        if self.inner_attn_ln is not None:
            y = self.inner_attn_ln(y)
        return self.o_proj(y), (k, v)


class FeedForward(nn.Module):
    """fc2(act(fc1 x)), or gated (LLaMA, Gemma) fc2(act(gate x) * fc1 x); Kosmos-2 adds a LayerNorm before fc2.
    out: output width when it differs from d (MoonDream's projector)."""

    def __init__(self, d, hidden, act, bias=True, gated=False, sub_ln_eps=None, out=None):
        super().__init__()
        self.act = _act(act)
        self.gate = nn.Linear(d, hidden, bias=bias) if gated else None
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.inner_ln = None if sub_ln_eps is None else nn.LayerNorm(hidden, eps=sub_ln_eps)
        self.fc2 = nn.Linear(hidden, out or d, bias=bias)

    def forward(self, x):
        h = self.act(self.gate(x)) * self.fc1(x) if self.gate is not None else self.act(self.fc1(x))
        return self.fc2(h if self.inner_ln is None else self.inner_ln(h))


class FamilyBlock(nn.Module):
    """Pre-norm block x + attn(norm1 x), then x + mlp(norm2 x): CLIP/SigLIP encoder layers and the Kosmos-2,
    Gemma and LLaMA decoder layers, selected by the flags."""

    def __init__(self, d, n_heads, mlp_dim, act, norm="ln", eps=1e-5, n_kv=None, head_dim=None, bias=True,
                 gated=False, sub_ln=False):
        super().__init__()
        self.norm1 = _norm(norm, d, eps)
        self.attn = Attention(d, n_heads, n_kv, head_dim, bias=bias, sub_ln_eps=eps if sub_ln else None)
        self.norm2 = _norm(norm, d, eps)
        self.mlp = FeedForward(d, mlp_dim, act, bias=bias, gated=gated, sub_ln_eps=eps if sub_ln else None)
        self.parallel = False  # GPT-NeoX's parallel residual: x + attn(norm1 x) + mlp(norm2 x)

    def forward(self, x, rope=None, cache=None, mask=None, causal=False):
        n = self.norm1(x)
        h, cache = self.attn(n, rope, cache, mask, causal)
        if self.parallel:  # norm2 None: one LayerNorm feeds both branches (Phi)
            return x + h + self.mlp(n if self.norm2 is None else self.norm2(x)), cache
        x = x + h
        return x + self.mlp(self.norm2(x)), cache


class ViT(nn.Module):
    """CLIP (class token, bias-free patch conv, pre-LN) or SigLIP (no class token, patch bias) vision tower.
    forward returns the hidden states after all built layers, before `post_layernorm`."""

    def __init__(self, width, layers, heads, mlp_dim, patch, image_size, act, eps, clip=True, post_ln=True):
        super().__init__()
        self.image_size, self.clip = image_size, clip
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch, bias=not clip)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5) if clip else None
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + int(clip), width)
        self.pre_layrnorm = nn.LayerNorm(width, eps=eps) if clip else None  # sic, the checkpoints' spelling
        self.layers = nn.ModuleList(FamilyBlock(width, heads, mlp_dim, act, "ln", eps) for _ in range(layers))
        self.post_layernorm = nn.LayerNorm(width, eps=eps) if post_ln else None

    def forward(self, x):  # x (N, 3, S, S) normalized -> (N, P (+1 CLS first), width)
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"vision tower expects images (N, 3, {self.image_size}, {self.image_size}), got "
                             f"{tuple(x.shape)}: resize with data.resize_images(..., {self.image_size})")
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, w)
        if self.clip:
            h = torch.cat([self.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1), h], 1)
        h = h + self.position_embedding.weight
        if self.pre_layrnorm is not None:
            h = self.pre_layrnorm(h)
        for blk in self.layers:
            h, _ = blk(h)
        return h


class DecoderLM(nn.Module):
    """Decoder-only LM over embeddings. Positions: RoPE (Gemma, LLaMA) or an added sinusoidal table (Kosmos-2),
    both at `positions + pos_offset` (Kosmos-2 counts from padding_idx + 1 = 2, PaliGemma from 1). `embed`
    applies the family's embedding scale (x sqrt(d) for Kosmos-2 and Gemma) so forward sees layer-0 inputs."""

    def __init__(self, vocab, d, layers, heads, mlp_dim, act, norm, eps, n_kv=None, head_dim=None, bias=False,
                 gated=True, sub_ln=False, rope_theta=10000.0, embed_scale=1.0, pos_offset=0, padding_idx=None,
                 tie=True):
        super().__init__()
        self.rope_theta, self.embed_scale, self.pos_offset = rope_theta, embed_scale, pos_offset
        self.padding_idx, self.tie = padding_idx, tie  # rope_theta None = sinusoidal absolute positions
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(FamilyBlock(d, heads, mlp_dim, act, norm, eps, n_kv, head_dim, bias, gated,
                                                sub_ln) for _ in range(layers))
        self.norm = _norm(norm, d, eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.tie:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, ids):  # (B, T) -> (B, T, d)
        return self.scale(self.embed_tokens(ids))

    def scale(self, e):  # Gemma (RoPE) casts sqrt(d) to the activation dtype first, Kosmos-2 keeps a float
        if self.embed_scale == 1.0:
            return e
        return e * (torch.tensor(self.embed_scale, dtype=e.dtype) if self.rope_theta else self.embed_scale)

    def rope(self, x, positions):  # x (B, h, T, hd), positions (B, T) 0-based
        if self.rope_theta is None:
            return x
        return rope_rotate(x, positions + self.pos_offset, self.rope_theta)

    def forward(self, x, positions, cache=None, mask=None):
        """x (B, T, d); positions (B, T) 0-based (-1 = padding, Kosmos-2's zero row); cache: per-layer (k, v);
        mask (B, 1, T, S) bool, or None for causal over cache + x. -> (last hidden after the norm, cache)."""
        rope = None
        if self.rope_theta is None:
            p = torch.where(positions < 0, self.padding_idx, positions + self.pos_offset)
            x = x + sinusoidal_positions(p, x.shape[-1], self.padding_idx).to(x.dtype)
        else:
            rope = lambda t: self.rope(t, positions)  # noqa: E731
        new_cache = []
        for i, blk in enumerate(self.layers):
            x, kv = blk(x, rope, None if cache is None else cache[i], mask, causal=True)
            new_cache.append(kv)
        return self.norm(x), new_cache


class KosmosConnector(nn.Module):
    """Kosmos-2's image-to-text projection: `dense`, then `latent_query_num` learned queries attend (no mask)
    over concat(dense features, queries): (N, P, w) -> (N, 64, d)."""

    def __init__(self, vis_d, d, heads, n_latents):
        super().__init__()
        self.dense = nn.Linear(vis_d, d)
        self.latent_query = nn.Parameter(torch.randn(n_latents, d) * d ** -0.5)
        self.x_attn = Attention(d, heads)

    def forward(self, feats):
        h = self.dense(feats)
        q = self.latent_query.to(h.dtype).expand(h.shape[0], -1, -1)  # (N, n_latents, d)
        return self.x_attn(q, kv=torch.cat([h, q], 1))[0]


class LlavaProjector(nn.Module):  # linear_2(gelu(linear_1 x))
    def __init__(self, vis_d, d, act, bias=True):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(vis_d, d, bias=bias), _act(act), nn.Linear(d, d, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class PerceiverResampler(nn.Module):
    """Flamingo's perceiver resampler: `n_latents` learned queries, `depth` x [latents += attn(q = LN(latents),
    kv = concat(LN(media), LN(latents))); latents += MLP(latents)], final LayerNorm: (N, T, d) -> (N, n_latents, d).
    Official RoboVLMs/OpenFlamingo: depth 6, 64 latents, 8 heads x 64, GELU MLP x4, no biases. The paper needs it
    for LLaVA (§IV-B). Same math as transformers' IdeficsPerceiverResampler (act="relu" there), which the tests
    compare against."""

    def __init__(self, d, depth=6, heads=8, head_dim=64, n_latents=64, ff_mult=4, act="gelu"):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, d))
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm_media=nn.LayerNorm(d), norm_latents=nn.LayerNorm(d), attn=Attention(d, heads, head_dim=head_dim,
                                                                                     bias=False),
            ff_norm=nn.LayerNorm(d), ff=FeedForward(d, ff_mult * d, act, bias=False))) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        lat = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, n_latents, d)
        for layer in self.layers:
            q = layer["norm_latents"](lat)
            lat = lat + layer["attn"](q, kv=torch.cat([layer["norm_media"](x), q], 1))[0]
            lat = lat + layer["ff"](layer["ff_norm"](lat))
        return self.norm(lat)


# Hugging Face config-class defaults (config.json files omit fields left at their defaults). When a whole
# sub-config is absent, PaliGemma/LLaVA build the released model's tower, hence the _PALIGEMMA_*/_LLAVA_* dicts.
_CLIP_V = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32,
               image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_KOSMOS_V = dict(_CLIP_V, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 patch_size=14)
_SIGLIP_V = dict(_CLIP_V, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
_KOSMOS_T = dict(vocab_size=65037, embed_dim=2048, layers=24, attention_heads=32, ffn_dim=8192,
                 activation_function="gelu", layer_norm_eps=1e-5, scale_embedding=True, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2, tie_word_embeddings=True)
_GEMMA = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
              num_attention_heads=16, head_dim=256, num_key_value_heads=16, hidden_act="gelu_pytorch_tanh",
              rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, tie_word_embeddings=True, pad_token_id=0)
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
              rope_theta=10000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False, pad_token_id=None)
_PALIGEMMA_V = dict(intermediate_size=4096, hidden_size=1152, patch_size=14, num_hidden_layers=27,
                    num_attention_heads=16)
_PALIGEMMA_T = dict(hidden_size=2048, num_hidden_layers=18, intermediate_size=16384, num_attention_heads=8,
                    num_key_value_heads=1, vocab_size=257152)
_LLAVA_V = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336, num_hidden_layers=24,
                num_attention_heads=16)


def _vit(v, clip, post_ln=True, layers=None):
    return ViT(v["hidden_size"], v["num_hidden_layers"] if layers is None else layers, v["num_attention_heads"],
               v["intermediate_size"], v["patch_size"], v["image_size"], v["hidden_act"], v["layer_norm_eps"],
               clip=clip, post_ln=post_ln)


def _rope_decoder(t, gemma):
    """Gemma (1 + w RMSNorm, x sqrt(d) embeddings, positions from 1) or LLaMA decoder from a text config."""
    if t.get("rope_scaling"):
        raise ValueError(f"rope_scaling={t['rope_scaling']} is not supported (plain RoPE only): this loader covers "
                         f"the LLaMA-2/Vicuna and Gemma-1 language models of LLaVA-1.5 and PaliGemma")
    if t.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported (LLaMA-2/Vicuna have no MLP biases)")
    heads = t["num_attention_heads"]
    return DecoderLM(t["vocab_size"], t["hidden_size"], t["num_hidden_layers"], heads, t["intermediate_size"],
                     t["hidden_act"], "gemma" if gemma else "rms", t["rms_norm_eps"],
                     t.get("num_key_value_heads") or heads, t.get("head_dim") or t["hidden_size"] // heads,
                     bias=t.get("attention_bias", False), gated=True, rope_theta=t["rope_theta"],
                     embed_scale=math.sqrt(t["hidden_size"]) if gemma else 1.0, pos_offset=int(gemma),
                     tie=t["tie_word_embeddings"])


class PretrainedVLM(nn.Module):
    """Kosmos-2 / PaliGemma / LLaVA-1.5 behind the backbone interface at the top of this file, built from a
    Hugging Face config dict (random init; `load_vlm` fills it from a checkpoint)."""

    image_tokens_inline = True

    def __init__(self, cfg):
        super().__init__()
        self.family, self.config, self.tokenizer, self.resampler = cfg.get("model_type"), cfg, None, None
        self.image_boundary = None  # Kosmos-2: ids of "<image>", "</image>" around the 64 image embeddings
        vc, tc = cfg.get("vision_config"), cfg.get("text_config")
        if self.family == "kosmos-2":
            v, t = {**_KOSMOS_V, **(vc or {})}, {**_KOSMOS_T, **(tc or {})}
            self.vision = _vit(v, clip=True)
            self.projector = KosmosConnector(v["hidden_size"], t["embed_dim"], t["attention_heads"],
                                             cfg.get("latent_query_num", 64))
            self.lm = DecoderLM(t["vocab_size"], t["embed_dim"], t["layers"], t["attention_heads"], t["ffn_dim"],
                                t["activation_function"], "ln", t["layer_norm_eps"], bias=True, gated=False,
                                sub_ln=True, rope_theta=None, pos_offset=t["pad_token_id"] + 1,
                                padding_idx=t["pad_token_id"], tie=t["tie_word_embeddings"],
                                embed_scale=math.sqrt(t["embed_dim"]) if t["scale_embedding"] else 1.0)
            self.image_token_id, mean, std = None, CLIP_MEAN, CLIP_STD
            self.tokenizer_filename = "sentencepiece.bpe.model"
        elif self.family == "paligemma":
            v, t = {**_SIGLIP_V, **(vc or _PALIGEMMA_V)}, {**_GEMMA, **(tc or _PALIGEMMA_T)}
            if t.get("model_type", "gemma") != "gemma":
                raise ValueError(f"PaliGemma with a {t['model_type']!r} language model (PaliGemma 2 uses gemma2) is "
                                 f"not supported; use a PaliGemma 1 checkpoint (text_config.model_type 'gemma')")
            self.vision = _vit(v, clip=False)
            self.projector = nn.Linear(v["hidden_size"], cfg.get("projection_dim", 2048))
            self.lm = _rope_decoder(t, gemma=True)
            self.image_token_id, mean, std = cfg.get("image_token_index", 256000), (0.5,) * 3, (0.5,) * 3
            self.tokenizer_filename = "tokenizer.model"
        elif self.family == "llava":
            v, t = {**_CLIP_V, **(vc or _LLAVA_V)}, {**_LLAMA, **(tc or {})}
            layer = cfg.get("vision_feature_layer", -2)
            if not isinstance(layer, int):
                raise ValueError(f"vision_feature_layer={layer}: only a single layer index is supported")
            self.feature_layer = layer if layer >= 0 else v["num_hidden_layers"] + 1 + layer  # hidden_states index
            self.select = cfg.get("vision_feature_select_strategy", "default")  # "default" drops CLS
            if self.select not in ("default", "full"):
                raise ValueError(f"vision_feature_select_strategy {self.select!r}: expected 'default' or 'full'")
            self.vision = _vit(v, clip=True, post_ln=False, layers=self.feature_layer)  # later layers unused
            self.projector = LlavaProjector(v["hidden_size"], t["hidden_size"], cfg.get("projector_hidden_act", "gelu"),
                                            cfg.get("multimodal_projector_bias", True))
            self.lm = _rope_decoder(t, gemma=False)
            self.image_token_id, mean, std = cfg.get("image_token_index", 32000), CLIP_MEAN, CLIP_STD
            self.tokenizer_filename = "tokenizer.model"
        else:
            raise ValueError(f"unknown model_type {self.family!r} in config.json: supported are 'kosmos-2', "
                             f"'paligemma', 'llava', 'moondream1', 'qwen' (Qwen-VL), 'vlm' (UForm-Gen2) and "
                             f"'openflamingo' (a converted OpenFlamingo folder, see docs/backbones.md)")
        self.image_size, self.image_mean, self.image_std = v["image_size"], tuple(mean), tuple(std)
        attn = self.lm.layers[0].attn
        self.hidden_size, self.vocab_size = self.lm.embed_tokens.weight.shape[1], t["vocab_size"]
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = len(self.lm.layers), attn.n_heads, \
            attn.n_kv, attn.head_dim
        self.pad_token_id = t.get("pad_token_id")
        # the LM's context: config's max_position_embeddings, else the released models' (Kosmos-2 2048, Gemma 8192,
        # Vicuna-7B v1.5 4096)
        self.max_positions = t.get("max_position_embeddings") or {"kosmos-2": 2048, "paligemma": 8192,
                                                                   "llava": 4096}[self.family]
        n_patches = (v["image_size"] // v["patch_size"]) ** 2
        self.n_image_tokens = {"kosmos-2": cfg.get("latent_query_num", 64), "paligemma": n_patches,
                               "llava": n_patches + int(getattr(self, "select", "") == "full")}[self.family]

    def prompt(self, instruction):
        if self.family == "kosmos-2":
            return f"<grounding>An image of a robot {instruction}"  # official RoboVLMs Kosmos prompt
        return f"{instruction}\n"  # PaliGemma's prefix ends with "\n"; LLaVA takes the bare instruction

    def add_resampler(self, n_latents=64, depth=6, heads=8, head_dim=64):
        """Append a randomly initialised perceiver resampler to the image path (official `use_vision_resampler`:
        after the backbone's own image encoding); it is trained with the VLA and saved in its checkpoint."""
        p = self.lm.embed_tokens.weight
        self.resampler = PerceiverResampler(self.hidden_size, depth, heads, head_dim, n_latents).to(p.device, p.dtype)
        self.n_image_tokens = n_latents + (0 if self.image_boundary is None else 2)
        return self

    def encode_images(self, x):
        """x (N, 3, S, S) normalized -> (N, T_img, d) in the LM's layer-0 input space (family scaling applied).
        Kosmos-2 with its tokenizer: [<image>] 64 embeddings [</image>], its pretraining layout (T_img = 66)."""
        z = self._encode_family(x)
        z = z if self.resampler is None else self.resampler(z)  # (N, n_latents, d)
        if self.image_boundary is not None:
            ends = self.embed_tokens(torch.tensor(self.image_boundary, device=z.device)).to(z.dtype)  # (2, d)
            z = torch.cat([ends[:1].expand(len(z), 1, -1), z, ends[1:].expand(len(z), 1, -1)], 1)
        return z

    def _encode_family(self, x):
        f = self.vision(x)  # (N, P (+1), w)
        if self.family == "kosmos-2":  # post-LN on all 257 tokens, L2-normalize, resample to 64, then x sqrt(d)
            return self.lm.scale(self.projector(F.normalize(self.vision.post_layernorm(f), dim=-1)))
        if self.family == "paligemma":  # / sqrt(d) then x sqrt(d) with the text: images enter layer 0 unscaled
            return self.lm.scale(self.projector(self.vision.post_layernorm(f)) / (self.hidden_size ** 0.5))
        return self.projector(f[:, 1:] if self.select == "default" else f)  # LLaVA: layer -2, CLS dropped

    def embed_tokens(self, ids):
        return self.lm.embed(ids)

    def forward(self, embeds, positions, cache=None, media=None, mask=None):
        """Causal LM over embeds (B, T, d) at 0-based positions (B, T); see the interface. mask (B, 1, T, S) bool
        overrides the causal mask (e.g. PaliGemma's bidirectional prefix, see `padding_attention_mask`)."""
        if media is not None:
            raise ValueError(f"{self.family} is decoder-only: image tokens go inline, not as media=")
        return self.lm(embeds, positions, cache, mask)

    def rope(self, x, positions):
        return self.lm.rope(x, positions)

    def lm_logits(self, hidden=None, **hf_inputs):
        """lm_logits(hidden (..., d)) -> (..., vocab). With the transformers model's keyword inputs instead
        (input_ids, pixel_values, attention_mask, plus image_embeds_position_mask for Kosmos-2 or token_type_ids
        for PaliGemma) -> that model's logits (B, T, vocab): the whole forward, used by the parity tests."""
        if hidden is not None:
            return self.lm.lm_head(hidden)
        return self.lm.lm_head(self._hf_forward(**hf_inputs))

    def _hf_forward(self, input_ids, pixel_values=None, attention_mask=None, image_embeds_position_mask=None,
                    token_type_ids=None, labels=None):
        B, T = input_ids.shape
        am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ids = input_ids
        if self.image_token_id is not None and self.image_token_id >= self.vocab_size:
            ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)  # out-of-vocab placeholder id
        x = self.embed_tokens(ids)  # (B, T, d)
        if pixel_values is not None:
            img = self._encode_family(pixel_values).to(x.dtype)  # (N, T_img, d)
            if self.family == "kosmos-2":
                if image_embeds_position_mask is None:
                    raise ValueError("Kosmos-2 needs image_embeds_position_mask (1 at the 64 image positions)")
                where = image_embeds_position_mask.bool()
            else:
                where = input_ids == self.image_token_id
            if int(where.sum()) != img.shape[0] * img.shape[1]:
                raise ValueError(f"{int(where.sum())} image placeholder positions for {img.shape[0]} images of "
                                 f"{img.shape[1]} tokens each: every image needs exactly {img.shape[1]}")
            x = x.masked_scatter(where[..., None], img)
        pos = torch.arange(T, device=x.device).expand(B, T)
        if self.family == "kosmos-2":  # fairseq: positions count non-pad ids, pad ids get the zero row
            real = (input_ids != self.pad_token_id).long()
            pos = real.cumsum(-1) * real - 1
            mask = padding_attention_mask(am, T)
        elif self.family == "paligemma":  # transformers: prefix-LM with token_type_ids + labels, else all visible
            if token_type_ids is not None and labels is not None:
                mask = padding_attention_mask(am, T, bidir_keys=token_type_ids == 0)
            else:
                mask = padding_attention_mask(am, T, causal=False)
        else:
            mask = padding_attention_mask(am, T)
        return self.lm(x, pos, mask=mask)[0]

    def trainable_groups(self):
        emb = [self.lm.embed_tokens.weight] + ([] if self.lm.tie else [self.lm.lm_head.weight])
        vision = list(self.vision.parameters()) + list(self.projector.parameters())
        language = list(self.lm.layers.parameters()) + list(self.lm.norm.parameters())
        return {"vision": vision, "language": language, "embeddings": emb}  # a new resampler always trains


# ---- loading a Hugging Face folder ----

# transformers >= 4.52 writes PaliGemma/LLaVA as model.{language_model,vision_tower,multi_modal_projector}.* and
# lm_head.*; hub files use the legacy names. The first four rules map the new layout onto the legacy one.
_RENAMES = [
    (r"^model\.language_model\.", "language_model.model."), (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."), (r"^lm_head\.", "language_model.lm_head."),
    (r"^(vision_model\.model|vision_tower\.vision_model)\.(embeddings\.|encoder\.)?", "vision."),
    (r"^image_to_text_projection\.", "projector."), (r"^multi_modal_projector\.(linear\.)?", "projector."),
    (r"^(text_model|language_model)\.model\.(layer_norm|norm)\.", "lm.norm."),
    (r"^(text_model|language_model)\.(model\.)?", "lm."),
    (r"\.self_attn\.", ".attn."), (r"\.out_proj\.", ".o_proj."),
    (r"\.(layer_norm1|self_attn_layer_norm|input_layernorm)\.", ".norm1."),
    (r"\.(layer_norm2|final_layer_norm|post_attention_layernorm)\.", ".norm2."),
    (r"\.ffn\.ffn_layernorm\.", ".mlp.inner_ln."), (r"\.ffn\.", ".mlp."),
    (r"\.mlp\.gate_proj\.", ".mlp.gate."), (r"\.mlp\.up_proj\.", ".mlp.fc1."), (r"\.mlp\.down_proj\.", ".mlp.fc2."),
]


def checkpoint_key_to_ours(key):
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _unused_checkpoint_key(vlm, key):
    """Tensors a family legitimately does not use: SigLIP's pooling head, CLIP layers after LLaVA's feature layer
    and CLIP's post-LN, a stored copy of a tied LM head, and index buffers older exports saved (CLIP's
    `position_ids`, Kosmos-2's sinusoidal table, both recomputed here)."""
    m = re.match(r"^vision\.layers\.(\d+)\.", key)
    return (key.startswith("vision.head.") or (key == "lm.lm_head.weight" and vlm.lm.tie)
            or key.endswith((".position_ids", "embed_positions.weights"))
            or (vlm.family == "llava" and (key.startswith("vision.post_layernorm.")
                                           or (m is not None and int(m.group(1)) >= vlm.feature_layer))))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(fn):
    """{key: (dtype, shape, start, end)} of a safetensors file (absolute byte offsets), checked against its size.
    Format: 8-byte little-endian header length, a JSON header, then the raw little-endian tensor bytes."""
    size = os.path.getsize(fn)
    with open(fn, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"cannot read {fn} ({e}): the file is truncated or not a safetensors file; download it "
                             f"again") from None
    out = {}
    for key, h in header.items():
        if key == "__metadata__":
            continue
        start, end = (8 + n + o for o in h["data_offsets"])
        if end > size:
            raise ValueError(f"{fn} is truncated: tensor {key!r} ends at byte {end} but the file has {size} bytes; "
                             f"download it again")
        if h["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{fn}: tensor {key!r} has dtype {h['dtype']}, expected one of {sorted(_ST_DTYPES)}")
        out[key] = (_ST_DTYPES[h["dtype"]], tuple(h["shape"]), start, end)
    return out


def _read_into(f, entry, param):
    """Copy one tensor from the open file straight into `param` (no mmap, no full-file buffer): bytes go into the
    parameter's own memory when dtype/device match, else through a buffer of this one tensor."""
    dtype, shape, start, end = entry
    direct = param.dtype == dtype and param.device.type == "cpu" and param.is_contiguous()
    buf = param.data if direct else torch.empty(shape, dtype=dtype)
    f.seek(start)
    if f.readinto(buf.view(-1).view(torch.uint8).numpy()) != end - start:
        raise ValueError(f"short read at byte {start} of {f.name}: the file is truncated; download it again")
    if not direct:
        param.data.copy_(buf)


def checkpoint_files(path):
    """{checkpoint key: safetensors file} for model.safetensors or shards listed in model.safetensors.index.json."""
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map': the index is damaged; download it again")
        for fn in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, fn)):
                raise FileNotFoundError(f"shard {fn} listed in {index} is missing: the download is incomplete")
        return {k: os.path.join(path, fn) for k, fn in weight_map.items()}
    if os.path.isfile(single):
        return {k: single for k in safetensors_header(single)}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} (found "
                            f"{sorted(os.listdir(path))}); a torch .bin/.pt checkpoint must be converted once to "
                            f"safetensors (see docs/backbones.md)")


def _read_checkpoint_file(vlm, fn, keys, to_ours, params, loaded, unexpected, cfg_path):
    """The tensors `keys` of safetensors file fn -> their parameters; adds our names to `loaded`, and to
    `unexpected` the checkpoint keys no parameter of ours takes (to_ours: checkpoint key -> targets)."""
    header = safetensors_header(fn)
    with open(fn, "rb") as f:
        for key in keys:
            targets = [t for t in to_ours(key) if not _unused_checkpoint_key(vlm, t[0])]  # (ours, part, n, ...)
            if any(t[0] not in params for t in targets):
                unexpected.append(key)
            elif targets:
                _read_checkpoint_tensor(vlm, f, fn, key, header, targets, params, cfg_path)
                loaded.update(t[0] for t in targets)


def _read_checkpoint_tensor(vlm, f, fn, key, header, targets, params, cfg_path):
    """Checkpoint tensor `key` of the open safetensors file f -> its parameter(s), after checking its shape.
    targets: [(our name, part, n_parts[, heads])]; a fused tensor (q/k/v, n_parts > 1) is n times the rows of
    each part and is read once, then split (_split_fused)."""
    if key not in header:
        raise ValueError(f"{key!r} is listed for {fn} in the index but is not in that file: the download "
                         f"is inconsistent; download it again")
    p0, n = params[targets[0][0]], targets[0][2]
    expected = (n * p0.shape[0],) + tuple(p0.shape[1:]) if p0.dim() else tuple(p0.shape)
    if header[key][1] != expected:
        raise ValueError(f"checkpoint key {key!r} in {fn} has shape {header[key][1]}, expected "
                         f"{expected} from {cfg_path}: config and weights disagree")
    with torch.no_grad():
        if n == 1:
            _read_into(f, header[key], p0)
            return
        buf = torch.empty(expected, dtype=header[key][0])  # one buffer of this tensor, split into its parts
        _read_into(f, header[key], buf)
        _split_fused(vlm, key, buf, targets, params)


def _split_fused(vlm, key, buf, targets, params):
    """A fused tensor buf (n * rows, ...) -> its n parts' parameters. Consecutive blocks, unless the rows are
    interleaved per head: GPT-NeoX's query_key_value orders them (head, q/k/v, dim); a target's 4th entry names
    the heads of other interleaved layouts."""
    n = targets[0][2]
    neox = key.endswith(("query_key_value.weight", "query_key_value.bias"))
    heads = targets[0][3] if len(targets[0]) > 3 else vlm.lm.n_heads if neox else None
    parts = buf.chunk(n) if heads is None else buf.view(heads, n, -1, *buf.shape[1:]).unbind(1)
    for (ours, *_), part in zip(targets, parts):
        params[ours].data.copy_(part.reshape(params[ours].shape))


def load_vlm(path, dtype=torch.float32, device="cpu", weights=True):
    """A Hugging Face model folder -> PretrainedVLM with its weights and tokenizer, in eval mode.
    weights=False: the architecture and tokenizer only, parameters left uninitialized (vla.load_checkpoint
    fills them from a run's model.safetensors; the folder then needs no weight files).
    The model is built on the meta device, then each tensor is read from the safetensors file straight into its
    parameter's memory (no memory map, no second copy of the checkpoint). Every parameter must be found
    with the right shape and every checkpoint tensor used (or known to be unused), else a clear error."""
    path = os.path.expanduser(str(path))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: the backbone must be a Hugging Face model folder with "
                                f"config.json, *.safetensors and the tokenizer's sentencepiece file")
    with open(cfg_path) as f:
        cfg = json.load(f)
    files = checkpoint_files(path) if weights else {}
    flamingo, moondream = cfg.get("model_type") == "openflamingo", cfg.get("model_type") == "moondream1"
    with torch.device("meta"):
        vlm = openflamingo_from_config(cfg) if flamingo else _family_class(cfg)(cfg)
    vlm = vlm.to(dtype).to_empty(device=device)
    key_map = getattr(vlm, "key_to_ours", None)  # families with their own key table (Qwen-VL, UForm)
    vlm.lm.tie_weights()
    params, loaded, unexpected = dict(vlm.named_parameters()), set(), []
    to_ours = openflamingo_key_to_ours if flamingo else moondream_key_to_ours if moondream else key_map \
        or (lambda key: [(checkpoint_key_to_ours(key), 0, 1)])
    for fn in sorted(set(files.values())):
        keys = [k for k, v in files.items() if v == fn]
        _read_checkpoint_file(vlm, fn, keys, to_ours, params, loaded, unexpected, cfg_path)
    if unexpected:
        raise ValueError(f"{len(unexpected)} checkpoint tensors in {path} do not belong to a {vlm.family} model, "
                         f"e.g. {unexpected[:4]}: is config.json's model_type right for these weights?")
    missing = sorted(set(params) - loaded) if weights else []
    if missing:
        raise ValueError(f"{len(missing)} weights are missing from the checkpoint in {path}, e.g. {missing[:4]} "
                         f"(our names): the download is incomplete or from a different architecture")
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):  # the image processor's own statistics win over the family defaults
        with open(pre) as f:
            pc = json.load(f)
        vlm.image_mean = tuple(pc.get("image_mean", vlm.image_mean))
        vlm.image_std = tuple(pc.get("image_std", vlm.image_std))
    tok = load_openflamingo_tokenizer(path, cfg) if flamingo or moondream else vlm.load_tokenizer(path) if key_map \
        else load_family_tokenizer(path, vlm.family)
    vlm.tokenizer = tok
    if vlm.family == "kosmos-2" and tok is not None and {"<image>", "</image>"} <= set(tok.added):
        vlm.image_boundary = (tok.added["<image>"], tok.added["</image>"])
        vlm.n_image_tokens += 2
    return vlm.eval()


# ---- tokenizers: the family's sentencepiece file plus the added tokens of tokenizer_config.json ----

class FamilyTokenizer(SentencePieceTokenizer):
    """Sentencepiece ids numbered as the family's Hugging Face tokenizer numbers them. Kosmos-2 (XLM-R, fairseq
    layout): <s>=0 <pad>=1 </s>=2 <unk>=3, piece i -> i + 1, <mask> after the pieces. Gemma, LLaMA: piece ids
    as they are. Added tokens ("<image>", "<grounding>", "<loc0001>", ...) are matched whole before
    sentencepiece runs, as transformers does. encode() adds no BOS/EOS (the interface's convention)."""

    def __init__(self, model_proto, fairseq=False, added=None, pad_id=None, special=()):
        super().__init__(model_proto)
        self.fairseq = fairseq
        n = self.sp.get_piece_size()
        if fairseq:
            self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
            added = {"<mask>": n + 1, **(added or {})}
        else:
            self.unk_id = self.sp.unk_id()
            self.pad_id = pad_id if pad_id is not None else self.pad_id
        self.added = dict(added or {})
        self.vocab_size = max([n + int(fairseq)] + [i + 1 for i in self.added.values()])
        self._id_to_added = {i: s for s, i in self.added.items()}
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id, self.unk_id}
        self.special_ids |= {self.added[s] for s in special if s in self.added}
        alts = "|".join(re.escape(s) for s in sorted(self.added, key=len, reverse=True))
        self._split = re.compile(f"({alts})") if alts else None

    def _pieces(self, text):
        ids = self.sp.encode(text)
        if self.fairseq:  # fairseq offset: spm's <unk> (0) becomes 3, every other piece shifts by one
            ids = [self.unk_id if i == self.sp.unk_id() else i + 1 for i in ids]
        return ids

    def encode(self, text):
        ids = []
        for part in (self._split.split(text) if self._split else [text]):
            ids += [self.added[part]] if part in self.added else (self._pieces(part) if part else [])
        return ids

    def decode(self, ids):
        out, run = [], []
        for i in (int(i) for i in ids):
            if i in self.special_ids:  # like transformers' decode(skip_special_tokens=True)
                continue
            if i in self._id_to_added:
                out += [self.sp.decode(run), self._id_to_added[i]]
                run = []
            else:
                run.append((self.sp.unk_id() if i == self.unk_id else i - 1) if self.fairseq else i)
        return "".join(out + [self.sp.decode(run)])


def load_family_tokenizer(path, family):
    """The family's FamilyTokenizer from a model folder, or None when the folder has no tokenizer file."""
    fn = os.path.join(path, {"kosmos-2": "sentencepiece.bpe.model"}.get(family, "tokenizer.model"))
    if not os.path.isfile(fn):
        return None
    added, pad_id, special = {}, None, []
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc) as f:
            tcfg = json.load(f)
        entries = (tcfg.get("added_tokens_decoder") or {}).items()
        added = {t["content"]: int(i) for i, t in entries}
        special = [t["content"] for i, t in entries if t.get("special")]
        pad = tcfg.get("pad_token")
        pad_id = added.get(pad.get("content") if isinstance(pad, dict) else pad)
    with open(fn, "rb") as f:
        return FamilyTokenizer(f.read(), fairseq=(family == "kosmos-2"), added=added, pad_id=pad_id, special=special)


# ---- tiny random presets of each family (CPU demos and tests; no pretrained knowledge) ----

TINY_FAMILIES = {"tiny-kosmos2": "kosmos-2", "tiny-paligemma": "paligemma", "tiny-llava": "llava",
                 "tiny-moondream": "moondream1", "tiny-qwen-vl": "qwen", "tiny-uform": "vlm"}


def _family_class(cfg):  # the class that builds a config's model_type (MoonDream, Qwen-VL, UForm: own sections)
    kind = cfg.get("model_type")
    return QwenFamilyVLM if kind in QwenFamilyVLM.TYPES else MoondreamVLM if kind == "moondream1" else PretrainedVLM


def tiny_family_config(family, image_size=64, vocab_size=778, patch=16):
    """A Hugging Face style config dict of `family` at toy size (the real architecture, ~1-2M parameters)."""
    if image_size % patch:
        raise ValueError(f"image_size {image_size} must be a multiple of the tiny towers' patch size {patch}")
    if family in QwenFamilyVLM.TYPES:
        return tiny_qwen_config(family, image_size, vocab_size, patch)
    vis = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=patch,
               image_size=image_size)
    if family == "kosmos-2":
        return dict(model_type=family, latent_query_num=16, vision_config=vis,
                    text_config=dict(vocab_size=vocab_size, embed_dim=128, layers=4, attention_heads=4, ffn_dim=256))
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, head_dim=32)
    if family == "paligemma":
        return dict(model_type=family, projection_dim=128, image_token_index=vocab_size - 1, vision_config=vis,
                    text_config=dict(text, model_type="gemma", num_key_value_heads=1))
    if family == "moondream1":  # the text_config layout (moondream2 2024-05-20 .. 08-26): tanh GELU, eps 1e-5
        return dict(model_type=family, vision_config=vis, text_config=dict(text, model_type="phi"))
    return dict(model_type="llava", image_token_index=vocab_size - 1, vision_config=dict(vis, num_hidden_layers=3),
                text_config=dict(text, model_type="llama", num_key_value_heads=2))


def build_pretrained_family(name, image_size=None, tokenizer_path=None, dtype=torch.float32, device="cpu",
                            resampler=None, weights=True):
    """build_backbone's branch for the families above: a Hugging Face folder path, or a tiny-* preset (random
    init like transformers': N(0, 0.02) weights, zero biases; tokenizer trained on the fly or reloaded).
    resampler=n: add a perceiver resampler to n latents (e.g. backbone_kwargs={"resampler": 64} for LLaVA)."""
    if name not in TINY_FAMILIES:
        vlm = load_vlm(name, dtype=dtype, device=device, weights=weights)  # the folder's own tokenizer
        return vlm.add_resampler(resampler) if resampler else vlm
    tok = SentencePieceTokenizer.load(tokenizer_path) if tokenizer_path else SentencePieceTokenizer.train_tiny()
    cfg = tiny_family_config(TINY_FAMILIES[name], image_size or 64, tok.vocab_size + 256 + 10)
    vlm = _family_class(cfg)(cfg)
    for m in vlm.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    vlm.lm.tie_weights()
    vlm.tokenizer, vlm.tokenizer_filename = tok, TinyVLM.tokenizer_filename
    if resampler:
        vlm.add_resampler(resampler, depth=2, heads=4, head_dim=32)
    return vlm.to(device=device, dtype=dtype)


# ---- MoonDream (SigLIP + Phi-1.5) ----
# vikhyatk/moondream1 and the moondream2 revisions up to 2024-08-26 (the RoboVLMs MoonDream): a SigLIP so400m/14
# tower at 378 px (27 x 27 = 729 tokens, no class token), an MLP projector to Phi's width, and Phi-1.5 (partial
# rotary, parallel attention + MLP on one LayerNorm). The released config.json holds only model_type "moondream1"
# and an empty `phi_config` (up to 2024-04-02) or `text_config` (later); every size is fixed in moondream's code,
# hence the defaults below, which `vision_config` / `text_config` fields override (the tiny presets use them).
# Revision-dependent numerics the weights cannot reveal: `phi_config` folders get the timm tower (LayerNorm eps
# 1e-6, exact GELU, projector on the 1152 features); `text_config` folders get moondream's own ViT (eps 1e-5, tanh
# GELU) with the projector on [global, crops] features, which at 378 px are the global features twice (2304).
# The 2024-04-02 revision (own ViT, still `phi_config`) needs "vision_config": {"layer_norm_eps": 1e-5,
# "hidden_act": "gelu_pytorch_tanh"} added to its config.json. Tokenizer: GPT-2 style BPE in tokenizer.json.

_MOONDREAM_V = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    patch_size=14, image_size=378, layer_norm_eps=1e-5, hidden_act="gelu_pytorch_tanh")
_PHI_15 = dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
               num_attention_heads=32, hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.5,
               rope_theta=10000.0)
_PHI_MSFT = dict(n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
                 n_inner="intermediate_size", layer_norm_epsilon="layer_norm_eps", activation_function="hidden_act")


def _phi_config(t):
    """text_config / phi_config -> Phi-1.5 settings. moondream1's own "phi-msft" config names n_embd, rotary_dim
    (absolute), n_inner (None = 4 d), and pads vocab_size to a multiple of 64."""
    if t.get("model_type") == "phi-msft":
        t = {_PHI_MSFT.get(k, k): x for k, x in t.items() if x is not None}
        d = t.setdefault("hidden_size", _PHI_15["hidden_size"])
        hd = d // t.setdefault("num_attention_heads", _PHI_15["num_attention_heads"])
        t = {"intermediate_size": 4 * d, **t, "vocab_size": -(-t.get("vocab_size", 51200) // 64) * 64,
             "partial_rotary_factor": min(t.pop("rotary_dim", 32), hd) / hd}
    return {**_PHI_15, **t}


class LinearPatchEmbedding(nn.Linear):
    """moondream's patch embedding: a Linear over each flattened 14 x 14 patch, channels first (c, row, col), i.e.
    a stride-p convolution whose weight is stored flat (w, 3 p p). Returns the conv layout (N, w, S/p, S/p)."""

    def __init__(self, width, patch):
        super().__init__(3 * patch * patch, width)
        self.patch = patch

    def forward(self, x):
        w = self.weight.view(len(self.weight), 3, self.patch, self.patch)
        return F.conv2d(x, w, self.bias, stride=self.patch)


class LearnedTable(nn.Module):
    """A learned table stored as the checkpoint stores it, here timm's pos_embed (1, P, w); ViT adds `.weight`."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape) * 0.02)


class PhiHead(nn.Module):
    """moondream's CausalLMHead: the final LayerNorm, then a biased linear to the vocabulary."""

    def __init__(self, d, vocab, eps):
        super().__init__()
        self.ln, self.linear = nn.LayerNorm(d, eps=eps), nn.Linear(d, vocab)

    def forward(self, h):  # (..., d) -> (..., vocab)
        return self.linear(self.ln(h))


class PhiLM(DecoderLM):
    """Phi-1.5 as moondream's code has it: rotary on the first partial_rotary_factor of each head (GPT-NeoX
    style) and a parallel residual x + attn(ln x) + mlp(ln x) with ONE LayerNorm (norm2 None), biases everywhere,
    gelu_new, and the final LayerNorm inside the LM head (PhiHead). forward therefore returns the last block's
    output before that LayerNorm: moondream's hidden_states[-1], what RoboVLMs feeds its policy head (reference
    note, pitfall M1); lm_logits applies ln, then linear."""

    def __init__(self, t):
        if t.get("qk_layernorm") or t.get("rope_scaling") or t.get("tie_word_embeddings"):
            raise ValueError("Phi with qk_layernorm, rope_scaling or tied embeddings is not supported: moondream's "
                             "Phi-1.5 has none of them")
        d, heads, eps = t["hidden_size"], t["num_attention_heads"], t["layer_norm_eps"]
        super().__init__(t["vocab_size"], d, t["num_hidden_layers"], heads, t["intermediate_size"], t["hidden_act"],
                         "ln", eps, bias=True, gated=False, rope_theta=t["rope_theta"], tie=False)
        self.rot = int(d // heads * t["partial_rotary_factor"])
        for blk in self.layers:
            blk.parallel, blk.norm2 = True, None
        self.norm, self.lm_head = nn.Identity(), PhiHead(d, t["vocab_size"], eps)

    def rope(self, x, positions):  # rotate the first `rot` dims of each head, pass the rest
        return torch.cat([rope_rotate(x[..., :self.rot], positions, self.rope_theta), x[..., self.rot:]], -1)


class MoondreamVLM(PretrainedVLM):
    """SigLIP tower -> projector fc2(gelu(fc1 .)) to Phi's width (hidden 4 d) -> Phi-1.5, behind the backbone
    interface. PretrainedVLM's methods (encode_images with the optional resampler, forward, rope, lm_logits) apply
    as they are; only the parts differ, so its family-specific __init__ is not run. Image tokens: (S / p)^2, 729."""

    def __init__(self, cfg):
        nn.Module.__init__(self)
        self.family, self.config, self.tokenizer, self.resampler, self.image_boundary = "moondream1", cfg, None, None, \
            None
        timm_era = "text_config" not in cfg  # moondream1 .. moondream2 2024-03-13 (see the section comment)
        v = {**_MOONDREAM_V, **(dict(layer_norm_eps=1e-6, hidden_act="gelu") if timm_era else {}),
             **(cfg.get("vision_config") or {})}
        t = _phi_config(cfg.get("text_config") or cfg.get("phi_config") or {})
        self.vision = _vit(v, clip=False)
        w, p, g, d = v["hidden_size"], v["patch_size"], v["image_size"] // v["patch_size"], t["hidden_size"]
        self.vision.patch_embedding = LinearPatchEmbedding(w, p)
        self.vision.position_embedding = LearnedTable(1, g * g, w)
        self.crops = v.get("multi_crop", not timm_era)  # projector input [global, crops] = [global, global]
        self.projector = FeedForward(w * (1 + self.crops), 4 * d, v["hidden_act"], out=d)  # moondream: hidden 4 d
        self.lm = PhiLM(t)
        self.max_positions = t.get("max_position_embeddings") or 2048  # Phi-1.5's context (Policy.act checks it)
        self.image_token_id, self.pad_token_id, self.n_image_tokens = None, None, g * g
        self.tokenizer_filename = cfg.get("tokenizer_file", "tokenizer.json")
        self.image_size, self.image_mean, self.image_std = v["image_size"], (0.5,) * 3, (0.5,) * 3  # moondream
        attn = self.lm.layers[0].attn
        self.hidden_size, self.vocab_size = d, t["vocab_size"]
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = len(self.lm.layers), attn.n_heads, \
            attn.n_kv, attn.head_dim

    def prompt(self, instruction):
        return instruction  # RoboVLMs: "<|endoftext|>{instr}", the BOS being added by the VLA

    def _encode_family(self, x):  # (N, 3, S, S) -> (N, 729, d)
        f = self.vision.post_layernorm(self.vision(x))  # (N, P, w)
        return self.projector(torch.cat([f, f], -1) if self.crops else f)

    def trainable_groups(self):
        vision = list(self.vision.parameters()) + list(self.projector.parameters())
        emb = [self.lm.embed_tokens.weight, self.lm.lm_head.linear.weight, self.lm.lm_head.linear.bias]
        language = list(self.lm.layers.parameters()) + list(self.lm.lm_head.ln.parameters())
        return {"vision": vision, "language": language, "embeddings": emb}


# moondream state_dict names -> ours ("{qkv}": a fused [Q; K; V] projection split in three while loading)
_MOONDREAM_RENAMES = [
    (r"^region_model\..*", ""),  # 2024-08-26's detection head: unused by a VLA
    (r"^vision_encoder\.encoder\.model\.visual\.", "vision."), (r"^vision\.blocks\.", "vision.layers."),
    (r"^vision\.patch_embed\.linear\.", "vision.patch_embedding."),
    (r"^vision\.pos_embed$", "vision.position_embedding.weight"), (r"^vision\.norm\.", "vision.post_layernorm."),
    (r"\.attn\.qkv\.", ".attn.{qkv}_proj."), (r"\.attn\.proj\.", ".attn.o_proj."),
    (r"^vision_encoder\.projection\.mlp\.", "projector."),
    (r"^text_model\.transformer\.embd\.wte\.", "lm.embed_tokens."), (r"^text_model\.transformer\.h\.", "lm.layers."),
    (r"^text_model\.lm_head\.", "lm.lm_head."), (r"^(lm\.layers\.\d+)\.ln\.", r"\1.norm1."),
    (r"\.mixer\.Wqkv\.", ".attn.{qkv}_proj."), (r"\.mixer\.out_proj\.", ".attn.o_proj."),
]


def moondream_key_to_ours(key):
    """-> [(our parameter name, chunk index, number of chunks)], [] for a tensor that is not used."""
    for pattern, repl in _MOONDREAM_RENAMES:
        key = re.sub(pattern, repl, key)
    if "{qkv}" in key:
        return [(key.replace("{qkv}", c), i, 3) for i, c in enumerate("qkv")]
    return [(key, 0, 1)] if key else []


# ---- Flamingo-style (encoder-decoder in the paper's terms): resampled media enter through gated cross-attention ----

class GatedCrossAttention(nn.Module):
    """Flamingo's GATED XATTN-DENSE block, inserted before an LM layer: x += tanh(a) * xattn(LN x, media);
    x += tanh(f) * MLP(LN x), gates a, f initialised at 0 so the pretrained LM is unchanged at the start."""

    def __init__(self, d, media_d, heads=8, head_dim=64, ff_mult=4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attention(d, heads, head_dim=head_dim, bias=False, kv_dim=media_d)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(d)
        self.ff = FeedForward(d, ff_mult * d, "gelu", bias=False)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, media, media_pos=None, positions=None):
        """x (B, T, d); media (B, n, d_m), seen by every token, or (B, M, n, d_m) with media_pos (B, M): the
        sequence position of each image; a token then sees only the latest image at or before its position
        (OpenFlamingo's only_attend_immediate_media); tokens before the first image get no cross-attention update
        (their attention weights are zeroed) but still pass through the gated feed-forward."""
        seen = None
        mask = None
        if media.dim() == 4:
            B, M, n, _ = media.shape
            latest = (media_pos[:, None, :] <= positions[:, :, None]).sum(-1)  # (B, T) images so far
            img_of_key = torch.arange(M, device=x.device).repeat_interleave(n)  # (M * n,)
            mask = (img_of_key[None, None, :] == (latest - 1).clamp(min=0)[..., None])[:, None]  # (B, 1, T, M*n)
            seen = (latest > 0)[..., None].to(x.dtype)  # (B, T, 1)
            media = media.flatten(1, 2)
        h = self.attn(self.norm(x), mask=mask, kv=media)[0]
        x = x + torch.tanh(self.attn_gate) * (h if seen is None else h * seen)
        return x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))  # every token, as OpenFlamingo's helpers.py


class FlamingoVLM(nn.Module):
    """Vision tower -> perceiver resampler (media) -> LLaMA-style LM with a GatedCrossAttention before every
    `cross_attn_every`-th layer (OpenFlamingo 3B: every layer, 4B: every 2, 9B: every 4). Implements the backbone
    interface with image_tokens_inline = False: the VLA passes encode_images' output as forward(media=...).
    Official RoboFlamingo trains the resampler, cross-attention and embeddings and freezes vision and the LM's
    self-attention; here the new modules always train and trainable_groups() covers the rest."""

    image_tokens_inline = False
    tokenizer_filename = "tokenizer.model"
    max_positions = 2048  # MPT-1B / RedPajama-3B / LLaMA-7B (OpenFlamingo's LMs) were trained on 2048 tokens

    def __init__(self, vision, media_d, lm, cross_attn_every=1, n_latents=64, resampler_depth=6, heads=8,
                 head_dim=64, image_size=224, mean=CLIP_MEAN, std=CLIP_STD, tokenizer=None, tokens_ln_post=True):
        super().__init__()
        self.vision, self.lm, self.tokenizer, self.family = vision, lm, tokenizer, "flamingo"
        self.tokens_ln_post = tokens_ln_post  # False: patch tokens before ln_post (open_clip < 2.24, OpenFlamingo)
        self.resampler = PerceiverResampler(media_d, resampler_depth, heads, head_dim, n_latents)
        d = lm.embed_tokens.weight.shape[1]
        self.xattn = nn.ModuleDict({str(i): GatedCrossAttention(d, media_d, heads, head_dim)  # OpenFlamingo:
                                    for i in range(len(lm.layers)) if (i + 1) % cross_attn_every == 0})  # (i+1)%n
        attn = lm.layers[0].attn
        self.hidden_size, self.vocab_size, self.n_image_tokens = d, lm.embed_tokens.weight.shape[0], n_latents
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = len(lm.layers), attn.n_heads, attn.n_kv, \
            attn.head_dim
        self.image_size, self.image_mean, self.image_std = image_size, tuple(mean), tuple(std)

    def prompt(self, instruction):  # official RoboVLMs/RoboFlamingo: "<image>{instr}<|endofchunk|>" (+ EOS)
        if {"<image>", "<|endofchunk|>"} <= set(getattr(self.tokenizer, "added", {})):
            return f"<image>{instruction}<|endofchunk|>"
        return instruction

    def encode_images(self, x):  # (N, 3, S, S) -> (N, n_latents, media_d): CLIP patch tokens (CLS dropped)
        h = self.vision(x)
        return self.resampler((self.vision.post_layernorm(h) if self.tokens_ln_post else h)[:, 1:])

    def embed_tokens(self, ids):
        return self.lm.embed(ids)

    def rope(self, x, positions):
        return self.lm.rope(x, positions)

    def forward(self, embeds, positions, cache=None, media=None, media_pos=None):
        """As the interface; media (B, n, d_m) or (B, M, n, d_m) + media_pos (B, M), see GatedCrossAttention.
        media=None runs the plain LM (what the gates at 0 reproduce exactly)."""
        x, new_cache = embeds, []
        rope = lambda t: self.lm.rope(t, positions)  # noqa: E731
        mask = self.lm.alibi_mask(x, cache) if isinstance(self.lm, MptLM) else None  # (1, h, T, S) float or None
        for i, blk in enumerate(self.lm.layers):
            if media is not None and str(i) in self.xattn:
                x = self.xattn[str(i)](x, media.to(x.dtype), media_pos, positions)
            x, kv = blk(x, None if mask is not None else rope, None if cache is None else cache[i], mask, causal=True)
            new_cache.append(kv)
        return self.lm.norm(x), new_cache

    def lm_logits(self, hidden):
        return self.lm.lm_head(hidden)

    def trainable_groups(self):
        emb = [self.lm.embed_tokens.weight] + ([] if self.lm.tie else [self.lm.lm_head.weight])
        return {"vision": list(self.vision.parameters()), "embeddings": emb,
                "language": list(self.lm.layers.parameters()) + list(self.lm.norm.parameters())}


def tiny_flamingo(image_size=64, tokenizer_path=None, cross_attn_every=2):
    """Random toy Flamingo-style backbone (CLIP-style ViT, resampler to 16 latents, 4-layer LLaMA-style LM)."""
    tok = SentencePieceTokenizer.load(tokenizer_path) if tokenizer_path else SentencePieceTokenizer.train_tiny()
    vis = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
               image_size=image_size, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    if image_size % 16:
        raise ValueError(f"image_size {image_size} must be a multiple of the tiny tower's patch size 16")
    lm = _rope_decoder({**_LLAMA, "vocab_size": tok.vocab_size + 256 + 10, "hidden_size": 128,
                        "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "tie_word_embeddings": True}, gemma=False)
    m = FlamingoVLM(_vit(vis, clip=True), 64, lm, cross_attn_every, n_latents=16, resampler_depth=2, heads=4,
                    head_dim=16, image_size=image_size, tokenizer=tok)
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)
    return m


# ---- OpenFlamingo checkpoints (LM: 3B MPT-1B, 4B GPT-NeoX RedPajama-3B, 9B MPT-7B or LLaMA-7B), converted once ----

def alibi_slopes(n_heads, bias_max=8.0):
    """MPT's ALiBi slopes 2^(-bias_max k / n), k = 1..n, n = n_heads rounded up to a power of two; for other head
    counts the odd-k slopes come first, then the even ones, cut to n_heads (as MPT's reference code)."""
    n2 = 2 ** math.ceil(math.log2(n_heads))
    s = 2.0 ** (-torch.arange(1, n2 + 1, dtype=torch.float32) * (bias_max / n2))  # (n2,)
    return s if n2 == n_heads else torch.cat([s[1::2], s[::2]])[:n_heads]


class MptLM(DecoderLM):
    """MPT (OpenFlamingo-3B's MPT-1B-RedPajama): pre-LN blocks with no biases at all (LayerNorms included), fused
    Wqkv (split when loading), exact-GELU MLP, tied LM head, no position embeddings: ALiBi adds slope_h * (j - i)
    to the attention scores. Reads transformers' MptConfig fields and the original mosaic_gpt ones (attn_qk_ln:
    LayerNorms on q and k, attn_clip_qkv). Positions are not used: ALiBi counts cache + new tokens."""

    def __init__(self, c):
        a = c.get("attn_config") or {}
        get = lambda k, old, default: a.get(k, c.get(old, default))  # noqa: E731  MptConfig, then mosaic_gpt
        if not get("alibi", "alibi", True) or get("softmax_scale", "softmax_scale", None) is not None \
                or not c.get("no_bias", True):
            raise ValueError("MPT with learned positions, a custom softmax_scale or biases is not supported: the "
                             "OpenFlamingo MPTs use alibi=True, softmax_scale=None, no_bias=True")
        d, heads = c.get("d_model", 2048), c.get("n_heads", 16)
        eps = c.get("layer_norm_epsilon", 1e-5)
        super().__init__(c.get("vocab_size", 50432), d, c.get("n_layers", 24), heads,
                         int(c.get("expansion_ratio", c.get("mlp_ratio", 4)) * d), "gelu", "ln", eps, bias=False,
                         gated=False, rope_theta=None, tie=True)
        self.n_heads, self.bias_max = heads, get("alibi_bias_max", "alibi_bias_max", 8)
        for blk in self.layers:
            blk.norm1.register_parameter("bias", None), blk.norm2.register_parameter("bias", None)
            blk.attn.clip_qkv = get("clip_qkv", "attn_clip_qkv", None)
            if get("qk_ln", "attn_qk_ln", False):
                blk.attn.q_ln, blk.attn.k_ln = (nn.LayerNorm(d, eps=eps, bias=False) for _ in "qk")
        self.norm.register_parameter("bias", None)

    def alibi_mask(self, x, cache=None, allowed=None):
        """Additive mask (1 or B, h, T, S): slope_h * (j - i) where query i (after the cache) may see key j (causal,
        or `allowed` bool (B, 1, T, S) from padding_attention_mask), -inf elsewhere."""
        T, past = x.shape[1], 0 if cache is None else cache[0][0].shape[2]
        i = torch.arange(past, past + T, device=x.device)[:, None]
        j = torch.arange(past + T, device=x.device)[None, :]
        bias = alibi_slopes(self.n_heads, self.bias_max).to(x.device)[:, None, None] * (j - i)  # (h, T, S)
        ok = (j <= i)[None, None] if allowed is None else allowed
        return bias[None].masked_fill(~ok, float("-inf")).to(x.dtype)

    def forward(self, x, positions=None, cache=None, mask=None):
        bias, new_cache = self.alibi_mask(x, cache, mask), []
        for i, blk in enumerate(self.layers):
            x, kv = blk(x, None, None if cache is None else cache[i], bias, causal=True)
            new_cache.append(kv)
        return self.norm(x), new_cache


class NeoXLM(DecoderLM):
    """GPT-NeoX (OpenFlamingo-4B's RedPajama-INCITE-3B): LayerNorms and linears with biases, exact GELU, fused
    query_key_value with rows ordered (head, q/k/v, dim) (split per head when loading), RoPE on the first
    rotary_pct of each head, parallel residual when use_parallel_residual, untied embed_out."""

    def __init__(self, c):
        c = {**dict(hidden_act="gelu", layer_norm_eps=1e-5, rotary_pct=0.25, use_parallel_residual=True,
                    tie_word_embeddings=False, attention_bias=True), **c}
        if not c["attention_bias"] or c.get("rope_scaling"):
            raise ValueError("GPT-NeoX without attention biases or with rope_scaling is not supported")
        d, heads = c["hidden_size"], c["num_attention_heads"]
        super().__init__(c["vocab_size"], d, c["num_hidden_layers"], heads, c["intermediate_size"], c["hidden_act"],
                         "ln", c["layer_norm_eps"], bias=True, gated=False,
                         rope_theta=c.get("rope_theta", c.get("rotary_emb_base", 10000.0)),
                         tie=c["tie_word_embeddings"])
        self.n_heads, self.rot = heads, int(d // heads * c["rotary_pct"])
        for blk in self.layers:
            blk.parallel = c["use_parallel_residual"]

    def rope(self, x, positions):  # rotate the first `rot` dims of each head, pass the rest
        return torch.cat([rope_rotate(x[..., :self.rot], positions, self.rope_theta), x[..., self.rot:]], -1)


# open_clip ViT-L/14 with the "openai" weights (QuickGELU), OpenFlamingo's perceiver, MPT-1B (OpenFlamingo-3B)
_OPENCLIP_L14 = dict(image_size=224, layers=24, width=1024, patch_size=14, head_width=64, mlp_ratio=4.0,
                     quick_gelu=True)
_OF_PERCEIVER = dict(depth=6, heads=8, dim_head=64, num_latents=64)


def openflamingo_from_config(cfg):
    """FlamingoVLM (random init) from an "openflamingo" config.json: vision_config in open_clip's vision_cfg names,
    text_config = the language model's own config.json (model_type "mpt"/"mosaic_gpt" or "llama")."""
    v = {**_OPENCLIP_L14, **(cfg.get("vision_config") or {})}
    vis = dict(hidden_size=v["width"], num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v["head_width"],
               intermediate_size=int(v["width"] * v["mlp_ratio"]), patch_size=v["patch_size"],
               image_size=v["image_size"], layer_norm_eps=1e-5, hidden_act="quick_gelu" if v["quick_gelu"] else "gelu")
    t = cfg.get("text_config") or {}
    kind = t.get("model_type", "mpt")
    if kind in ("mpt", "mosaic_gpt"):
        lm = MptLM(t)
    elif kind == "gpt_neox":
        lm = NeoXLM(t)
    elif kind == "llama":
        lm = _rope_decoder({**_LLAMA, **t}, gemma=False)
    else:
        raise ValueError(f"OpenFlamingo language model {kind!r} is not supported: expected 'mpt'/'mosaic_gpt' "
                         f"(OpenFlamingo-3B), 'gpt_neox' (4B, RedPajama-INCITE-3B) or 'llama' (9B)")
    p = {**_OF_PERCEIVER, **(cfg.get("perceiver_config") or {})}
    m = FlamingoVLM(_vit(vis, clip=True), v["width"], lm, cfg.get("cross_attn_every_n_layers", 1), p["num_latents"],
                    p["depth"], p["heads"], p["dim_head"], v["image_size"],
                    tokens_ln_post=cfg.get("vision_tokens_after_ln_post", False))
    m.family, m.config, m.tokenizer_filename = "openflamingo", cfg, cfg.get("tokenizer_file", "tokenizer.json")
    m.max_positions = t.get("max_seq_len") or t.get("max_position_embeddings") or m.max_positions
    m.media_token_id, m.eoc_token_id = cfg.get("media_token_id"), cfg.get("endofchunk_token_id")
    return m


# OpenFlamingo state_dict names -> ours. "{qkv}"/"{kv}": a fused projection split into q/k/v (or k/v) chunks.
# Wrapped LM layers are `<layers>.{i}.decoder_layer.*` + `<layers>.{i}.gated_cross_attn_layer.*` (the same cross-
# attention also appears as `gated_cross_attn_layers.{i}`, the unwrapped layers as `old_decoder_blocks.{i}`).
_OF_RENAMES = [
    (r"^lang_encoder\.old_decoder_blocks\..*|^vision_encoder\.proj$", ""),  # duplicates; CLIP's pooled projection
    (r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.", r"xattn.\1."),
    (r"^lang_encoder\.(transformer\.blocks|model\.layers|gpt_neox\.layers)\.(\d+)\.gated_cross_attn_layer\.",
     r"xattn.\2."),
    (r"\.decoder_layer\.", "."), (r"^(xattn\.\d+)\.attn\.norm\.", r"\1.norm."),
    (r"^perceiver\.layers\.(\d+)\.0\.(norm_media|norm_latents)\.", r"resampler.layers.\1.\2."),
    (r"^perceiver\.layers\.(\d+)\.0\.", r"resampler.layers.\1.attn."),
    (r"^perceiver\.layers\.(\d+)\.1\.", r"resampler.layers.\1.ff."), (r"^perceiver\.", "resampler."),
    (r"\.ff\.0\.", ".ff_norm."), (r"\.ff\.1\.", ".ff.fc1."), (r"\.ff\.3\.", ".ff.fc2."),
    (r"\.to_q\.", ".q_proj."), (r"\.to_kv\.", ".{kv}_proj."), (r"\.to_out\.", ".o_proj."),
    (r"^vision_encoder\.conv1\.", "vision.patch_embedding."),
    (r"^vision_encoder\.positional_embedding$", "vision.position_embedding.weight"),
    (r"^vision_encoder\.ln_pre\.", "vision.pre_layrnorm."), (r"^vision_encoder\.ln_post\.", "vision.post_layernorm."),
    (r"^vision_encoder\.transformer\.resblocks\.", "vision.layers."), (r"^vision_encoder\.", "vision."),
    (r"\.attn\.in_proj_(weight|bias)$", r".attn.{qkv}_proj.\1"), (r"\.attn\.Wqkv\.", ".attn.{qkv}_proj."),
    (r"\.attn\.out_proj\.", ".attn.o_proj."), (r"\.(ln_1|norm_1)\.", ".norm1."), (r"\.(ln_2|norm_2)\.", ".norm2."),
    (r"\.(mlp\.c_fc|ffn\.up_proj|mlp\.mlp_up)\.", ".mlp.fc1."),
    (r"\.(mlp\.c_proj|ffn\.down_proj|mlp\.mlp_down)\.", ".mlp.fc2."),
    (r"^lang_encoder\.transformer\.wte\.", "lm.embed_tokens."),
    (r"^lang_encoder\.transformer\.(norm_f|ln_f)\.", "lm.norm."),
    (r"^lang_encoder\.transformer\.blocks\.", "lm.layers."), (r"^lang_encoder\.lm_head\.", "lm.lm_head."),
    (r"^lang_encoder\.gpt_neox\.embed_in\.", "lm.embed_tokens."), (r"^lang_encoder\.embed_out\.", "lm.lm_head."),
    (r"^lang_encoder\.gpt_neox\.final_layer_norm\.", "lm.norm."), (r"^lang_encoder\.gpt_neox\.layers\.", "lm.layers."),
    (r"\.attention\.query_key_value\.", ".attn.{qkv}_proj."), (r"\.attention\.dense\.", ".attn.o_proj."),
    (r"\.input_layernorm\.", ".norm1."), (r"\.post_attention_layernorm\.", ".norm2."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc1."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc2."),
    (r"^lang_encoder\.", "language_model."),  # LLaMA (first-release 9B): then the Hugging Face renames
]


def openflamingo_key_to_ours(key):
    """-> [(our parameter name, chunk index, number of chunks)], [] for a tensor that is not used."""
    for pattern, repl in _OF_RENAMES:
        key = re.sub(pattern, repl, key)
    if key.startswith("language_model."):
        key = checkpoint_key_to_ours(key)
    for mark, parts in (("{qkv}", "qkv"), ("{kv}", "kv")):
        if mark in key:
            return [(key.replace(mark, c), i, len(parts)) for i, c in enumerate(parts)]
    return [(key, 0, 1)] if key else []


class JsonTokenizer:
    """A Hugging Face `tokenizer.json` (MPT-1B's GPT-NeoX BPE, with OpenFlamingo's added <|endofchunk|>, <image>,
    <PAD>) behind the tokenizer interface. Needs the `tokenizers` package (no sentencepiece model exists for it)."""

    def __init__(self, fn):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"{fn} is a Hugging Face tokenizer.json: reading it needs `pip install tokenizers` "
                              f"(OpenFlamingo-9B's LLaMA ships a sentencepiece tokenizer.model instead)") from None
        self.fn, self.tok = fn, Tokenizer.from_file(fn)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = {s: self.tok.token_to_id(s) for s in ("<|endoftext|>", "<PAD>", "<image>", "<|endofchunk|>")}
        self.bos_id = self.eos_id = ids["<|endoftext|>"]
        self.pad_id = ids["<PAD>"] if ids["<PAD>"] is not None else self.eos_id
        self.added = {s: i for s, i in ids.items() if i is not None}

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])

    def save(self, path):
        self.tok.save(path)


def load_openflamingo_tokenizer(path, cfg):
    """The tokenizer named by config.json's `tokenizer_file` ("tokenizer.json" for MPT, "tokenizer.model" for
    LLaMA, with tokenizer_config.json's added tokens), or None when the folder has no such file."""
    fn = os.path.join(path, cfg.get("tokenizer_file", "tokenizer.json"))
    if not os.path.isfile(fn):
        return None
    return JsonTokenizer(fn) if fn.endswith(".json") else load_family_tokenizer(path, "llama")


# ---- Qwen-VL and UForm ----
# Two decoder-only families whose language models are Qwen's, read from their released folders (no remote code):
# - Qwen-VL (Qwen/Qwen-VL, model_type "qwen"): OpenCLIP ViT-bigG/14 at 448 px (no class token, a 16x16 position
#   table resized bicubically to the 32x32 patch grid) -> one cross-attention layer from 256 learned queries
#   (2-D sin-cos positions on queries and keys) -> ln_post, x @ proj -> Qwen-7B (RMSNorm, RoPE 1e4, SwiGLU with
#   `w2` as the gate, biases on the fused c_attn only). 256 image tokens, wrapped in the <img> </img> embeddings
#   as RoboVLMs does (258). Tokenizer: the tiktoken file qwen.tiktoken (QwenTiktoken below). The official folder
#   holds pickle .bin shards: convert once with `python backbones.py convert-qwen-vl SRC DST`.
# - UForm-Gen2 (unum-cloud/uform-gen2-qwen-500m, model_type "vlm"): ViT-H/14-like tower at 336 px (LayerScale, the
#   class token added after the positions, no pre-LN) -> a norm-first nn.TransformerDecoderLayer pooling the 577
#   tokens into 256 latents -> Linear to the LM width -> Qwen1.5-0.5B (Qwen2: RoPE 1e6, tied embeddings).
#   Tokenizer: Qwen1.5's tokenizer.json, copied into the folder (the UForm repo ships none).
# More in docs/backbones.md ("Qwen-VL and UForm-Gen2"); parity tests in tests/test_backbones_qwen.py.

_QWEN_7B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_attention_heads=32,
                num_hidden_layers=32, kv_channels=128, layer_norm_epsilon=1e-6, rotary_emb_base=10000.0,
                rotary_pct=1.0, tie_word_embeddings=False)
_QWEN_VL_VISUAL = dict(width=1664, layers=48, heads=16, mlp_ratio=4.9231, patch_size=14, image_size=448,
                       output_dim=4096, n_queries=256, image_start_id=151857)
_QWEN15_05B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-6, rope_theta=1e6,
                   tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
_UFORM_GEN2 = dict(image_encoder_hidden_size=1280, image_encoder_num_layers=32, image_encoder_num_heads=16,
                   image_encoder_patch_size=14, image_size=336, image_pooler_num_attn_heads=16,
                   image_pooler_intermediate_size=3200, num_image_latents=256)


def qwen_decoder(vocab, d, layers, heads, mlp_dim, eps, rope_theta, n_kv=None, tie=False):
    """Qwen-7B and Qwen2 (Qwen1.5): LLaMA-style blocks whose q/k/v projections have biases and nothing else has."""
    lm = DecoderLM(vocab, d, layers, heads, mlp_dim, "silu", "rms", eps, n_kv or heads, d // heads, bias=True,
                   gated=True, rope_theta=rope_theta, tie=tie)
    for blk in lm.layers:
        for lin in (blk.attn.o_proj, blk.mlp.gate, blk.mlp.fc1, blk.mlp.fc2):
            lin.register_parameter("bias", None)
    return lm


def sincos_2d(d, grid):
    """MAE's fixed 2-D sin-cos table (grid * grid, d) for row-major patches p = row * grid + col: the first d/2
    channels encode the column, the last d/2 the row, each as [sin | cos] of pos / 10000^(k / (d/4))."""
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))  # (d/4,)
    axis = torch.arange(grid, dtype=torch.float64)
    col, row = axis.repeat(grid), axis.repeat_interleave(grid)  # (grid * grid,)
    emb = [torch.cat([(p[:, None] * omega).sin(), (p[:, None] * omega).cos()], 1) for p in (col, row)]
    return torch.cat(emb, 1).float()


def resize_positions(table, n):
    """A square position table (g * g, C) -> (n, C) for a sqrt(n) grid: bicubic, align_corners=False, in fp32
    (Qwen-VL's get_abs_pos). Unchanged when the grids already agree."""
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(n)
    if src == tgt:
        return table
    t = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(n, -1).to(table.dtype)


def _check_pixels(x, size):
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
        raise ValueError(f"vision tower expects images (N, 3, {size}, {size}), got {tuple(x.shape)}: resize with "
                         f"data.resize_images(..., {size})")


class QwenAdapter(nn.Module):
    """Qwen-VL's `attn_pool`: one nn.MultiheadAttention (its in_proj split into q/k/v when loading) from
    ln_q(query) + pos to keys ln_kv(kv_proj x) + pos resized to the patch grid and values ln_kv(kv_proj x) (no
    position): (N, P, w) -> (N, Q, D). pos is the fixed sin-cos table, recomputed (the checkpoint's copy is unused)."""

    def __init__(self, width, d, heads, n_queries, eps=1e-6):
        super().__init__()
        self.grid = math.isqrt(n_queries)
        self.query = nn.Parameter(torch.randn(n_queries, d) * 0.02)
        self.kv_proj = nn.Linear(width, d, bias=False)
        self.attn = Attention(d, heads)
        self.ln_q, self.ln_kv = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)

    def forward(self, x):
        N, P, _ = x.shape
        kv = self.ln_kv(self.kv_proj(x))  # (N, P, D)
        pos = sincos_2d(kv.shape[-1], self.grid).to(kv.device, kv.dtype)  # (Q, D)
        a = self.attn
        q = a.q_proj(self.ln_q(self.query) + pos).expand(N, -1, -1)  # (N, Q, D)
        k, v = a.k_proj(kv + resize_positions(pos, P)), a.v_proj(kv)  # (N, P, D)
        q, k, v = (t.reshape(N, t.shape[1], a.n_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        return a.o_proj(attend(q, k, v).transpose(1, 2).reshape(N, q.shape[2], -1))


class QwenVisual(nn.Module):
    """Qwen-VL's `transformer.visual`: (N, 3, S, S) -> (N, n_queries, output_dim). Bias-free patch conv, no class
    token, ln_pre, pre-LN blocks (exact GELU, LN eps 1e-6), the adapter, ln_post, x @ proj (stored (in, out))."""

    def __init__(self, width, layers, heads, mlp_ratio, patch_size, image_size, output_dim, n_queries, **_):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(n_queries, width) * width ** -0.5)  # 16 x 16 grid
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.layers = nn.ModuleList(FamilyBlock(width, heads, int(width * mlp_ratio), "gelu", "ln", 1e-6)
                                    for _ in range(layers))
        self.attn_pool = QwenAdapter(width, output_dim, max(output_dim // 128, 1), n_queries)  # 4096 -> 32 heads
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(output_dim, output_dim) * output_dim ** -0.5)

    def forward(self, x):
        _check_pixels(x, self.image_size)
        h = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, w), P = 32 x 32
        h = self.ln_pre(h + resize_positions(self.positional_embedding, h.shape[1]))
        for blk in self.layers:
            h, _ = blk(h)
        return self.ln_post(self.attn_pool(h)) @ self.proj  # (N, Q, D)


class LayerScaleBlock(FamilyBlock):
    """FamilyBlock with LayerScale (CaiT): x + ls1 * attn(norm1 x), then x + ls2 * mlp(norm2 x) (UForm's ViT)."""

    def __init__(self, d, heads, mlp_dim, act, eps):
        super().__init__(d, heads, mlp_dim, act, "ln", eps)
        self.ls1, self.ls2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))

    def forward(self, x, rope=None, cache=None, mask=None, causal=False):
        h, cache = self.attn(self.norm1(x), rope, cache, mask, causal)
        x = x + self.ls1 * h
        return x + self.ls2 * self.mlp(self.norm2(x)), cache


class UFormViT(nn.Module):
    """UForm's image encoder (forward_features): patch conv with bias, + pos_embed, then the class token prepended
    (it gets no position), LayerScale blocks (exact GELU, eps 1e-6), final norm: (N, 3, S, S) -> (N, 1 + P, w)."""

    def __init__(self, width, layers, heads, patch, image_size):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, width) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.layers = nn.ModuleList(LayerScaleBlock(width, heads, 4 * width, "gelu", 1e-6) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        _check_pixels(x, self.image_size)
        h = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1)
        for blk in self.layers:
            h, _ = blk(h)
        return self.norm(h)


class UFormPooler(nn.Module):
    """UForm-Gen2's image pooler: nn.TransformerDecoderLayer(norm_first=True, activation=silu) with the learned
    `image_latents` as target and the ViT tokens as memory, then `projection` to the LM width (pool, then project):
    (N, 1 + P, w) -> (N, n_latents, d). Dropout (0.1 in the official layer) is not applied."""

    def __init__(self, width, d, heads, mlp_dim, n_latents):
        super().__init__()
        self.image_latents = nn.Parameter(torch.randn(1, n_latents, width) * 0.02)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(width, heads), Attention(width, heads)
        self.mlp = FeedForward(width, mlp_dim, "silu")
        self.projection = nn.Linear(width, d)

    def forward(self, feats):
        x = self.image_latents.to(feats.dtype).expand(len(feats), -1, -1)
        x = x + self.self_attn(self.norm1(x))[0]
        x = x + self.cross_attn(self.norm2(x), kv=feats)[0]  # the memory is not normalized (norm_first layer)
        return self.projection(x + self.mlp(self.norm3(x)))


# Checkpoint names -> ours. "{qkv}": a fused [Q; K; V] projection split in three; "{qkv/head}": Qwen-VL's ViT
# in_proj, rows per head [q_h; k_h; v_h] (Megatron layout); "" = unused (recomputed rotary / sin-cos tables).
_QWEN_RENAMES = [
    (r".*\.rotary_emb\.inv_freq$|^transformer\.visual\.attn_pool\.pos_embed$|^image_encoder\.embedding_projection\..*",
     ""),
    (r"^transformer\.visual\.transformer\.resblocks\.", "vision.layers."), (r"^transformer\.visual\.", "vision."),
    (r"^transformer\.h\.", "lm.layers."), (r"^transformer\.wte\.", "lm.embed_tokens."),
    (r"^transformer\.ln_f\.", "lm.norm."), (r"^lm_head\.", "lm.lm_head."),
    (r"\.ln_1\.", ".norm1."), (r"\.ln_2\.", ".norm2."), (r"\.mlp\.(c_fc|w1|hidden_layer)\.", ".mlp.fc1."),
    (r"\.mlp\.w2\.", ".mlp.gate."), (r"\.mlp\.(c_proj|output_layer)\.", ".mlp.fc2."),
    (r"\.attn\.(c_proj|out_proj|out)\.", ".attn.o_proj."),
    (r"\.attn\.(c_attn\.|in_proj_)(weight|bias)$", r".attn.{qkv}_proj.\2"),
    (r"\.attn\.in_proj\.(weight|bias)$", r".attn.{qkv/head}_proj.\1"),
    # UForm
    (r"^image_encoder\.blocks\.", "vision.layers."), (r"^image_encoder\.", "vision."),
    (r"\.attn\.(query|key|value)\.", lambda m: f".attn.{m.group(1)[0]}_proj."), (r"\.(ls[12])\.(gamma|weight)$", r".\1"),
    (r"^image_pooler\.pooler\.multihead_attn\.", "projector.cross_attn."), (r"^image_pooler\.pooler\.", "projector."),
    (r"^image_pooler\.", "projector."), (r"^(projector\.\w+)\.in_proj_(weight|bias)$", r"\1.{qkv}_proj.\2"),
    (r"^(projector\.\w+)\.out_proj\.", r"\1.o_proj."),
    (r"^projector\.linear([12])\.", r"projector.mlp.fc\1."), (r"^text_decoder\.", "language_model."),
]


class QwenFamilyVLM(PretrainedVLM):
    """Qwen-VL ("qwen") or UForm-Gen2 ("vlm") behind the backbone interface; everything after construction
    (encode_images, forward, the resampler option, trainable_groups) is PretrainedVLM's."""

    TYPES = ("qwen", "vlm")

    def __init__(self, cfg):
        nn.Module.__init__(self)  # PretrainedVLM.__init__ builds the other families
        self.family, self.config, self.tokenizer, self.resampler = cfg.get("model_type"), cfg, None, None
        self.image_token_id, self.pad_token_id, self.image_mean, self.image_std = None, None, CLIP_MEAN, CLIP_STD
        if self.family == "qwen":
            c, v = {**_QWEN_7B, **cfg}, {**_QWEN_VL_VISUAL, **(cfg.get("visual") or {})}
            if c["rotary_pct"] != 1.0 or c["hidden_size"] != c["num_attention_heads"] * c["kv_channels"]:
                raise ValueError(f"Qwen with rotary_pct={c['rotary_pct']}, kv_channels={c['kv_channels']} is not "
                                 f"supported: Qwen-VL rotates full heads of hidden_size / num_attention_heads")
            self.vision, self.projector = QwenVisual(**v), nn.Identity()
            self.lm = qwen_decoder(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"],
                                   c["num_attention_heads"], c["intermediate_size"] // 2, c["layer_norm_epsilon"],
                                   c["rotary_emb_base"], tie=c["tie_word_embeddings"])
            self.image_boundary = (v["image_start_id"], v["image_start_id"] + 1)  # <img>, </img> (RoboVLMs)
            self.image_size, self.n_image_tokens, self.tokenizer_filename = v["image_size"], v["n_queries"] + 2, \
                "qwen.tiktoken"
            self.max_positions = c.get("max_position_embeddings") or 8192  # Qwen-7B's config (Policy.act checks it)
        elif self.family == "vlm":
            c, t = {**_UFORM_GEN2, **cfg}, {**_QWEN15_05B, **(cfg.get("text_config") or {})}
            if t["use_sliding_window"] or t.get("rope_scaling") or t["hidden_act"] != "silu":
                raise ValueError("UForm's Qwen2 decoder with sliding-window attention, rope_scaling or a non-SiLU MLP "
                                 "is not supported (Qwen1.5-0.5B uses none of them)")
            w = c["image_encoder_hidden_size"]
            self.vision = UFormViT(w, c["image_encoder_num_layers"], c["image_encoder_num_heads"],
                                   c["image_encoder_patch_size"], c["image_size"])
            self.projector = UFormPooler(w, t["hidden_size"], c["image_pooler_num_attn_heads"],
                                         c["image_pooler_intermediate_size"], c["num_image_latents"])
            self.lm = qwen_decoder(t["vocab_size"], t["hidden_size"], t["num_hidden_layers"],
                                   t["num_attention_heads"], t["intermediate_size"], t["rms_norm_eps"],
                                   t["rope_theta"], t["num_key_value_heads"], t["tie_word_embeddings"])
            self.image_boundary, self.image_size, self.n_image_tokens = None, c["image_size"], c["num_image_latents"]
            self.tie_stated = "tie_word_embeddings" in (cfg.get("text_config") or {})
            self.max_positions = t.get("max_position_embeddings") or 32768  # Qwen1.5's context
            self.tokenizer_filename = "tokenizer.json"
        else:
            raise ValueError(f"model_type {self.family!r} is not a Qwen family: expected one of {self.TYPES}")
        attn = self.lm.layers[0].attn
        self.hidden_size, self.vocab_size = self.lm.embed_tokens.weight.shape[1], self.lm.embed_tokens.weight.shape[0]
        self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = len(self.lm.layers), attn.n_heads, attn.n_kv, \
            attn.head_dim

    def prompt(self, instruction):
        return instruction  # RoboVLMs: the raw instruction (for UForm "<image> " first, where it puts the images)

    def _encode_family(self, x):
        return self.projector(self.vision(x))  # Qwen-VL: projector is the identity (the adapter is in vision)

    def key_to_ours(self, key):
        """Checkpoint key -> [(our parameter, chunk, n_chunks[, heads of a per-head layout])], [] if unused."""
        if key == "text_decoder.lm_head.weight" and not self.tie_stated:
            raise ValueError("the checkpoint stores text_decoder.lm_head.weight but config.json does not say whether "
                             "the LM head is tied (Qwen1.5-0.5B ties it to the embeddings): add \"text_config\": "
                             "{\"tie_word_embeddings\": false} to use the stored head (true ignores it)")
        for pattern, repl in _QWEN_RENAMES:
            key = re.sub(pattern, repl, key)
        if key.startswith("language_model."):
            key = checkpoint_key_to_ours(key)
        if "{qkv/head}" in key:
            heads = self.vision.layers[0].attn.n_heads
            return [(key.replace("{qkv/head}", c), i, 3, heads) for i, c in enumerate("qkv")]
        return [(key.replace("{qkv}", c), i, 3) for i, c in enumerate("qkv")] if "{qkv}" in key else \
            [(key, 0, 1)] if key else []

    def load_tokenizer(self, path):
        fn = os.path.join(path, self.tokenizer_filename)
        if not os.path.isfile(fn):
            hint = "the qwen.tiktoken of Qwen/Qwen-VL" if self.family == "qwen" else \
                "tokenizer.json (+ tokenizer_config.json) of Qwen/Qwen1.5-0.5B-Chat (the UForm repo has none)"
            raise FileNotFoundError(f"{fn} not found: copy {hint} into {path}")
        if self.family == "qwen":
            return QwenTiktoken(fn)
        tok = JsonTokenizer(fn)
        tok.bos_id = None  # Qwen2's tokenizer adds no BOS; <|endoftext|> is EOS and padding
        return tok


# Qwen's tiktoken pre-tokenizer (tokenization_qwen.py PAT_STR; single digits) and Qwen-VL's special tokens, numbered
# after the mergeable ranks (151643 ...): <|endoftext|> <|im_start|> <|im_end|> <|extra_0..204|> <ref> ... <imgpad>.
_QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
             r"""\s+(?!\S)|\s+""")
QWEN_VL_SPECIAL_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
                          + ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"])


class QwenTiktoken:
    """Reader of a tiktoken BPE file (qwen.tiktoken: one `base64(token bytes) rank` per line) behind the tokenizer
    interface: NFC-normalize, split out special tokens, pre-tokenize with Qwen's regex (the `regex` package, an
    open_clip dependency, for \\p{L}/\\p{N}), then per piece byte-level BPE: repeatedly merge the adjacent pair whose
    concatenation has the lowest rank (tiktoken's rule). No BOS; <|endoftext|> is EOS and padding."""

    def __init__(self, fn, specials=QWEN_VL_SPECIAL_TOKENS):
        import regex
        ranks = {}
        with open(fn, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{fn} line {n}: expected '<base64 token> <rank>' (a tiktoken BPE file such as "
                                     f"Qwen-VL's qwen.tiktoken), found {line[:60]!r}") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{fn}: ranks must be 0..{len(ranks) - 1}, each once (the file is damaged)")
        self.ranks, self.by_id = ranks, {r: b for b, r in ranks.items()}
        self.added = {s: len(ranks) + i for i, s in enumerate(specials)}
        self._id_to_added = {i: s for s, i in self.added.items()}
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id, self.eos_id = None, self.added.get("<|endoftext|>")
        self.pad_id, self.special_ids = self.eos_id, set(self._id_to_added)
        self._pat = regex.compile(_QWEN_PAT)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
        self._cache = {}

    def _bpe(self, piece):
        ids = self._cache.get(piece)
        if ids is None:
            parts = [piece[i:i + 1] for i in range(len(piece))]
            while len(parts) > 1:
                pair_ranks = [self.ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
                i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)  # leftmost lowest rank
                if pair_ranks[i] == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids = self._cache[piece] = [self.ranks[p] for p in parts]
        return ids

    def encode(self, text):
        import unicodedata
        ids = []
        for part in self._split.split(unicodedata.normalize("NFC", text)):
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                for m in self._pat.finditer(part):
                    ids += self._bpe(m.group().encode("utf-8"))
        return ids

    def decode(self, ids):
        out = b"".join(self.by_id[i] for i in (int(i) for i in ids) if i not in self.special_ids)
        return out.decode("utf-8", errors="replace")  # special tokens skipped, like FamilyTokenizer

    def save(self, path):
        with open(path, "wb") as f:
            f.writelines(base64.b64encode(self.by_id[i]) + b" %d\n" % i for i in range(len(self.by_id)))


def tiny_qwen_config(family, image_size=64, vocab_size=778, patch=16):
    """tiny_family_config's Qwen-VL / UForm configs (released layout and names, toy sizes)."""
    if family == "qwen":  # <img> </img> at the last reserved ids (ActionTokenizer leaves the top 10 free)
        return dict(model_type="qwen", vocab_size=vocab_size, hidden_size=128, intermediate_size=512,
                    num_attention_heads=4, num_hidden_layers=4, kv_channels=32,
                    visual=dict(width=64, layers=2, heads=4, mlp_ratio=2.0, patch_size=patch, image_size=image_size,
                                output_dim=128, n_queries=4, image_start_id=vocab_size - 10))
    return dict(model_type="vlm", image_encoder_hidden_size=64, image_encoder_num_layers=2, image_encoder_num_heads=4,
                image_encoder_patch_size=patch, image_size=image_size, image_pooler_num_attn_heads=4,
                image_pooler_intermediate_size=128, num_image_latents=8,
                text_config=dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2))


def convert_qwen_vl(src, dst):
    """One-time conversion of the official Qwen-VL folder (pickle pytorch_model*.bin, bf16) to safetensors shards +
    model.safetensors.index.json in dst, with its small files (config.json, qwen.tiktoken, ...) copied. Tensors are
    read with torch.load(weights_only=True): only tensors and plain containers are unpickled, never code."""
    import shutil
    from safetensors.torch import save_file
    index = os.path.join(src, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(src, "pytorch_model.bin")):
        shards = ["pytorch_model.bin"]
    else:
        raise FileNotFoundError(f"no pytorch_model.bin.index.json or pytorch_model.bin in {src}: expected the "
                                f"Qwen/Qwen-VL download")
    os.makedirs(dst, exist_ok=True)
    weight_map = {}
    for fn in shards:
        sd = torch.load(os.path.join(src, fn), map_location="cpu", weights_only=True, mmap=True)
        out = fn.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(dst, out), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, out))
        del sd
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)) and not name.startswith("pytorch_model") \
                and not name.endswith(".py"):  # the remote code is never run
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "convert-qwen-vl":
        sys.exit("usage: python backbones.py convert-qwen-vl QWEN_VL_FOLDER OUT_FOLDER   (pickle .bin -> safetensors)")
    print(convert_qwen_vl(sys.argv[2], sys.argv[3]))
