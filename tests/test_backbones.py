"""Pretrained VLM families (backbones.py, "pretrained families"): numerical parity with `transformers`.

Each test builds a tiny random model with transformers (the oracle pinned in requirements-dev.txt), saves it
with save_pretrained (safetensors) to tmp_path, loads that folder with backbones.load_vlm (no transformers
involved) and compares the LM logits for the same inputs in fp32. New configurations can be checked with
compare_with_transformers(family, hf_config_overrides, seed).
"""

import json
import os
import re

import pytest
import torch

import backbones

transformers = pytest.importorskip(
    "transformers", reason="transformers is the numerical oracle for the pretrained backbones; "
                           "install it with `pip install -r requirements-dev.txt`")

VOCAB = 128
IMAGE_TOKEN = 100  # LLaVA / PaliGemma placeholder id in the tiny vocabularies


def hf_config(family, overrides):
    """A tiny transformers config of `family`. overrides: {"vision": {...}, "text": {...}, other top-level keys}."""
    ov = dict(overrides)
    vis = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14), **ov.pop("vision", {})}
    txt = ov.pop("text", {})
    if family == "kosmos-2":
        txt = {**dict(vocab_size=VOCAB, embed_dim=32, layers=2, attention_heads=4, ffn_dim=64,
                      max_position_embeddings=128), **txt}
        return transformers.Kosmos2Config(text_config=txt, vision_config=vis, **{"latent_query_num": 8, **ov})
    if family == "paligemma":
        txt = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=8, vocab_size=VOCAB), **txt}
        return transformers.PaliGemmaConfig(text_config=txt, vision_config=vis, projection_dim=txt["hidden_size"],
                                            **{"image_token_index": IMAGE_TOKEN, **ov})
    if family == "llava":
        txt = {**dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB), **txt}
        return transformers.LlavaConfig(text_config=txt, vision_config=dict(vis, model_type="clip_vision_model"),
                                        **{"image_token_index": IMAGE_TOKEN, **ov})
    raise ValueError(family)


