"""MoonDream (backbones.py, "MoonDream" section): parity with code we did not write, on tiny random configs.

Oracles: transformers' PhiForCausalLM (the Phi-1.5 decoder), transformers' SiglipVisionModel (the tower of the
`text_config` revisions: LayerNorm eps 1e-5, tanh GELU), timm's VisionTransformer built the way moondream1's
vision_encoder.py builds `vit_so400m_patch14_siglip_384` (patch conv replaced by a Linear over flattened patches,
MAP head replaced by Identity: the `phi_config` revisions), and the projector fc2(gelu(fc1 x)) written out here.
Every test writes a folder in the released layout (moondream's state_dict names, config.json with model_type
"moondream1") and loads it with backbones.load_vlm.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones

transformers = pytest.importorskip(
    "transformers", reason="transformers is the numerical oracle for the pretrained backbones; "
                           "install it with `pip install -r requirements-dev.txt`")

PHI = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VIS = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
           image_size=28)
V = "vision_encoder.encoder.model.visual."


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # every weight away from its init value (norms at 1, biases at 0 would hide errors)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def phi_oracle(seed, **over):
    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(**{**PHI, **over})
    return perturb(transformers.PhiForCausalLM._from_config(cfg, attn_implementation="eager"), seed)


def phi_to_moondream(sd):
    """transformers' Phi names -> moondream's text_model.* (fused [Q; K; V] Wqkv, final LN inside lm_head)."""
    out = {}
    for k, v in sd.items():
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        if ".self_attn.q_proj." in k:
            v = torch.cat([v, sd[k.replace("q_proj", "k_proj")], sd[k.replace("q_proj", "v_proj")]])
        for a, b in (("model.embed_tokens.", "transformer.embd.wte."), ("model.layers.", "transformer.h."),
                     (".input_layernorm.", ".ln."), (".self_attn.q_proj.", ".mixer.Wqkv."),
                     (".self_attn.dense.", ".mixer.out_proj."), ("model.final_layernorm.", "lm_head.ln."),
                     ("lm_head.weight", "lm_head.linear.weight"), ("lm_head.bias", "lm_head.linear.bias")):
            k = k.replace(a, b)
        out["text_model." + k] = v
    return out


def siglip_oracle(seed):
    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(**VIS, layer_norm_eps=1e-5, hidden_act="gelu_pytorch_tanh")
    return perturb(transformers.SiglipVisionModel._from_config(cfg, attn_implementation="eager"), seed)


def siglip_to_moondream(sd):
    """transformers' SigLIP names -> moondream's own ViT (2024-04 on): flat patch Linear, pos_embed (1, P, w),
    fused qkv, proj, norm1/2, norm."""
    out = {}
    for k, v in sd.items():
        k = k.replace("vision_model.", "")
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        if ".self_attn.q_proj." in k:
            v = torch.cat([v, sd["vision_model." + k.replace("q_proj", "k_proj")],
                           sd["vision_model." + k.replace("q_proj", "v_proj")]])
        if k == "embeddings.patch_embedding.weight":
            v = v.reshape(len(v), -1)
        if k == "embeddings.position_embedding.weight":
            v = v[None]
        for a, b in (("embeddings.patch_embedding.", "patch_embed.linear."),
                     ("embeddings.position_embedding.weight", "pos_embed"), ("encoder.layers.", "blocks."),
                     (".self_attn.q_proj.", ".attn.qkv."), (".self_attn.out_proj.", ".attn.proj."),
                     (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), ("post_layernorm.", "norm.")):
            k = k.replace(a, b)
        out[V + k] = v
    return out


def patchify(x, p=14):  # moondream1: rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)")
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), -1)


def timm_tower(seed):
    """moondream1's tower: timm ViT (no class token, MAP head -> Identity, patch conv -> Linear over flattened
    patches), here at toy size. Takes patchified input, as moondream1's VisionEncoder does."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    w, p = VIS["hidden_size"], VIS["patch_size"]
    m = VisionTransformer(img_size=VIS["image_size"], patch_size=p, embed_dim=w, depth=VIS["num_hidden_layers"],
                          num_heads=VIS["num_attention_heads"], mlp_ratio=VIS["intermediate_size"] / w,
                          class_token=False, global_pool="map", num_classes=0)
    assert timm.__version__ and isinstance(m.blocks[0].mlp.act, torch.nn.GELU)  # exact GELU, as the so400m model
    conv = m.patch_embed.proj
    holder = torch.nn.Module()
    holder.linear = torch.nn.Linear(3 * p * p, w)
    holder.linear.weight.data, holder.linear.bias.data = conv.weight.data.reshape(w, -1), conv.bias.data
    holder.forward = holder.linear.forward
    m.patch_embed, m.attn_pool = holder, torch.nn.Identity()
    return perturb(m, seed)


