"""Qwen-VL and UForm-Gen2 (backbones.py, section "Qwen-VL and UForm"): parity with code we did not write.

Each family is written to a tiny folder in its released layout and key names (Qwen-VL: pickle .bin shards,
converted once with backbones.convert_qwen_vl; UForm: two safetensors shards + index), loaded with
backbones.load_vlm, and compared part by part in fp32 with the oracles:
- Qwen-VL ViT blocks: open_clip's Transformer (its [Q; K; V] in_proj permuted to Qwen's per-head rows);
  adapter: torch.nn.MultiheadAttention with MAE's sin-cos table (numpy, re-stated here); the Qwen-7B decoder:
  transformers' Qwen2ForCausalLM with Qwen-7B's settings (MHA, RoPE 1e4, untied head), weights fused into c_attn.
- UForm ViT: timm's VisionTransformer (class token without position, LayerScale, no pre-norm);
  pooler: torch.nn.TransformerDecoderLayer(norm_first, SiLU); Qwen1.5 decoder: Qwen2ForCausalLM.
- The tiktoken reader: against the `tokenizers` BPE whose ranks it reads.
Run with -s to print the per-part figures.
"""

import base64
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones

transformers = pytest.importorskip(
    "transformers", reason="transformers is the numerical oracle for the pretrained backbones; "
                           "install it with `pip install -r requirements-dev.txt`")
tk = pytest.importorskip("tokenizers", reason="the tokenizer oracle and UForm's tokenizer.json need `tokenizers`")

LINES = ["open the drawer", "Pick up the red block and place it in the drawer.", "turn on the light bulb",
         "push the blue block to the left", "rotate the pink block 90 degrees", "What's 12 + 345? It's 357!",
         "Ünïcödé façade — naïve café, 東京 タワー, emoji 🤖\n\nnew line\ttab  spaces   ",
         "I'll've they're we'd"]
TEXTS = LINES + ["  leading spaces", "trailing\n", "a\r\nb", "x<|endoftext|>y<img>z</img>", "3.14159 + 2e10",
                 "don't DON'T", "\u0041\u030a ring (NFC: \u00c5)", "   ", "unseen wordsxyz qqq",
                 "balll belll seee dooor thethethe", "a\n\n\nb"]  # equal-rank pairs ("\n\n"): the leftmost merges
QWEN_SPECIALS = backbones.QWEN_VL_SPECIAL_TOKENS


def byte_to_unicode():
    """GPT-2's byte -> printable character table (how byte-level BPE files spell raw bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained by `tokenizers` with Qwen's pre-tokenizer (NFC, Qwen's regex, byte level), its ranks
    exported as a tiktoken file, and a tokenizer.json (Qwen2 layout: <|endoftext|> ... appended) for UForm."""
    d = tmp_path_factory.mktemp("bpe")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(backbones._QWEN_PAT), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(LINES * 3, tk.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    n = tok.get_vocab_size()
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    ranks = {bytes(to_byte[c] for c in s): i for s, i in tok.get_vocab().items()}
    with open(d / "qwen.tiktoken", "wb") as f:
        for b, i in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(b) + b" %d\n" % i)
    tok.add_special_tokens(QWEN_SPECIALS)  # ids n, n + 1, ... in Qwen's order
    tok.save(str(d / "tokenizer.json"))
    return tok, d, n