def hf_model(family, overrides, seed):
    """Tiny random transformers model; every weight is perturbed so norms/biases are not at their init values."""
    torch.manual_seed(seed)
    cls = {"kosmos-2": transformers.Kosmos2ForConditionalGeneration,
           "paligemma": transformers.PaliGemmaForConditionalGeneration,
           "llava": transformers.LlavaForConditionalGeneration}[family]
    model = cls._from_config(hf_config(family, overrides), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_inputs(family, model, n_image_tokens, batch=2, n_text=7, seed=0, padding="right", prefix_lm=True):
    """The tensors the transformers model takes, laid out as each processor does; row 1 has 2 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    S = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, S, S, generator=g)
    text = torch.randint(5, 90, (batch, n_text), generator=g)
    extra = {}
    if family == "kosmos-2":  # <s> <image> 64 x placeholder </image> text (placeholders are ids 4..)
        img = torch.arange(4, 4 + n_image_tokens).expand(batch, -1)
        ids = torch.cat([torch.full((batch, 1), 0), torch.full((batch, 1), 93), img, torch.full((batch, 1), 94),
                         text], 1)
        extra["image_embeds_position_mask"] = torch.zeros_like(ids)
        extra["image_embeds_position_mask"][:, 2:2 + n_image_tokens] = 1
        pad_id = 1
    elif family == "paligemma":  # 256 x <image> <bos> prompt [suffix]; token_type_ids 1 on the suffix
        ids = torch.cat([torch.full((batch, n_image_tokens), IMAGE_TOKEN), torch.full((batch, 1), 2), text], 1)
        if prefix_lm:
            extra["token_type_ids"] = torch.zeros_like(ids)
            extra["token_type_ids"][:, -3:] = 1
            extra["labels"] = ids.clone()  # with token_type_ids: transformers' training (prefix-LM) mask
        pad_id = 0
    else:  # <s> <image> x n text
        ids = torch.cat([torch.full((batch, 1), 1), torch.full((batch, n_image_tokens), IMAGE_TOKEN), text], 1)
        pad_id = 0
    mask = torch.ones_like(ids)
    if batch > 1:
        if padding == "right":
            ids[1, -2:], mask[1, -2:] = pad_id, 0
        else:  # left padding: shift row 1 right by 2 (Kosmos-2 only: positions are counted from the ids)
            ids[1] = torch.cat([torch.full((2,), pad_id), ids[1, :-2]])
            mask[1, :2] = 0
            for k in ("image_embeds_position_mask",):
                extra[k][1] = torch.cat([torch.zeros(2, dtype=torch.long), extra[k][1, :-2]])
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, **extra)


def compare_with_transformers(family, hf_config_overrides, seed, folder=None, **input_kw):
    """Max |logit difference| over real (unpadded) tokens between transformers and backbones.load_vlm
    on the same saved tiny checkpoint and the same inputs (fp32)."""
    import tempfile
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="bb_parity_") as tmp:
            return compare_with_transformers(family, hf_config_overrides, seed, tmp, **input_kw)
    model = hf_model(family, hf_config_overrides, seed)
    model.save_pretrained(folder, safe_serialization=True)
    vlm = backbones.load_vlm(str(folder))
    n_image = vlm.n_image_tokens - 2 * (vlm.image_boundary is not None)  # Kosmos-2 <image>...</image> excluded
    inputs = hf_inputs(family, model, n_image, seed=seed, **input_kw)
    with torch.no_grad():
        ref = model(**inputs).logits
        ours = vlm.lm_logits(**inputs)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    real = inputs["attention_mask"].bool()
    assert ref[real].abs().max() > 0.1  # the comparison is not between two near-zero tensors
    return (ref[real] - ours[real]).abs().max().item()


PARITY_CASES = [
    ("kosmos-2", {}, {}),
    ("kosmos-2", {"text": dict(layers=3, attention_heads=2), "vision": dict(num_hidden_layers=1)}, {}),
    ("kosmos-2", {"latent_query_num": 4, "vision": dict(image_size=42)}, {"padding": "left"}),
    ("paligemma", {}, {}),  # multi-query attention (1 KV head), prefix-LM mask
    ("paligemma", {"text": dict(num_key_value_heads=2, num_hidden_layers=3)}, {"prefix_lm": False}),
    ("paligemma", {"text": dict(num_key_value_heads=4), "vision": dict(image_size=42)}, {}),
    ("llava", {}, {}),  # grouped-query attention (2 KV heads), CLIP layer -2 without CLS
    ("llava", {"text": dict(num_key_value_heads=4, num_hidden_layers=3), "vision": dict(num_hidden_layers=3)}, {}),
    ("llava", {"vision_feature_layer": -1, "vision_feature_select_strategy": "full",
               "text": dict(tie_word_embeddings=True)}, {}),
]


@pytest.mark.parametrize("family,overrides,input_kw", PARITY_CASES)
def test_logits_match_transformers(family, overrides, input_kw, tmp_path):
    diff = compare_with_transformers(family, overrides, seed=len(str(overrides)), folder=tmp_path, **input_kw)
    assert diff <= 1e-4, f"{family} {overrides}: max |logit diff| {diff:.3g}"


@pytest.mark.parametrize("family", ["kosmos-2", "paligemma", "llava"])
def test_last_hidden_states_match_transformers(family, tmp_path):
    """The backbone interface returns last-layer hidden states (after the final norm): compare them directly."""
    model = hf_model(family, {}, 7)
    model.save_pretrained(tmp_path)
    vlm = backbones.load_vlm(str(tmp_path))
    inputs = hf_inputs(family, model, vlm.n_image_tokens, seed=7)
    with torch.no_grad():
        if family == "kosmos-2":  # the text model's last hidden_states entry is taken after its final LayerNorm
            ref = model(**inputs, output_hidden_states=True).hidden_states[-1]
        else:
            ref = model.model(**inputs).last_hidden_state
        ours = vlm._hf_forward(**inputs)
    real = inputs["attention_mask"].bool()
    assert (ref[real] - ours[real]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["paligemma", "llava"])
def test_image_features_match_transformers(family, tmp_path):
    model = hf_model(family, {}, 1)
    model.save_pretrained(tmp_path)
    vlm = backbones.load_vlm(str(tmp_path))
    px = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ref = model.get_image_features(px)  # PaliGemma: already / sqrt(d); ours are x sqrt(d) afterwards
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref  # LLaVA: one tensor per image
        ours = vlm.encode_images(px) / vlm.lm.embed_scale
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-5


def test_sharded_checkpoint_and_bf16(tmp_path):
    model = hf_model("llava", {}, 2)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    vlm = backbones.load_vlm(str(tmp_path))
    inputs = hf_inputs("llava", model, vlm.n_image_tokens)
    with torch.no_grad():
        ref = model(**inputs).logits
        assert (vlm.lm_logits(**inputs) - ref)[inputs["attention_mask"].bool()].abs().max() < 1e-4
        half = backbones.load_vlm(str(tmp_path), dtype=torch.bfloat16)
        assert half.lm.embed_tokens.weight.dtype == torch.bfloat16
        out = half.lm_logits(**inputs).float()
    assert torch.isfinite(out).all()
    assert (out - ref)[inputs["attention_mask"].bool()].abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("family", ["kosmos-2", "paligemma", "llava"])
def test_kv_cache_and_interface(family, tmp_path):
    """forward over a prefix then one token at a time with the cache == one full causal forward."""
    hf_model(family, {}, 3).save_pretrained(tmp_path)
    vlm = backbones.load_vlm(str(tmp_path))
    img = vlm.encode_images(torch.randn(2, 3, vlm.image_size, vlm.image_size))  # (2, T_img, d)
    assert img.shape == (2, vlm.n_image_tokens, vlm.hidden_size)
    x = torch.cat([img, vlm.embed_tokens(torch.randint(5, 90, (2, 5)))], 1)
    pos = torch.arange(x.shape[1]).expand(2, -1)
    with torch.no_grad():
        full, cache = vlm(x, pos)
        assert len(cache) == vlm.n_layers and cache[0][0].shape[1:] == (vlm.n_kv_heads, x.shape[1], vlm.head_dim)
        h, cache = vlm(x[:, :-3], pos[:, :-3])
        steps = [h]
        for t in range(x.shape[1] - 3, x.shape[1]):
            h, cache = vlm(x[:, t:t + 1], pos[:, t:t + 1], cache)
            steps.append(h)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert vlm.lm_logits(full).shape == (2, x.shape[1], vlm.vocab_size)
    groups = vlm.trainable_groups()
    ids = {id(p) for g in groups.values() for p in g}
    assert ids == {id(p) for p in vlm.parameters()}  # every parameter belongs to exactly one group...
    assert sum(len(g) for g in groups.values()) == len(ids)  # ...and only one


@pytest.mark.parametrize("name", sorted(backbones.TINY_FAMILIES))
def test_tiny_presets_follow_the_interface(name):
    bb = backbones.build_backbone(name, image_size=32)
    assert bb.image_size == 32 and bb.vocab_size >= bb.tokenizer.vocab_size
    ids = torch.tensor([bb.tokenizer.encode(bb.prompt("open the drawer"))])
    x = torch.cat([bb.encode_images(torch.randn(1, 3, 32, 32)), bb.embed_tokens(ids)], 1)
    hidden, cache = bb(x, torch.arange(x.shape[1])[None])
    assert hidden.shape == (1, x.shape[1], bb.hidden_size) and len(cache) == bb.n_layers
    q = torch.randn(1, bb.n_heads, x.shape[1], bb.head_dim)
    assert bb.rope(q, torch.arange(x.shape[1])[None]).shape == q.shape


# ---- bad input: clear errors, nothing half-loaded ----

@pytest.fixture(scope="module")
def saved_paligemma(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg")
    hf_model("paligemma", {}, 4).save_pretrained(d)
    return d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _rewrite_safetensors(folder, edit):
    from safetensors.torch import load_file, save_file
    fn = os.path.join(folder, "model.safetensors")
    tensors = load_file(fn)
    edit(tensors)
    save_file(tensors, fn, metadata={"format": "pt"})


def test_missing_files_and_unknown_type(saved_paligemma, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        backbones.load_vlm(str(tmp_path))
    d = _copy(saved_paligemma, tmp_path / "a")
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        backbones.load_vlm(str(d))
    d = _copy(saved_paligemma, tmp_path / "b")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen_vl")))
    with pytest.raises(ValueError, match="unknown model_type 'qwen_vl'"):
        backbones.load_vlm(str(d))


def test_missing_unexpected_and_misshapen_keys(saved_paligemma, tmp_path):
    d = _copy(saved_paligemma, tmp_path / "a")
    _rewrite_safetensors(d, lambda t: t.pop(next(k for k in t if k.endswith("layers.1.mlp.down_proj.weight"))))
    with pytest.raises(ValueError, match=r"missing .*lm\.layers\.1\.mlp\.fc2\.weight"):
        backbones.load_vlm(str(d))
    d = _copy(saved_paligemma, tmp_path / "b")
    _rewrite_safetensors(d, lambda t: t.update({"language_model.model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="extra.weight"):
        backbones.load_vlm(str(d))
    d = _copy(saved_paligemma, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = r"has shape \((64, 32|32, 64)\), expected \((48, 32|32, 48)\)"
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight' .* " + shapes):
        backbones.load_vlm(str(d))


def test_truncated_file(saved_paligemma, tmp_path):
    d = _copy(saved_paligemma, tmp_path / "a")
    fn = d / "model.safetensors"
    fn.write_bytes(fn.read_bytes()[: fn.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        backbones.load_vlm(str(d))


# ---- tokenizers: against transformers' sentencepiece tokenizers on a sentencepiece model trained here ----

LINES = ["open the drawer and pick up the red block", "push the blue block to the left",
         "turn on the light bulb", "An image of a robot arm on a table", "What action should the robot take?"] * 10


def _train_spm(path, **ids):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_prefix=str(path), model_type="bpe",
                                   vocab_size=330 if ids.get("byte_fallback") else 90, character_coverage=1.0,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2, **ids)
    return str(path) + ".model"


TEXTS = ["open the drawer", "<grounding>An image of a robot push the block", "turn ON the lamp zq!",
         "<image>what action?\n", ""]


@pytest.mark.parametrize("family", ["kosmos-2", "paligemma", "llava"])
def test_tokenizer_matches_transformers(family, tmp_path):
    if family == "kosmos-2":  # XLM-R layout: spm <unk>=0 <s>=1 </s>=2
        sp = _train_spm(tmp_path / "sp", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        hf = transformers.XLMRobertaTokenizer(sp)
    elif family == "paligemma":
        sp = _train_spm(tmp_path / "sp", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
                        bos_piece="<bos>", eos_piece="<eos>")  # Gemma's piece names
        hf = transformers.GemmaTokenizer(sp)
    else:
        sp = _train_spm(tmp_path / "sp", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True)
        hf = transformers.LlamaTokenizer(sp, legacy=True)
    hf.add_tokens(["<image>", "</image>", "<grounding>"], special_tokens=True)
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    ours = backbones.load_family_tokenizer(str(folder), family)
    assert ours is not None and ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in TEXTS:
        ref = hf(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == ref, text
        assert ours.decode(ref).strip() == hf.decode(ref, skip_special_tokens=True).strip(), text


def _kosmos_folder(tmp_path, seed):
    """A tiny random Kosmos-2 saved as a Hugging Face folder (56 px) with its sentencepiece tokenizer and the
    <image> / </image> / <grounding> added tokens. -> (folder, transformers tokenizer)."""
    model = hf_model("kosmos-2", {"vision": dict(image_size=56)}, seed)
    folder = tmp_path / "kosmos"
    model.save_pretrained(folder)
    sp = _train_spm(tmp_path / "sp", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    tok = transformers.XLMRobertaTokenizer(sp)
    tok.add_tokens(["<image>", "</image>", "<grounding>"], special_tokens=True)
    tok.save_pretrained(folder)
    return folder, tok


def test_vla_on_a_hugging_face_folder(tmp_path):
    """The user flow: a Kosmos-2 folder (weights + sentencepiece tokenizer) as --backbone, train step, checkpoint,
    Policy.from_pretrained, act."""
    import numpy as np
    import vla
    folder, tok = _kosmos_folder(tmp_path, seed=5)
    c = vla.VLAConfig.tiny(backbone=str(folder), image_size=56, formulation="policy_head")
    policy_net = vla.VLA(c)
    bb = policy_net.backbone
    assert isinstance(bb, backbones.PretrainedVLM) and bb.image_boundary == (tok.convert_tokens_to_ids("<image>"),
                                                                           tok.convert_tokens_to_ids("</image>"))
    img = bb.encode_images(torch.randn(1, 3, 56, 56))  # <image> 8 latents </image>, as Kosmos-2 was pretrained
    assert img.shape[1] == bb.n_image_tokens == 10
    assert torch.equal(img[0, 0], bb.embed_tokens(torch.tensor(bb.image_boundary[0])))
    H, L, V = c.window, c.chunk, len(c.views)
    batch = {"images": torch.randint(0, 255, (2, H, V, 3, 56, 56), dtype=torch.uint8),
             "actions": torch.rand(2, H, L, 7) * 2 - 1, "action_mask": torch.ones(2, H, L, dtype=torch.bool),
             "instruction": ["open the drawer", "push the block"]}
    loss, _ = policy_net(batch)
    loss.backward()
    assert torch.isfinite(loss) and policy_net.backbone.lm.layers[0].attn.q_proj.weight.grad is not None
    stats = {"d": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7,
                   "max": [1.0] * 7}}
    vla.save_checkpoint(tmp_path / "run", policy_net, stats)
    policy = vla.Policy.from_pretrained(tmp_path / "run", dataset_key="d")
    obs = {"static": np.zeros((60, 60, 3), np.uint8), "wrist": np.zeros((60, 60, 3), np.uint8)}
    assert policy.act(obs, "open the drawer").shape == (7,)


# ---- perceiver resampler (LLaVA + resampler, Flamingo-style): against transformers' IDEFICS resampler ----

def test_perceiver_resampler_matches_idefics():
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
    d, depth, heads, head_dim, n_lat = 32, 2, 4, 8, 6
    cfg = transformers.IdeficsConfig(vision_config=dict(embed_dim=d), perceiver_config=dict(
        qk_layer_norms_perceiver=False))
    torch.manual_seed(0)
    ref = IdeficsPerceiverResampler(cfg, d, depth, heads, head_dim, n_lat).eval()
    ours = backbones.PerceiverResampler(d, depth, heads, head_dim, n_lat, act="relu").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    names = {"context_layer_norm": "norm_media", "latents_layer_norm": "norm_latents", "q_proj": "attn.q_proj",
             "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "output_proj": "attn.o_proj", "ln": "ff_norm",
             "fc": "ff.fc1", "c_proj": "ff.fc2"}
    sd = {}
    for k, v in ref.state_dict().items():  # blocks.{i}.{0 attn | 1 mlp}.{name}.{weight|bias} -> layers.{i}.{ours}
        parts = k.split(".")
        if parts[0] == "blocks":
            k = ".".join(["layers", parts[1], names[parts[3]], parts[4]])
        elif parts[0] == "layer_norm":
            k = "norm." + parts[1]
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(3, 10, d)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-5
    assert ours(x).shape == (3, n_lat, d)


def test_resampler_option_on_a_loaded_backbone(tmp_path):
    hf_model("llava", {}, 6).save_pretrained(tmp_path)
    bb = backbones.build_backbone(str(tmp_path), resampler=4)
    tok = bb.encode_images(torch.randn(2, 3, 28, 28))
    assert tok.shape == (2, 4, bb.hidden_size) and bb.n_image_tokens == 4
    tok.sum().backward()
    assert bb.resampler.latents.grad is not None
    assert not any(p is bb.resampler.latents for g in bb.trainable_groups().values() for p in g)  # always trains


# ---- Flamingo-style: gated cross-attention semantics (no in-library oracle for the whole model) ----

def _flamingo_inputs(bb, T=10):
    g = torch.Generator().manual_seed(0)
    x = bb.embed_tokens(torch.randint(3, 400, (2, T), generator=g))
    return x, torch.arange(T).expand(2, -1)


def test_flamingo_gates_at_zero_leave_the_lm_unchanged():
    bb = backbones.build_backbone("tiny-flamingo", image_size=32)
    x, pos = _flamingo_inputs(bb)
    media = bb.encode_images(torch.randn(2, 3, 32, 32))
    assert media.shape == (2, bb.n_image_tokens, 64)
    with torch.no_grad():
        plain, _ = bb(x, pos)
        gated, _ = bb(x, pos, media=media)
        assert torch.equal(plain, gated)
        for blk in bb.xattn.values():  # open the gates: the media now change the output
            blk.attn_gate.fill_(1.0), blk.ff_gate.fill_(1.0)
        assert (bb(x, pos, media=media)[0] - plain).abs().max() > 1e-3


def test_flamingo_text_attends_only_to_the_immediately_preceding_image():
    """At the gated cross-attention: image 0 at position 2, image 1 at position 6. Changing image 0 changes
    tokens 2..5 only; tokens 0..1 (before any image) get no cross-attention update, only the gated feed-forward
    (OpenFlamingo's helpers.py runs it on every token)."""
    torch.manual_seed(0)
    blk = backbones.GatedCrossAttention(32, 16, heads=4, head_dim=8)
    with torch.no_grad():
        blk.attn_gate.fill_(1.0), blk.ff_gate.fill_(1.0)
    x, pos = torch.randn(2, 10, 32), torch.arange(10).expand(2, -1)
    media, media_pos = torch.randn(2, 2, 5, 16), torch.tensor([[2, 6], [2, 6]])
    changed = media.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        base = blk(x, media, media_pos, pos)
        diff = (blk(x, changed, media_pos, pos) - base).abs().amax(-1)  # (2, T)
        one = blk(x[:, 6:], media[:, 1])  # a single image seen by every token == image 1 for tokens 6..
    assert diff[:, 2:6].min() > 1e-4 and diff[:, 6:].max() == 0 and diff[:, :2].max() == 0
    ff_only = x[:, :2] + torch.tanh(blk.ff_gate) * blk.ff(blk.ff_norm(x[:, :2]))
    assert (base[:, :2] - ff_only).abs().max() < 1e-6
    assert (one - base[:, 6:]).abs().max() < 1e-6


def test_vla_with_tiny_flamingo():
    import vla
    c = vla.VLAConfig.tiny(backbone="tiny-flamingo", image_size=32, formulation="policy_head")
    net = vla.VLA(c)
    H, L, V = c.window, c.chunk, len(c.views)
    batch = {"images": torch.randint(0, 255, (2, H, V, 3, 32, 32), dtype=torch.uint8),
             "actions": torch.rand(2, H, L, 7) * 2 - 1, "action_mask": torch.ones(2, H, L, dtype=torch.bool),
             "instruction": ["open the drawer", "push the block"]}
    loss, _ = net(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert next(iter(net.backbone.xattn.values())).attn_gate.grad is not None  # the gates learn


# ---- released sizes, on the meta device (no memory): every transformers weight maps onto ours, same shape ----

RELEASED = {
    "kosmos-2": dict(),  # microsoft/kosmos-2-patch14-224: the library defaults are the released model
    "paligemma": dict(  # google/paligemma-3b-pt-224 config.json
        text_config=dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                         num_hidden_layers=18, num_key_value_heads=1, vocab_size=257216),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_attention_heads=16, num_hidden_layers=27, patch_size=14, projection_dim=2048,
                           vision_use_head=False),
        projection_dim=2048, hidden_size=2048, image_token_index=257152),
    "llava": dict(text_config=dict(model_type="llama", vocab_size=32064), image_token_index=32000),  # 1.5-7b-hf
}


@pytest.mark.parametrize("family", sorted(RELEASED))
def test_released_architectures_map_key_for_key(family):
    cls = {"kosmos-2": (transformers.Kosmos2Config, transformers.Kosmos2ForConditionalGeneration),
           "paligemma": (transformers.PaliGemmaConfig, transformers.PaliGemmaForConditionalGeneration),
           "llava": (transformers.LlavaConfig, transformers.LlavaForConditionalGeneration)}[family]
    cfg = cls[0](**RELEASED[family])
    with torch.device("meta"):
        ref = cls[1]._from_config(cfg)
        ours = backbones.PretrainedVLM(json.loads(cfg.to_json_string()))
    params = dict(ours.named_parameters())
    used = set()
    for key, t in ref.state_dict().items():
        mine = backbones.checkpoint_key_to_ours(key)
        if backbones._unused_checkpoint_key(ours, mine):
            continue
        assert mine in params, f"{key} -> {mine} has no parameter"
        assert params[mine].shape == t.shape, key
        used.add(mine)
    assert used == set(params)
    n = sum(p.numel() for p in params.values()) / 1e9
    assert {"kosmos-2": 1.5 < n < 1.8, "paligemma": 2.8 < n < 3.0, "llava": 6.9 < n < 7.2}[family], n


# ---- OpenFlamingo: a converted folder built from the real parts (open_clip ViT, transformers MPT) under the
# ---- released checkpoint's key names; the Flamingo-specific math is re-stated below from open_flamingo's helpers.py

OF_PERCEIVER = dict(depth=2, heads=2, dim_head=8, num_latents=4)


def _of_flamingo_tensors(width, d, xattn_layers, g, layers="transformer.blocks"):
    """Random perceiver + gated cross-attention tensors named as OpenFlamingo's state_dict (to_kv fused, ff.0/1/3,
    gates non-zero so the media matter), each cross-attention also under its gated_cross_attn_layers alias."""
    inner, p = OF_PERCEIVER["heads"] * OF_PERCEIVER["dim_head"], OF_PERCEIVER
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    ln = lambda pre, n: {pre + "weight": 1 + r(n), pre + "bias": r(n)}  # noqa: E731
    sd = {"perceiver.latents": torch.randn(p["num_latents"], width, generator=g), **ln("perceiver.norm.", width)}
    for i in range(p["depth"]):
        b = f"perceiver.layers.{i}."
        sd.update({**ln(b + "0.norm_media.", width), **ln(b + "0.norm_latents.", width), **ln(b + "1.0.", width),
                   b + "0.to_q.weight": r(inner, width), b + "0.to_kv.weight": r(2 * inner, width),
                   b + "0.to_out.weight": r(width, inner), b + "1.1.weight": r(4 * width, width),
                   b + "1.3.weight": r(width, 4 * width)})
    for i in xattn_layers:
        b = f"lang_encoder.{layers}.{i}.gated_cross_attn_layer."
        x = {**ln("attn.norm.", d), **ln("ff.0.", d), "attn.to_q.weight": r(inner, d),
             "attn.to_kv.weight": r(2 * inner, width), "attn.to_out.weight": r(d, inner), "attn_gate": r(1),
             "ff.1.weight": r(4 * d, d), "ff.3.weight": r(d, 4 * d), "ff_gate": r(1)}
        sd.update({b + k: v for k, v in x.items()})
        sd.update({f"lang_encoder.gated_cross_attn_layers.{i}.{k}": v.clone() for k, v in x.items()})
    return sd


LM_CLASSES = {"mpt": ("MptConfig", "MptForCausalLM", "transformer.blocks"),
              "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.layers"),
              "llama": ("LlamaConfig", "LlamaForCausalLM", "model.layers")}