def projector(sd, f, exact):
    """moondream's VisionProjection.mlp by hand: fc2(gelu(fc1 f)) (exact GELU with timm, tanh from 2024-04)."""
    w = lambda n: sd["vision_encoder.projection.mlp." + n]  # noqa: E731
    h = F.gelu(F.linear(f, w("fc1.weight"), w("fc1.bias")), approximate="none" if exact else "tanh")
    return F.linear(h, w("fc2.weight"), w("fc2.bias"))


def moondream_folder(folder, seed, timm_era=False, phi=None):
    """A tiny random MoonDream in the released layout -> (folder, tensors, vision oracle, Phi oracle).
    timm_era: moondream1 / moondream2 up to 2024-03-13 (`phi_config`, projector on 1152-d features); else the
    2024-05-20 .. 08-26 layout (`text_config`, projector on [global, global] = 2 x 1152)."""
    from safetensors.torch import save_file
    phi = {**PHI, **(phi or {})}
    lm = phi_oracle(seed, **phi)
    vis = timm_tower(seed + 1) if timm_era else siglip_oracle(seed + 1)
    sd = phi_to_moondream(lm.state_dict())
    if timm_era:
        sd.update({V + k: v for k, v in vis.state_dict().items()})
    else:
        sd.update(siglip_to_moondream(vis.state_dict()))
    g = torch.Generator().manual_seed(seed + 2)
    d, w = phi["hidden_size"], VIS["hidden_size"] * (1 if timm_era else 2)
    for n, shape in (("fc1.weight", (4 * d, w)), ("fc1.bias", (4 * d,)), ("fc2.weight", (d, 4 * d)),
                     ("fc2.bias", (d,))):
        sd["vision_encoder.projection.mlp." + n] = torch.randn(*shape, generator=g) * 0.2
    sd["region_model.position_encoder.weight"] = torch.zeros(d, 4)  # 2024-08-26's region head: ignored
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    text = dict(phi, model_type="phi", partial_rotary_factor=lm.config.partial_rotary_factor)
    cfg = dict(architectures=["Moondream"], model_type="moondream1", torch_dtype="float32",
               vision_config=VIS, **{"phi_config" if timm_era else "text_config": text})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, sd, vis, lm


def last_block_output(lm, embeds):
    """transformers' Phi: the last decoder layer's output (before final_layernorm) and the logits."""
    got = {}
    hook = lm.model.layers[-1].register_forward_hook(lambda m, a, out: got.update(h=out[0] if isinstance(
        out, tuple) else out))
    try:
        logits = lm(inputs_embeds=embeds).logits
    finally:
        hook.remove()
    return got["h"], logits


@pytest.mark.parametrize("over", [{}, dict(partial_rotary_factor=0.25, num_hidden_layers=3),
                                  dict(partial_rotary_factor=1.0, num_attention_heads=2)])