def test_tiktoken_reader_matches_tokenizers(bpe, tmp_path):
    ref, d, n = bpe
    ours = backbones.QwenTiktoken(str(d / "qwen.tiktoken"))
    assert ours.vocab_size == n + len(QWEN_SPECIALS) and ours.bos_id is None
    assert ours.eos_id == ours.pad_id == n and ours.added["<img>"] == n + QWEN_SPECIALS.index("<img>")
    for text in TEXTS + random_texts(200):
        expected = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        plain = text.replace("<|endoftext|>", "").replace("<img>", "").replace("</img>", "")
        assert ours.decode(ours.encode(plain)) == ref.decode(ref.encode(plain).ids)
    assert len(ours.encode("Pick up the red block")) < len("Pick up the red block".encode())  # merges happen
    ours.save(tmp_path / "again.tiktoken")
    assert (tmp_path / "again.tiktoken").read_bytes() == (d / "qwen.tiktoken").read_bytes()
    (tmp_path / "bad.tiktoken").write_bytes(b"IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"line 2: expected '<base64 token> <rank>'"):
        backbones.QwenTiktoken(str(tmp_path / "bad.tiktoken"))
    (tmp_path / "gap.tiktoken").write_bytes(b"IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match=r"ranks must be 0\.\.1"):
        backbones.QwenTiktoken(str(tmp_path / "gap.tiktoken"))


def random_texts(n, seed=0):
    import random
    rng = random.Random(seed)
    chars = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,;:!?'\"-\n\r\t") + list("éüñßçø東京タワー🤖—")
    return ["".join(rng.choice(chars) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_tiktoken_reader_matches_tiktoken(bpe):
    """The same rank file through OpenAI's tiktoken (Qwen's own tokenizer code wraps it)."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (requirements-dev.txt) is the oracle of QwenTiktoken")
    import unicodedata
    _, d, n = bpe
    ours = backbones.QwenTiktoken(str(d / "qwen.tiktoken"))
    enc = tiktoken.Encoding("qwen-test", pat_str=backbones._QWEN_PAT, mergeable_ranks=ours.ranks,
                            special_tokens={s: n + i for i, s in enumerate(QWEN_SPECIALS)})
    for text in TEXTS + random_texts(500):  # Qwen's tokenizer NFC-normalizes, then encodes with all specials allowed
        assert ours.encode(text) == enc.encode(unicodedata.normalize("NFC", text), allowed_special="all"), text


# ---- helpers ----

def perturb(module, seed, scale=0.05):
    """Move every weight off its init (norm weights off 1, biases off 0) so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def qwen2_oracle(seed, vocab, **kw):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**dict(vocab_size=vocab, max_position_embeddings=512), **kw})
    return perturb(transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager").eval(), seed)


def mae_sincos(d, grid):
    """MAE's get_2d_sincos_pos_embed (util/pos_embed.py), re-stated in numpy: meshgrid with w first."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)
    return torch.from_numpy(np.concatenate([one_d(d // 2, g[0]), one_d(d // 2, g[1])], 1)).float()


def bicubic(table, n):  # Qwen-VL's get_abs_pos: (L, C) -> (n, C)
    s, t = int(table.shape[0] ** 0.5), int(n ** 0.5)
    x = F.interpolate(table.float().reshape(1, s, s, -1).permute(0, 3, 1, 2), size=(t, t), mode="bicubic",
                      align_corners=False)
    return x.permute(0, 2, 3, 1).flatten(0, 2)


def lm_parity(vlm, oracle, vocab, seed, T=12):
    """Max |logit diff| of our LM vs the transformers oracle on the same input embeddings (batch 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    with torch.no_grad():
        x = vlm.embed_tokens(ids)
        ref = oracle(inputs_embeds=x).logits
        ours = vlm.lm_logits(vlm(x, torch.arange(T).expand(2, -1))[0])
    assert ref.abs().max() > 0.1
    return (ours - ref).abs().max().item()


# ---- Qwen-VL: a tiny folder in the official layout (pickle .bin shards), converted once, then loaded ----

QV = dict(width=32, layers=2, heads=4, mlp_ratio=2.5, patch_size=8, image_size=64, output_dim=256, n_queries=16)
QV_LM = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def qwen_vl(bpe, tmp_path_factory):
    """-> (folder, oracles dict). Vision blocks from open_clip, adapter attention = nn.MultiheadAttention,
    LM = Qwen2ForCausalLM; the other visual tensors random."""
    import open_clip
    _, bpe_dir, n = bpe
    vocab = n + len(QWEN_SPECIALS) + 3  # embedding rows padded past the tokenizer, as 151936 > 151860
    w, D, h = QV["width"], QV["output_dim"], QV["heads"]
    torch.manual_seed(0)
    blocks = perturb(open_clip.transformer.Transformer(w, QV["layers"], h, QV["mlp_ratio"], act_layer=nn.GELU,
                                                       norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval(), 1)
    mha = perturb(nn.MultiheadAttention(D, D // 128).eval(), 2)
    lm = qwen2_oracle(3, vocab, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, **QV_LM)
    g = torch.Generator().manual_seed(4)
    rnd = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"transformer.visual.conv1.weight": rnd(w, 3, 8, 8), "transformer.visual.positional_embedding": rnd(16, w),
          "transformer.visual.ln_pre.weight": 1 + rnd(w), "transformer.visual.ln_pre.bias": rnd(w),
          "transformer.visual.attn_pool.query": rnd(16, D), "transformer.visual.attn_pool.pos_embed": mae_sincos(D, 4),
          "transformer.visual.attn_pool.kv_proj.weight": rnd(D, w) / 3,
          "transformer.visual.ln_post.weight": 1 + rnd(D), "transformer.visual.ln_post.bias": rnd(D),
          "transformer.visual.proj": rnd(D, D) / 3}
    for ln in ("ln_q", "ln_kv"):
        sd.update({f"transformer.visual.attn_pool.{ln}.weight": 1 + rnd(D),
                   f"transformer.visual.attn_pool.{ln}.bias": rnd(D)})
    sd.update({"transformer.visual.attn_pool.attn." + k: v for k, v in mha.state_dict().items()})
    for k, v in blocks.state_dict().items():  # open_clip [Q; K; V] rows -> Qwen's per-head [q_h; k_h; v_h]
        k = "transformer.visual.transformer." + k
        if ".attn.in_proj_" in k:
            v = v.view(3, h, w // h, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
            k = k.replace(".attn.in_proj_", ".attn.in_proj.")
        sd[k] = v
    hf = lm.state_dict()
    sd.update({"transformer.wte.weight": hf["model.embed_tokens.weight"], "transformer.ln_f.weight":
               hf["model.norm.weight"], "lm_head.weight": hf["lm_head.weight"]})
    for i in range(QV_LM["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        for s in ("weight", "bias"):
            sd[b + "attn.c_attn." + s] = torch.cat([hf[a + f"self_attn.{c}_proj.{s}"] for c in "qkv"])
        sd.update({b + "attn.c_proj.weight": hf[a + "self_attn.o_proj.weight"], b + "ln_1.weight":
                   hf[a + "input_layernorm.weight"], b + "ln_2.weight": hf[a + "post_attention_layernorm.weight"],
                   b + "mlp.w1.weight": hf[a + "mlp.up_proj.weight"],
                   b + "mlp.w2.weight": hf[a + "mlp.gate_proj.weight"],
                   b + "mlp.c_proj.weight": hf[a + "mlp.down_proj.weight"]})
    sd["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(32)  # a buffer some exports keep: ignored
    sd = {k: v.detach().clone().to(torch.bfloat16 if k.startswith("transformer.h.1.") else torch.float32)
          for k, v in sd.items()}  # official shards are bf16; one layer kept in bf16 checks the upcast
    for k, v in lm.model.layers[1].state_dict().items():
        v.copy_(v.to(torch.bfloat16).float())
    src = tmp_path_factory.mktemp("qwen_vl_official")
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for fn, ks in halves.items():
        torch.save({k: sd[k] for k in ks}, src / fn)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: fn for fn, ks in halves.items() for k in ks}}))
    (src / "modeling_qwen.py").write_text("raise SystemExit('remote code must never run')\n")
    (src / "config.json").write_text(json.dumps(dict(
        architectures=["QWenLMHeadModel"], model_type="qwen", vocab_size=vocab, hidden_size=QV_LM["hidden_size"],
        intermediate_size=2 * QV_LM["intermediate_size"], num_attention_heads=4, num_hidden_layers=2,
        kv_channels=64, layer_norm_epsilon=1e-6, rotary_emb_base=10000, rotary_pct=1.0, seq_length=2048,
        no_bias=True, tie_word_embeddings=False, use_dynamic_ntk=True, use_logn_attn=True,
        visual=dict(QV, image_start_id=n + QWEN_SPECIALS.index("<img>")))))
    (src / "qwen.tiktoken").write_bytes((bpe_dir / "qwen.tiktoken").read_bytes())
    folder = backbones.convert_qwen_vl(str(src), str(tmp_path_factory.mktemp("qwen_vl") / "Qwen-VL"))
    return folder, dict(blocks=blocks, mha=mha, lm=lm, sd=sd, vocab=vocab)


def qwen_visual_reference(o, px):
    """Qwen-VL's VisionTransformer.forward (visual.py) on the oracle modules: -> (ViT tokens, adapter out, final)."""
    sd = {k[len("transformer.visual."):]: v.float() for k, v in o["sd"].items() if k.startswith("transformer.visual.")}
    x = F.conv2d(px, sd["conv1.weight"], stride=8).flatten(2).transpose(1, 2)  # (N, 64, w)
    x = F.layer_norm(x + bicubic(sd["positional_embedding"], x.shape[1]), (x.shape[-1],), sd["ln_pre.weight"],
                     sd["ln_pre.bias"], 1e-6)
    tokens = o["blocks"](x)  # open_clip, batch first
    adapter = qwen_adapter_reference(o, sd, tokens)
    D = adapter.shape[-1]
    return tokens, adapter, F.layer_norm(adapter, (D,), sd["ln_post.weight"], sd["ln_post.bias"], 1e-6) @ sd["proj"]


def qwen_adapter_reference(o, sd, x):  # Resampler.forward: seq-first nn.MultiheadAttention
    D = sd["attn_pool.query"].shape[1]
    ln = lambda t, n: F.layer_norm(t, (D,), sd[f"attn_pool.{n}.weight"], sd[f"attn_pool.{n}.bias"], 1e-6)  # noqa
    kv = ln(x @ sd["attn_pool.kv_proj.weight"].t(), "ln_kv").permute(1, 0, 2)  # (P, N, D)
    pos = mae_sincos(D, 4)
    q = (ln(sd["attn_pool.query"], "ln_q") + pos)[:, None].expand(-1, x.shape[0], -1)
    out = o["mha"](q, kv + bicubic(pos, x.shape[1])[:, None], kv, need_weights=False)[0]
    return out.permute(1, 0, 2)


def test_qwen_vl_matches_open_clip_mha_and_qwen2(qwen_vl):
    folder, o = qwen_vl
    vlm = backbones.load_vlm(folder)
    assert vlm.family == "qwen" and vlm.n_image_tokens == 16 + 2 and vlm.tokenizer_filename == "qwen.tiktoken"
    assert not any(f.endswith((".bin", ".py")) for f in os.listdir(folder))
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens, adapter, final = qwen_visual_reference(o, px)
        v = vlm.vision
        ours_tokens = v.ln_pre(v.conv1(px).flatten(2).transpose(1, 2) + backbones.resize_positions(
            v.positional_embedding, 64))
        for blk in v.layers:
            ours_tokens = blk(ours_tokens)[0]
        d_vit = (ours_tokens - tokens).abs().max().item()
        d_adapter = (v.attn_pool(tokens) - adapter).abs().max().item()  # same input: the adapter alone
        img = vlm.encode_images(px)  # (2, 1 + 16 + 1, 256): <img> 16 tokens </img>
        d_visual = (img[:, 1:-1] - final).abs().max().item()
        ends = vlm.embed_tokens(torch.tensor(list(vlm.image_boundary)))
    assert torch.equal(img[:, 0], ends[0].expand(2, -1)) and torch.equal(img[:, -1], ends[1].expand(2, -1))
    d_lm = lm_parity(vlm, o["lm"], o["vocab"], seed=6)
    print(f"\nQwen-VL parity (fp32, max |diff|): ViT blocks vs open_clip {d_vit:.2e} (|ref| max "
          f"{tokens.abs().max():.2f}); adapter vs nn.MultiheadAttention {d_adapter:.2e}; whole visual {d_visual:.2e} "
          f"(|ref| max {final.abs().max():.2f}); Qwen-7B logits vs Qwen2ForCausalLM {d_lm:.2e}")
    assert d_vit < 1e-5 and d_adapter < 1e-5 and d_visual < 1e-5 and d_lm < 1e-5


def test_sincos_table_matches_mae():
    for d, grid in ((256, 4), (64, 16), (4096, 16)):
        assert (backbones.sincos_2d(d, grid) - mae_sincos(d, grid)).abs().max() < 1e-5


# ---- UForm-Gen2: a tiny folder in the released layout (two safetensors shards + index, Qwen2 tokenizer.json) ----

UF = dict(image_encoder_hidden_size=64, image_encoder_num_layers=2, image_encoder_num_heads=4,
          image_encoder_patch_size=8, image_size=32, image_pooler_num_attn_heads=4,
          image_pooler_intermediate_size=96, num_image_latents=8)
UF_LM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def uform(bpe, tmp_path_factory):
    import timm
    from safetensors.torch import save_file
    tok, bpe_dir, n = bpe
    vocab = tok.get_vocab_size() + 3
    w = UF["image_encoder_hidden_size"]
    torch.manual_seed(10)
    vit = perturb(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=w, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=0, global_pool="",
        class_token=True, no_embed_class=True, init_values=0.5, pre_norm=False, act_layer=nn.GELU,
        norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval(), 11)
    pooler = perturb(nn.TransformerDecoderLayer(w, 4, 96, dropout=0.0, activation=F.silu, batch_first=True,
                                                norm_first=True).eval(), 12)
    latents, proj = 0.5 * torch.randn(1, 8, w), perturb(nn.Linear(w, UF_LM["hidden_size"]), 13)
    lm = qwen2_oracle(14, vocab, **UF_LM)
    sd = {"image_pooler.image_latents": latents, "image_pooler.projection.weight": proj.weight,
          "image_pooler.projection.bias": proj.bias, "image_encoder.embedding_projection.weight": torch.ones(4, w)}
    sd.update({"image_pooler.pooler." + k: v for k, v in pooler.state_dict().items()})
    sd.update({"text_decoder." + k: v for k, v in lm.state_dict().items()})  # incl. the tied lm_head copy
    names = {"patch_embed.proj.": "patch_embed.", ".attn.proj.": ".attn.out.", ".mlp.fc1.": ".mlp.hidden_layer.",
             ".mlp.fc2.": ".mlp.output_layer."}
    for k, v in vit.state_dict().items():
        for a, b in names.items():
            k = k.replace(a, b)
        if ".attn.qkv." in k:  # timm fuses q/k/v; UForm's encoder has separate query/key/value linears
            for part, name in zip(v.chunk(3), ("query", "key", "value")):
                sd["image_encoder." + k.replace(".qkv.", f".{name}.")] = part
        else:
            sd["image_encoder." + k] = v
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    folder = tmp_path_factory.mktemp("uform") / "uform-gen2-qwen-500m"
    folder.mkdir()
    first = [k for k in sorted(sd) if not k.startswith("text_decoder.model.layers.1.")]
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [k for k in sd if k not in first]}
    for fn, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / fn), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}))
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["VLMForCausalLM"], model_type="vlm", image_encoder_pooling="cls", image_token_id=151646,
        text_decoder_name_or_path="Qwen/Qwen1.5-0.5B-Chat", **UF,
        text_config=dict(UF_LM, vocab_size=vocab, model_type="qwen2"))))
    (folder / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    return folder, dict(vit=vit, pooler=pooler, latents=latents, proj=proj, lm=lm, vocab=vocab, tok=tok)


def test_uform_matches_timm_transformer_decoder_layer_and_qwen2(uform):
    folder, o = uform
    vlm = backbones.load_vlm(str(folder))
    assert vlm.family == "vlm" and vlm.n_image_tokens == 8 and vlm.lm.tie
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        feats = o["vit"].forward_features(px)  # (2, 1 + 16, 64): CLS first, final norm
        d_vit = (vlm.vision(px) - feats).abs().max().item()
        pooled = o["proj"](o["pooler"](o["latents"].expand(2, -1, -1), feats))
        d_pool = (vlm.projector(feats) - pooled).abs().max().item()
        d_img = (vlm.encode_images(px) - pooled).abs().max().item()
    d_lm = lm_parity(vlm, o["lm"], o["vocab"], seed=16)
    print(f"\nUForm parity (fp32, max |diff|): ViT vs timm {d_vit:.2e} (|ref| max {feats.abs().max():.2f}); "
          f"pooler+projection vs nn.TransformerDecoderLayer {d_pool:.2e}; encode_images {d_img:.2e} "
          f"(|ref| max {pooled.abs().max():.2f}); Qwen1.5 logits vs Qwen2ForCausalLM {d_lm:.2e}")
    assert d_vit < 1e-5 and d_pool < 1e-5 and d_img < 1e-5 and d_lm < 1e-5
    tok = vlm.tokenizer  # Qwen2's tokenizer.json: no BOS, <|endoftext|> ends and pads
    assert tok.bos_id is None and tok.eos_id == tok.pad_id == o["tok"].token_to_id("<|endoftext|>")
    assert tok.encode("open the drawer") == o["tok"].encode("open the drawer", add_special_tokens=False).ids


@pytest.mark.parametrize("family", ["qwen_vl", "uform"])
def test_kv_cache_and_bad_folders(family, request, tmp_path):
    folder, _ = request.getfixturevalue(family)
    vlm = backbones.load_vlm(str(folder))
    x = torch.cat([vlm.encode_images(torch.randn(1, 3, vlm.image_size, vlm.image_size)),
                   vlm.embed_tokens(torch.tensor([[5, 6, 7, 8]]))], 1)
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        full, _ = vlm(x, pos)
        head, cache = vlm(x[:, :-2], pos[:, :-2])
        tail, _ = vlm(x[:, -2:], pos[:, -2:], cache)
    assert (torch.cat([head, tail], 1) - full).abs().max() < 1e-5
    groups = vlm.trainable_groups()
    assert {id(p) for g in groups.values() for p in g} == {id(p) for p in vlm.parameters()}
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    os.remove(bad / vlm.tokenizer_filename)
    with pytest.raises(FileNotFoundError, match="copy .*" + ("qwen.tiktoken" if family == "qwen_vl" else
                                                            "Qwen1.5-0.5B-Chat")):
        backbones.load_vlm(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    if family == "uform":  # a stored lm_head with no stated tie: say so rather than guess
        (bad / "config.json").write_text(json.dumps({**cfg, "text_config": {
            k: v for k, v in cfg["text_config"].items() if k != "tie_word_embeddings"}}))
        with pytest.raises(ValueError, match="tie_word_embeddings"):
            backbones.load_vlm(str(bad))
    if family == "qwen_vl":
        cfg["visual"]["width"] = 48
    else:
        cfg["text_config"]["vocab_size"] += 1  # e.g. 151936 vs the checkpoint's rows: said, not guessed
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config and weights disagree"):
        backbones.load_vlm(str(bad), weights=True)


def test_convert_qwen_vl_reads_tensors_only(tmp_path):
    """weights_only=True: a .bin whose pickle would run code is refused, not executed."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": Evil()}, src / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        backbones.convert_qwen_vl(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen-VL"):
        backbones.convert_qwen_vl(str(tmp_path / "out"), str(tmp_path / "out2"))


# ---- inside a VLA: train a few steps (policy head; + perceiver resampler to 64 latents), act in closed loop ----

@pytest.mark.parametrize("family,resampler", [("qwen_vl", None), ("qwen_vl", 64), ("uform", None), ("uform", 64)])
def test_vla_trains_and_acts_in_closed_loop(family, resampler, request, tmp_path):
    import vla
    folder, _ = request.getfixturevalue(family)
    S = 64 if family == "qwen_vl" else 32
    kw = {"backbone_kwargs": {"resampler": resampler}} if resampler else {}
    torch.manual_seed(0)
    net = vla.VLA(vla.VLAConfig.tiny(backbone=str(folder), image_size=S, formulation="policy_head", window=2,
                                     chunk=2, **kw))
    bb = net.backbone
    assert bb.n_image_tokens == (resampler or {"qwen_vl": 16, "uform": 8}[family]) + 2 * (family == "qwen_vl")
    c = net.config
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randint(0, 255, (2, c.window, len(c.views), 3, S, S), dtype=torch.uint8, generator=g),
             "actions": torch.rand(2, c.window, c.chunk, 7, generator=g) * 2 - 1,
             "action_mask": torch.ones(2, c.window, c.chunk, dtype=torch.bool), "instruction": ["open the drawer",
                                                                                                 "push the block"]}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    losses = []
    for _ in range(3):
        loss, _ = net(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    moved = {n.split(".")[1] for n, p in net.named_parameters() if n.startswith("backbone.") and
             not torch.equal(p, before[n])}
    assert {"lm", "vision"} <= moved and (not resampler or "resampler" in moved)
    stats = {"d": {k: [v] * 7 for k, v in dict(q01=-1.0, q99=1.0, mean=0.0, std=1.0, min=-1.0, max=1.0).items()}}
    vla.save_checkpoint(tmp_path / "run", net, stats)
    policy = vla.Policy.from_pretrained(tmp_path / "run", dataset_key="d")
    for k, v in net.state_dict().items():
        assert torch.equal(policy.vla.state_dict()[k], v), k
    try:
        import evaluate
        env = evaluate.MetaWorldEnv("button-press-topdown", image_size=S, max_steps=3)
    except Exception as e:  # no metaworld / no GL: a synthetic loop (the policy still carries its history)
        print(f"closed loop without Meta-World ({type(e).__name__}: {e})")
        rng = np.random.default_rng(0)
        for _ in range(3):
            obs = {v: rng.integers(0, 255, (S, S, 3), dtype=np.uint8) for v in ("static", "wrist")}
            assert policy.act(obs, "open the drawer").shape == (7,)
        return
    actions = []
    _, _, actions = evaluate._rollout(env, 0, lambda obs, e: policy.act(obs, e.instruction), record=True)
    env.close()
    assert len(actions) == 3 and all(a.shape == (7,) and np.isfinite(a).all() for a in actions)


# ---- the released architectures at full size (meta device): key list -> our parameters, shape for shape ----

def _qwen_vl_released_shapes():
    """Qwen/Qwen-VL's keys and shapes as public code names them (vLLM qwen_vl.py / Resampler2, HF key lists)."""
    w, D, V, mlp = 1664, 4096, 151936, 11008
    s = {"transformer.visual.conv1.weight": (w, 3, 14, 14), "transformer.visual.positional_embedding": (256, w),
         "transformer.visual.attn_pool.query": (256, D), "transformer.visual.attn_pool.pos_embed": (256, D),
         "transformer.visual.attn_pool.kv_proj.weight": (D, w), "transformer.visual.attn_pool.attn.in_proj_weight":
         (3 * D, D), "transformer.visual.attn_pool.attn.in_proj_bias": (3 * D,),
         "transformer.visual.attn_pool.attn.out_proj.weight": (D, D), "transformer.visual.attn_pool.attn.out_proj.bias":
         (D,), "transformer.visual.proj": (D, D), "transformer.wte.weight": (V, D), "transformer.ln_f.weight": (D,),
         "lm_head.weight": (V, D)}
    for n, d in (("ln_pre", w), ("attn_pool.ln_q", D), ("attn_pool.ln_kv", D), ("ln_post", D)):
        s.update({f"transformer.visual.{n}.weight": (d,), f"transformer.visual.{n}.bias": (d,)})
    for i in range(48):
        b = f"transformer.visual.transformer.resblocks.{i}."
        s.update({b + "attn.in_proj.weight": (3 * w, w), b + "attn.in_proj.bias": (3 * w,),
                  b + "attn.out_proj.weight": (w, w), b + "mlp.c_fc.weight": (8192, w), b + "mlp.c_fc.bias": (8192,),
                  b + "mlp.c_proj.weight": (w, 8192)})
        s.update({b + n: (w,) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.out_proj.bias",
                                         "mlp.c_proj.bias")})
    for i in range(32):
        b = f"transformer.h.{i}."
        s.update({b + "ln_1.weight": (D,), b + "ln_2.weight": (D,), b + "attn.c_attn.weight": (3 * D, D),
                  b + "attn.c_attn.bias": (3 * D,), b + "attn.c_proj.weight": (D, D), b + "mlp.w1.weight": (mlp, D),
                  b + "mlp.w2.weight": (mlp, D), b + "mlp.c_proj.weight": (D, mlp)})
    return s


def _uform_released_shapes():
    """uform-gen2-qwen-500m: uform's ImageEncoder names, nn.TransformerDecoderLayer under image_pooler.pooler.,
    transformers' Qwen2ForCausalLM (Qwen1.5-0.5B) under text_decoder."""
    w = 1280
    s = {"image_encoder.patch_embed.weight": (w, 3, 14, 14), "image_encoder.patch_embed.bias": (w,),
         "image_encoder.pos_embed": (1, 576, w), "image_encoder.cls_token": (1, 1, w),
         "image_encoder.norm.weight": (w,), "image_encoder.norm.bias": (w,), "image_pooler.image_latents": (1, 256, w),
         "image_pooler.projection.weight": (1024, w), "image_pooler.projection.bias": (1024,)}
    for i in range(32):
        b = f"image_encoder.blocks.{i}."
        s.update({b + f"attn.{n}.weight": (w, w) for n in ("query", "key", "value", "out")})
        s.update({b + n: (w,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma",
                                         "ls2.gamma", "attn.query.bias", "attn.key.bias", "attn.value.bias",
                                         "attn.out.bias", "mlp.output_layer.bias")})
        s.update({b + "mlp.hidden_layer.weight": (4 * w, w), b + "mlp.hidden_layer.bias": (4 * w,),
                  b + "mlp.output_layer.weight": (w, 4 * w)})
    with torch.device("meta"):
        pooler = nn.TransformerDecoderLayer(w, 16, 3200, batch_first=True, norm_first=True)
        lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, rope_theta=1e6, tie_word_embeddings=True))
    s.update({"image_pooler.pooler." + k: tuple(v.shape) for k, v in pooler.state_dict().items()})
    s.update({"text_decoder." + k: tuple(v.shape) for k, v in lm.state_dict().items()})
    return s


@pytest.mark.parametrize("family,total", [("qwen", (9.5, 9.7)), ("vlm", (1.0, 1.3))])
def test_released_architectures_map_key_for_key(family, total):
    with torch.device("meta"):
        ours = backbones.QwenFamilyVLM({"model_type": family, "text_config": {"tie_word_embeddings": True}})
    shapes = _qwen_vl_released_shapes() if family == "qwen" else _uform_released_shapes()
    params, used = dict(ours.named_parameters()), set()
    for key, shape in shapes.items():
        for name, _, n, *_ in ours.key_to_ours(key):
            if backbones._unused_checkpoint_key(ours, name):
                continue
            assert name in params, f"{key} -> {name} has no parameter"
            assert (n * params[name].shape[0], *params[name].shape[1:]) == tuple(shape), key
            used.add(name)
    assert used == set(params)
    billions = sum(p.numel() for p in params.values()) / 1e9
    print(f"\n{family}: {billions:.3f} B parameters")
    assert total[0] < billions < total[1]