TINY_LM = {"mpt": dict(d_model=32, n_heads=4, n_layers=4, vocab_size=VOCAB, max_seq_len=64),
           "gpt_neox": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=4, intermediate_size=64,
                            vocab_size=VOCAB, max_position_embeddings=64),
           "llama": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                         intermediate_size=64, vocab_size=VOCAB)}


def openflamingo_folder(folder, seed=0, mpt=None, every=2, image_size=28, lm_type="mpt", wrapped=True):
    """Write a tiny converted OpenFlamingo folder: config.json + model.safetensors holding open_clip's visual
    (`vision_encoder.*`), the perceiver, the cross-attention and the MPT LM, its layers named as an OpenFlamingo
    model's state_dict names them (`blocks.{i}.decoder_layer.*` plus the `old_decoder_blocks` aliases) or, with
    wrapped=False, as the base LM names them (docs/backbones.md's merge). lm_type "gpt_neox" (4B) or "llama"
    (first-release 9B): that LM instead (mpt= overrides its config). -> (transformers LM, open_clip visual, tensors).
    """
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    visual = open_clip.transformer.VisionTransformer(
        image_size=image_size, patch_size=14, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16,
        act_layer=open_clip.transformer.QuickGELU, output_tokens=True, final_ln_after_pool=True).eval()
    conf, cls, layers = LM_CLASSES[lm_type]
    cfg = getattr(transformers, conf)(**{**TINY_LM[lm_type], **(mpt or {})})
    lm = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for p in list(visual.parameters()) + list(lm.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    xl = [i for i in range(cfg.num_hidden_layers) if (i + 1) % every == 0]
    sd = {"vision_encoder." + k: v for k, v in visual.state_dict().items()}
    for k, v in lm.state_dict().items():
        if k in ("lm_head.weight", "embed_out.weight") and cfg.tie_word_embeddings:
            continue  # tied to the input embeddings (saved once)
        m = re.match(layers.replace(".", r"\.") + r"\.(\d+)\.(.*)", k)
        if m and wrapped:
            sd[f"lang_encoder.{layers}.{m[1]}.decoder_layer.{m[2]}"] = v
            sd[f"lang_encoder.old_decoder_blocks.{m[1]}.{m[2]}"] = v.clone()
        else:
            sd["lang_encoder." + k] = v
    sd.update(_of_flamingo_tensors(32, cfg.hidden_size, xl, g, layers))
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(model_type="openflamingo", cross_attn_every_n_layers=every, perceiver_config=OF_PERCEIVER,
                       vision_config=dict(image_size=image_size, layers=2, width=32, patch_size=14, head_width=8,
                                          mlp_ratio=2.0, quick_gelu=True),
                       text_config=json.loads(cfg.to_json_string())), f)
    return lm, visual, sd