def test_phi_matches_transformers(over, tmp_path):
    """Decoder alone: logits and the pre-LN last hidden state (moondream's hidden_states[-1]), KV cache."""
    folder, _, _, lm = moondream_folder(tmp_path / "md", seed=len(str(over)), phi=over)
    vlm = backbones.load_vlm(str(folder))
    ids = torch.randint(0, PHI["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9).expand(2, -1)
    with torch.no_grad():
        ref_h, ref = last_block_output(lm, lm.model.embed_tokens(ids))
        h, _ = vlm(vlm.embed_tokens(ids), pos)
        ours = vlm.lm_logits(h)
        head, cache = vlm(vlm.embed_tokens(ids[:, :5]), pos[:, :5])
        tail, _ = vlm(vlm.embed_tokens(ids[:, 5:]), pos[:, 5:], cache)
    d_logits, d_hidden = (ours - ref).abs().max().item(), (h - ref_h).abs().max().item()
    print(f"phi {over}: max |logit diff| {d_logits:.2e}, max |pre-LN hidden diff| {d_hidden:.2e}")
    assert ref.abs().max() > 0.1 and d_logits < 1e-5 and d_hidden < 1e-5
    assert (torch.cat([head, tail], 1) - h).abs().max() < 1e-5


@pytest.mark.parametrize("timm_era", [False, True])
def test_tower_projector_and_whole_model_match(timm_era, tmp_path):
    """Tower against its oracle, projector against the formula, then [BOS][729-style image tokens][text] through
    our model against transformers' Phi fed the oracle image embeddings."""
    folder, sd, vis, lm = moondream_folder(tmp_path / "md", seed=3, timm_era=timm_era)
    vlm = backbones.load_vlm(str(folder))
    assert vlm.crops == (not timm_era) and vlm.vision.layers[0].norm1.eps == (1e-6 if timm_era else 1e-5)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, 28, 28, generator=g)
    ids = torch.randint(1, PHI["vocab_size"], (2, 6), generator=g)
    bos = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        f_ref = vis(patchify(px)) if timm_era else vis(pixel_values=px).last_hidden_state  # (2, 4, w)
        f = vlm.vision.post_layernorm(vlm.vision(px))
        img_ref = projector(sd, f_ref if timm_era else torch.cat([f_ref, f_ref], -1), exact=timm_era)
        img = vlm.encode_images(px)
        emb = lambda t: lm.model.embed_tokens(t)  # noqa: E731
        ref_h, ref = last_block_output(lm, torch.cat([emb(bos), img_ref, emb(ids)], 1))
        x = torch.cat([vlm.embed_tokens(bos), img, vlm.embed_tokens(ids)], 1)
        h, _ = vlm(x, torch.arange(x.shape[1]).expand(2, -1))
        logits = vlm.lm_logits(h)
    diffs = [(a - b).abs().max().item() for a, b in ((f, f_ref), (img, img_ref), (logits, ref), (h, ref_h))]
    print(f"{'timm' if timm_era else 'siglip'} era: tower {diffs[0]:.2e}, tower+projector {diffs[1]:.2e}, "
          f"whole-model logits {diffs[2]:.2e}, pre-LN hidden {diffs[3]:.2e}")
    assert img.shape == (2, 4, PHI["hidden_size"]) and vlm.n_image_tokens == 4
    assert max(diffs) < 1e-5 and ref.abs().max() > 0.1


def test_released_layouts_map_key_for_key():
    """At full size on the meta device: every tensor of the released layouts (moondream1 / 2024-03: 1152-d
    projector input; 2024-05-20 .. 08-26: 2304), under the names of moondream's vision_encoder.py and
    modeling_phi.py, maps onto one of our parameters with its shape, and every parameter is covered."""
    w, d, n_v, n_t = 1152, 2048, 27, 24
    for cfg, proj_in in (({"phi_config": {"model_type": "phi-msft"}}, w),
                         ({"text_config": {"model_type": "phi"}}, 2 * w)):
        shapes = {V + "patch_embed.linear.weight": (w, 588), V + "patch_embed.linear.bias": (w,),
                  V + "pos_embed": (1, 729, w), V + "norm.weight": (w,), V + "norm.bias": (w,),
                  "vision_encoder.projection.mlp.fc1.weight": (4 * d, proj_in),
                  "vision_encoder.projection.mlp.fc1.bias": (4 * d,),
                  "vision_encoder.projection.mlp.fc2.weight": (d, 4 * d),
                  "vision_encoder.projection.mlp.fc2.bias": (d,),
                  "text_model.transformer.embd.wte.weight": (51200, d), "text_model.lm_head.ln.weight": (d,),
                  "text_model.lm_head.ln.bias": (d,), "text_model.lm_head.linear.weight": (51200, d),
                  "text_model.lm_head.linear.bias": (51200,)}
        for i in range(n_v):
            b = f"{V}blocks.{i}."
            shapes.update({b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
                           b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                           b + "mlp.fc1.weight": (4304, w), b + "mlp.fc1.bias": (4304,),
                           b + "mlp.fc2.weight": (w, 4304), b + "mlp.fc2.bias": (w,)})
            shapes.update({b + n + s: (w,) for n in ("norm1.", "norm2.") for s in ("weight", "bias")})
        for i in range(n_t):
            b = f"text_model.transformer.h.{i}."
            shapes.update({b + "ln.weight": (d,), b + "ln.bias": (d,), b + "mixer.Wqkv.weight": (3 * d, d),
                           b + "mixer.Wqkv.bias": (3 * d,), b + "mixer.out_proj.weight": (d, d),
                           b + "mixer.out_proj.bias": (d,), b + "mlp.fc1.weight": (8192, d),
                           b + "mlp.fc1.bias": (8192,), b + "mlp.fc2.weight": (d, 8192), b + "mlp.fc2.bias": (d,)})
        with torch.device("meta"):
            ours = backbones.MoondreamVLM(dict(model_type="moondream1", **cfg))
        params, used = dict(ours.named_parameters()), set()
        for key, shape in shapes.items():
            for name, _, n in backbones.moondream_key_to_ours(key):
                assert name in params, f"{key} -> {name} has no parameter"
                assert (n * params[name].shape[0], *params[name].shape[1:]) == shape, key
                used.add(name)
        assert used == set(params)
        assert backbones.moondream_key_to_ours("region_model.size_encoder.weight") == []
        total = sum(p.numel() for p in params.values()) / 1e9
        assert 1.85 < total < 1.87, total  # SigLIP so400m 0.41 B + projector 0.03 B + Phi-1.5 1.42 B
        assert ours.n_image_tokens == 729 and ours.image_size == 378 and ours.lm.rot == 32
    with torch.device("meta"):  # moondream1's phi-msft names: n_inner None = 4 d, rotary_dim 32 clipped to the
        m = backbones.MoondreamVLM(dict(model_type="moondream1", vision_config=VIS, phi_config=dict(  # head, vocab
            model_type="phi-msft", n_embd=32, n_head=4, n_layer=3, vocab_size=100)))  # padded to a multiple of 64
    assert (m.hidden_size, m.n_layers, m.vocab_size, m.lm.rot, m.lm.layers[0].mlp.fc1.out_features) == \
        (32, 3, 128, 8, 128)


def _tokenizer_json(path):
    """A GPT-2 style byte-level BPE tokenizer.json with <|endoftext|> (moondream's BOS = EOS), trained here."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.ByteLevel(add_prefix_space=False), tk.decoders.ByteLevel()
    lines = ["open the drawer", "push the button down", "press the button from the top", "pick up the block"] * 5
    tok.train_from_iterator(lines, tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


@pytest.mark.parametrize("resampler", [None, 64])
def test_vla_trains_and_acts_in_closed_loop(resampler, tmp_path):
    """The user flow on a released-layout folder: policy_head VLA (optionally with the 64-latent perceiver
    resampler the paper adds), a few AdamW steps lower the loss on a fixed batch, checkpoint, reload, then a
    short closed-loop Meta-World episode."""
    import vla
    folder, _, _, _ = moondream_folder(tmp_path / "md", seed=5, phi=dict(vocab_size=320))
    tok = _tokenizer_json(folder / "tokenizer.json")
    kw = {"resampler": resampler} if resampler else {}
    c = vla.VLAConfig.tiny(backbone=str(folder), image_size=28, formulation="policy_head", backbone_kwargs=kw)
    torch.manual_seed(0)
    net = vla.VLA(c)
    bb = net.backbone
    assert isinstance(bb, backbones.MoondreamVLM) and bb.tokenizer.bos_id == tok.token_to_id("<|endoftext|>")
    assert bb.tokenizer.decode(bb.tokenizer.encode("open the drawer")) == "open the drawer"
    assert bb.n_image_tokens == (resampler or 4)
    H, L, Vw = c.window, c.chunk, len(c.views)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 255, (2, H, Vw, 3, 28, 28), dtype=torch.uint8, generator=g),
             "actions": torch.rand(2, H, L, 7, generator=g) * 2 - 1,
             "action_mask": torch.ones(2, H, L, dtype=torch.bool), "instruction": ["open the drawer", "push it"]}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.config.shift_aug = False
    losses = []
    for _ in range(4):
        loss, _ = net(batch)
        opt.zero_grad()
        loss.backward()
        if resampler:
            assert bb.resampler.latents.grad is not None
        assert bb.lm.layers[0].attn.q_proj.weight.grad is not None and bb.vision.patch_embedding.weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    stats = {"metaworld": {k: [v] * 7 for k, v in dict(q01=-1.0, q99=1.0, mean=0.0, std=1.0, min=-1.0,
                                                        max=1.0).items()}}
    vla.save_checkpoint(tmp_path / "run", net, stats)
    policy = vla.Policy.from_pretrained(tmp_path / "run", dataset_key="metaworld", execution="first")
    for k, v in net.state_dict().items():
        assert torch.equal(policy.vla.state_dict()[k].cpu(), v), k
    pytest.importorskip("metaworld")
    import evaluate
    env = evaluate.MetaWorldEnv("button-press-topdown", image_size=32, max_steps=4)
    policy.reset()
    success, frames, actions = evaluate._rollout(env, 0, lambda obs, e: policy.act(obs, e.instruction), record=True)
    env.close()
    assert len(actions) == 4 and all(a.shape == (7,) and np.isfinite(a).all() for a in actions)


def test_revision_mismatch_and_unsupported_phi_are_clear_errors(tmp_path):
    """A 2304-d projector (text_config revisions) under a config that implies the 1152-d one: the error names
    the key and both shapes; Phi options moondream never had are refused by name."""
    folder, _, _, _ = moondream_folder(tmp_path / "md", seed=6)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["phi_config"] = cfg.pop("text_config")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"projection\.mlp\.fc1\.weight' .* has shape \(128, 48\), expected "
                                         r"\(128, 24\)"):
        backbones.load_vlm(str(folder))
    for bad in (dict(qk_layernorm=True), dict(rope_scaling={"type": "linear", "factor": 2.0})):
        with pytest.raises(ValueError, match="qk_layernorm, rope_scaling or tied embeddings is not supported"):
            backbones.MoondreamVLM(dict(model_type="moondream1", vision_config=VIS, text_config=dict(PHI, **bad)))