def _mpt_inputs(seed, batch=2, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, T), generator=g)
    am = torch.ones_like(ids)
    am[-1, -2:] = 0  # right padding on the last row
    return ids, am


def compare_flamingo_lm_with_transformers(lm_type, overrides, seed, folder=None):
    """Max |logit difference| over real tokens between transformers' MptForCausalLM (lm_type "mpt") or
    GPTNeoXForCausalLM ("gpt_neox") and the language model of an OpenFlamingo folder loaded with
    backbones.load_vlm (no media, fp32). The sibling of compare_with_transformers for the Flamingo family."""
    import tempfile
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="of_parity_") as tmp:
            return compare_flamingo_lm_with_transformers(lm_type, overrides, seed, tmp)
    ref_model, _, _ = openflamingo_folder(folder, seed, overrides, lm_type=lm_type)
    vlm = backbones.load_vlm(folder)
    ids, am = _mpt_inputs(seed)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=am).logits
        pos = torch.arange(ids.shape[1]).expand(len(ids), -1)
        h, _ = vlm.lm(vlm.embed_tokens(ids), pos, mask=backbones.padding_attention_mask(am, ids.shape[1]))
        ours = vlm.lm_logits(h)
    real = am.bool()
    assert ref[real].abs().max() > 0.1
    return (ref[real] - ours[real]).abs().max().item()


@pytest.mark.parametrize("lm_type,overrides", [
    ("mpt", {}),
    ("mpt", dict(n_heads=6, d_model=48, n_layers=3)),  # head count not a power of two: interleaved ALiBi slopes
    ("mpt", dict(attn_config=dict(clip_qkv=0.3))),  # (transformers ignores expansion_ratio and alibi_bias_max)
    ("gpt_neox", {}),  # parallel residual, RoPE on a quarter of each head
    ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=1.0, num_attention_heads=2,
                      tie_word_embeddings=True)),
    ("llama", {}),  # the first OpenFlamingo-9B's LLaMA-7B layout
])
def test_flamingo_lms_match_transformers(lm_type, overrides, tmp_path):
    diff = compare_flamingo_lm_with_transformers(lm_type, overrides, seed=len(str(overrides)), folder=tmp_path)
    assert diff <= 1e-4, f"{lm_type} {overrides}: max |logit diff| {diff:.3g}"


def _ln(sd, pre, x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[pre + "weight"], sd[pre + "bias"])


def openflamingo_reference_logits(lm, visual, sd, ids, pixels, media_token, every=2):
    """OpenFlamingo's forward re-stated from its helpers.py/flamingo_lm.py, on the fused checkpoint tensors:
    open_clip patch tokens -> PerceiverResampler -> the MPT with a GatedCrossAttentionBlock run before every decoder
    layer i with (i + 1) % every == 0. media_locations = (ids == <image>); a token attends only to the latest image
    at or before it (text_time == media_time), tokens before any image get zeroed attention, the gated
    feed-forward runs on every token. pixels (B, M, 3, S, S)."""
    F, heads, n = torch.nn.functional, OF_PERCEIVER["heads"], OF_PERCEIVER["num_latents"]
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731

    def attn(q, k, v, mask=None, zero=None):
        s = split(q) @ split(k).transpose(-1, -2) * OF_PERCEIVER["dim_head"] ** -0.5
        if mask is not None:
            s = s.masked_fill(~mask, -torch.finfo(s.dtype).max)
        a = s.softmax(-1)
        a = a if zero is None else a.masked_fill(zero, 0.0)
        return (a @ split(v)).transpose(1, 2).flatten(2)

    B, M = pixels.shape[:2]
    x = visual(pixels.flatten(0, 1))[1]  # (B*M, P, w) patch tokens (open_clip output_tokens)
    lat = sd["perceiver.latents"].expand(x.shape[0], -1, -1)
    for i in range(OF_PERCEIVER["depth"]):
        b = f"perceiver.layers.{i}."
        q = _ln(sd, b + "0.norm_latents.", lat)
        k, v = (torch.cat([_ln(sd, b + "0.norm_media.", x), q], 1) @ sd[b + "0.to_kv.weight"].T).chunk(2, -1)
        lat = lat + attn(q @ sd[b + "0.to_q.weight"].T, k, v) @ sd[b + "0.to_out.weight"].T
        lat = lat + F.gelu(_ln(sd, b + "1.0.", lat) @ sd[b + "1.1.weight"].T) @ sd[b + "1.3.weight"].T
    media = _ln(sd, "perceiver.norm.", lat).reshape(B, M * n, -1)
    text_time = (ids == media_token).cumsum(-1)  # (B, T)
    mask = text_time[:, None, :, None] == (torch.arange(M).repeat_interleave(n) + 1)  # (B, 1, T, M*n)
    zero = (text_time == 0)[:, None, :, None]

    def xattn(i):
        b = f"lang_encoder.transformer.blocks.{i}.gated_cross_attn_layer."

        def pre_hook(module, args):
            h = args[0]
            k, v = (media @ sd[b + "attn.to_kv.weight"].T).chunk(2, -1)
            q = _ln(sd, b + "attn.norm.", h) @ sd[b + "attn.to_q.weight"].T
            h = h + attn(q, k, v, mask, zero) @ sd[b + "attn.to_out.weight"].T * sd[b + "attn_gate"].tanh()
            ff = F.gelu(_ln(sd, b + "ff.0.", h) @ sd[b + "ff.1.weight"].T) @ sd[b + "ff.3.weight"].T
            return (h + ff * sd[b + "ff_gate"].tanh(),) + args[1:]
        return pre_hook

    hooks = [blk.register_forward_pre_hook(xattn(i)) for i, blk in enumerate(lm.transformer.blocks)
             if (i + 1) % every == 0]
    try:
        return lm(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()


def test_openflamingo_folder_matches_its_parts(tmp_path):
    """The converted folder loads key for key; vision = open_clip's forward; the whole model (images through the
    perceiver and gated cross-attention into MPT) = OpenFlamingo's math on the checkpoint tensors; gates at 0 give
    transformers' MPT logits exactly."""
    import open_clip
    lm, visual, sd = openflamingo_folder(tmp_path, seed=3)
    vlm = backbones.load_vlm(str(tmp_path))
    assert vlm.family == "openflamingo" and sorted(vlm.xattn) == ["1", "3"]
    mapped = {t[0] for k in sd for t in backbones.openflamingo_key_to_ours(k)}
    assert mapped == set(dict(vlm.named_parameters())) | {"vision.post_layernorm.weight", "vision.post_layernorm.bias"}
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 2, 3, 28, 28, generator=g)  # (B, M images, 3, S, S)
    with torch.no_grad():  # vision tower: open_clip's patch tokens, without ln_post (open_clip < 2.24) and with it
        ours = vlm.vision(pixels[0])
        assert (ours[:, 1:] - visual(pixels[0])[1]).abs().max() < 1e-5
        post = open_clip.transformer.VisionTransformer(
            image_size=28, patch_size=14, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16,
            act_layer=open_clip.transformer.QuickGELU, output_tokens=True).eval()
        post.load_state_dict(visual.state_dict())
        assert (vlm.vision.post_layernorm(ours)[:, 1:] - post(pixels[0])[1]).abs().max() < 1e-5
    MEDIA = 5  # the <image> id; row 0: token 0 comes before any image
    ids = torch.randint(6, VOCAB, (2, 10), generator=g)
    ids[0, [1, 6]] = MEDIA
    ids[1, [0, 4]] = MEDIA
    with torch.no_grad():
        ref = openflamingo_reference_logits(lm, visual, sd, ids, pixels, MEDIA)
        media = vlm.encode_images(pixels.flatten(0, 1)).view(2, 2, OF_PERCEIVER["num_latents"], -1)
        media_pos = (ids == MEDIA).nonzero()[:, 1].view(2, 2)
        pos = torch.arange(10).expand(2, -1)
        out = vlm.lm_logits(vlm(vlm.embed_tokens(ids), pos, media=media, media_pos=media_pos)[0])
        plain = lm(input_ids=ids).logits
        assert (ref - plain).abs().max() > 1e-2  # the images matter
        assert (out - ref).abs().max() < 1e-4
        for blk in vlm.xattn.values():
            blk.attn_gate.zero_(), blk.ff_gate.zero_()
        gated0 = vlm.lm_logits(vlm(vlm.embed_tokens(ids), pos, media=media, media_pos=media_pos)[0])
        assert torch.equal(gated0, vlm.lm_logits(vlm(vlm.embed_tokens(ids), pos)[0]))
        assert (gated0 - plain).abs().max() < 1e-4


def test_openflamingo_bad_keys(tmp_path):
    openflamingo_folder(tmp_path / "a", seed=1)
    _rewrite_safetensors(tmp_path / "a", lambda t: t.pop("perceiver.layers.1.0.to_kv.weight"))
    with pytest.raises(ValueError, match=r"missing .*resampler\.layers\.1\.attn\.[kv]_proj\.weight"):
        backbones.load_vlm(str(tmp_path / "a"))
    _, _, sd = openflamingo_folder(tmp_path / "b", seed=1)  # a cross-attention where config.json has none
    key = "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn_gate"
    _rewrite_safetensors(tmp_path / "b", lambda t: t.update({key: torch.zeros(1)}))
    with pytest.raises(ValueError, match="do not belong"):
        backbones.load_vlm(str(tmp_path / "b"))
    openflamingo_folder(tmp_path / "c", seed=1)
    _rewrite_safetensors(tmp_path / "c", lambda t: t.update(
        {"vision_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * 32, 16)}))
    with pytest.raises(ValueError, match=r"in_proj_weight' .* has shape \(96, 16\), expected \(96, 32\)"):
        backbones.load_vlm(str(tmp_path / "c"))


def test_vla_on_an_openflamingo_folder(tmp_path):
    """A converted OpenFlamingo folder (MPT tokenizer.json with <|endofchunk|>, <image>, <PAD>) as --backbone:
    a policy_head train step reaches the cross-attention gates, checkpoint, Policy.from_pretrained, act."""
    import numpy as np
    import vla
    tk = pytest.importorskip("tokenizers", reason="MPT's tokenizer.json is read with the `tokenizers` package")
    folder = tmp_path / "of"
    openflamingo_folder(folder, seed=2, mpt=dict(vocab_size=300), wrapped=False)  # the docs' merge layout
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.ByteLevel(add_prefix_space=False), tk.decoders.ByteLevel()
    tok.train_from_iterator(LINES, tk.trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endofchunk|>", "<image>", "<PAD>"])
    tok.save(str(folder / "tokenizer.json"))
    c = vla.VLAConfig.tiny(backbone=str(folder), image_size=28, formulation="policy_head")
    net = vla.VLA(c)
    bb = net.backbone
    assert bb.family == "openflamingo" and bb.tokenizer.decode(bb.tokenizer.encode("open the drawer")) == \
        "open the drawer" and bb.tokenizer.pad_id == tok.token_to_id("<PAD>") < bb.vocab_size
    ids = bb.tokenizer.encode(bb.prompt("open the drawer"))  # RoboFlamingo's "<image>{instr}<|endofchunk|>"
    assert ids[0] == tok.token_to_id("<image>") and ids[-1] == tok.token_to_id("<|endofchunk|>")
    H, L, V = c.window, c.chunk, len(c.views)
    batch = {"images": torch.randint(0, 255, (2, H, V, 3, 28, 28), dtype=torch.uint8),
             "actions": torch.rand(2, H, L, 7) * 2 - 1, "action_mask": torch.ones(2, H, L, dtype=torch.bool),
             "instruction": ["open the drawer", "push the block"]}
    loss, _ = net(batch)
    loss.backward()
    assert torch.isfinite(loss) and bb.xattn["1"].attn_gate.grad is not None
    stats = {"d": {k: [v] * 7 for k, v in dict(q01=-1.0, q99=1.0, mean=0.0, std=1.0, min=-1.0, max=1.0).items()}}
    vla.save_checkpoint(tmp_path / "run", net, stats)
    policy = vla.Policy.from_pretrained(tmp_path / "run", dataset_key="d")
    obs = {"static": np.zeros((40, 40, 3), np.uint8), "wrist": np.zeros((40, 40, 3), np.uint8)}
    assert policy.act(obs, "open the drawer").shape == (7,)


def test_mpt_kv_cache_matches_the_full_pass(tmp_path):
    openflamingo_folder(tmp_path, seed=4)
    vlm = backbones.load_vlm(str(tmp_path))
    x = vlm.embed_tokens(_mpt_inputs(4)[0])
    with torch.no_grad():
        full, _ = vlm(x, None)
        head, cache = vlm(x[:, :6], None)
        tail, cache = vlm(x[:, 6:], None, cache)
    assert (torch.cat([head, tail], 1) - full).abs().max() < 1e-5 and cache[0][0].shape[2] == x.shape[1]


def test_openflamingo_3b_maps_key_for_key():
    """At full size on the meta device: open_clip's ViT-L/14 visual + transformers' MPT at MPT-1B's dimensions
    (vocab resized to 50280 by OpenFlamingo's 3 added tokens) + the perceiver and 24 cross-attention blocks under
    OpenFlamingo's names cover every parameter of backbones' default openflamingo model, shape for shape."""
    import open_clip
    mpt = dict(model_type="mpt", d_model=2048, n_heads=16, n_layers=24, vocab_size=50280, max_seq_len=2048)
    with torch.device("meta"):
        visual = open_clip.transformer.VisionTransformer(image_size=224, patch_size=14, width=1024, layers=24,
                                                         heads=16, mlp_ratio=4.0, output_dim=768)
        lm = transformers.MptForCausalLM(transformers.MptConfig(**mpt))
        ours = backbones.openflamingo_from_config(dict(model_type="openflamingo", text_config=mpt))
    shapes = {"vision_encoder." + k: v.shape for k, v in visual.state_dict().items()}
    shapes.update({"lang_encoder." + re.sub(r"(blocks\.\d+)\.", r"\1.decoder_layer.", k): v.shape
                   for k, v in lm.state_dict().items()})
    inner, d, w = 512, 2048, 1024  # 8 heads x 64
    shapes["perceiver.latents"] = (64, w)
    for i in range(6):
        b = f"perceiver.layers.{i}."
        shapes.update({b + "0.to_q.weight": (inner, w), b + "0.to_kv.weight": (2 * inner, w),
                       b + "0.to_out.weight": (w, inner), b + "1.1.weight": (4 * w, w), b + "1.3.weight": (w, 4 * w)})
        shapes.update({b + n + s: (w,) for n in ("0.norm_media.", "0.norm_latents.", "1.0.")
                       for s in ("weight", "bias")})
    shapes.update({"perceiver.norm.weight": (w,), "perceiver.norm.bias": (w,)})
    for i in range(24):
        b = f"lang_encoder.transformer.blocks.{i}.gated_cross_attn_layer."
        shapes.update({b + "attn.to_q.weight": (inner, d), b + "attn.to_kv.weight": (2 * inner, w),
                       b + "attn.to_out.weight": (d, inner), b + "ff.1.weight": (4 * d, d),
                       b + "ff.3.weight": (d, 4 * d), b + "attn_gate": (1,), b + "ff_gate": (1,)})
        shapes.update({b + n + s: (d,) for n in ("attn.norm.", "ff.0.") for s in ("weight", "bias")})
    params = dict(ours.named_parameters())
    used = set()
    for key, shape in shapes.items():
        for name, _, n in backbones.openflamingo_key_to_ours(key):
            if backbones._unused_checkpoint_key(ours, name):
                continue
            assert name in params, f"{key} -> {name} has no parameter"
            assert (n * params[name].shape[0], *params[name].shape[1:]) == tuple(shape), key
            used.add(name)
    assert used == set(params)
    total = sum(p.numel() for p in params.values()) / 1e9
    assert 2.5 < total < 2.6, total  # ViT-L 0.30 B + MPT-1B 1.31 B + cross-attention 0.88 B + perceiver 0.06 B


def test_run_directory_alone_rebuilds_a_folder_backbone(tmp_path):
    """A run trained on a Hugging Face folder keeps that folder's config and tokenizer (not its weights) in
    RUN/backbone/, so the run loads after the folder is gone, with the run's weights, to the same actions."""
    import shutil
    import numpy as np
    import vla
    folder, _ = _kosmos_folder(tmp_path, seed=6)
    net = vla.VLA(vla.VLAConfig.tiny(backbone=str(folder), image_size=56, formulation="policy_head")).eval()
    with torch.no_grad():
        net.backbone.lm.layers[0].attn.q_proj.weight.add_(0.5)  # "trained": differs from the folder's weights
    stats = {"d": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7,
                   "max": [1.0] * 7}}
    vla.save_checkpoint(tmp_path / "run", net, stats)
    kept = sorted(p.name for p in (tmp_path / "run" / "backbone").iterdir())
    assert "config.json" in kept and not any(n.endswith(".safetensors") for n in kept)
    shutil.rmtree(folder)
    policy = vla.Policy.from_pretrained(tmp_path / "run", dataset_key="d", execution="first")
    for k, v in net.state_dict().items():
        assert torch.equal(policy.vla.state_dict()[k], v), k
    ref = vla.Policy(net, stats, execution="first")
    rng = np.random.default_rng(0)
    obs = {"static": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8),
           "wrist": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)}
    np.testing.assert_allclose(policy.act(obs, "open the drawer"), ref.act(obs, "open the drawer"), atol=1e-5)
