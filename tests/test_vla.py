"""The VLA model part of vla.py: the four formulations, MoE, the closed-loop Policy and checkpoints.

Every model here is a micro version of the `tiny` preset (32 px images, 4 image tokens per view, d = 64) so each
test runs in a few seconds on one CPU core.
"""

import numpy as np
import pytest
import torch

import data
import vla
from vla import VLA, Policy, VLAConfig

MICRO = dict(image_size=32, head_width=64, head_layers=1, head_heads=2, head_mlp=(64,), window=3, chunk=3,
             shift_aug=False, backbone_kwargs=dict(patch=8, vision_dim=32, vision_layers=1, vision_heads=2, d=64,
                                                   layers=2, heads=2))
INSTR = ["pick up the red block", "open the drawer"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def micro(**kw):
    torch.manual_seed(0)
    return VLA(VLAConfig.tiny(**{**MICRO, **kw}))


def make_batch(B=2, H=3, L=3, S=32, V=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    pose = torch.rand(B, H, L, 6, generator=g) * 1.6 - 0.8
    grip = torch.randint(0, 2, (B, H, L, 1), generator=g).float() * 2 - 1
    return {"images": torch.randint(0, 256, (B, H, V, 3, S, S), dtype=torch.uint8, generator=g),
            "actions": torch.cat([pose, grip], -1), "action_mask": torch.ones(B, H, L, dtype=torch.bool),
            "instruction": INSTR[:B]}


def obs_of(images, t):
    """Policy observation for frame t of images (1, H, V, 3, S, S) (already at size S: resize is the identity)."""
    return {v: images[0, t, i].permute(1, 2, 0).numpy() for i, v in enumerate(("static", "wrist"))}


STATS = {"toy": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mean": [0.0] * 7, "std": [1.0] * 7,
                 "min": [-1.0] * 7, "max": [1.0] * 7}}


def overfit(model, batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    losses = []
    for _ in range(steps):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kw,steps", [
    (dict(formulation="policy_head", head="lstm"), 120),
    (dict(formulation="policy_head", head="gpt"), 200),
    (dict(formulation="policy_head", head="mlp"), 250),
    (dict(formulation="interleaved"), 200),
    (dict(formulation="one_step_continuous", window=1), 120),
    (dict(formulation="one_step_continuous", window=1, moe=True), 120),
    (dict(formulation="one_step_discrete", window=1), 150),
], ids=["policy_head-lstm", "policy_head-gpt", "policy_head-mlp", "interleaved", "one_step_continuous", "moe",
        "one_step_discrete"])
def test_each_formulation_overfits_a_fixed_batch(kw, steps):
    model = micro(**kw).train()
    losses = overfit(model, make_batch(H=model.config.window), steps)
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])


def test_flow_matching_vla_with_moe_trains():
    """Flow + MoE (pi0's setting, Table IIb) end to end; the flow loss is compared at fixed noise and times."""
    model = micro(formulation="one_step_continuous", window=1, moe=True, action_loss="flow")
    batch = make_batch(H=1)

    def eval_loss():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return sum(model(batch, generator=g)[0].item() for _ in range(4)) / 4
    before = eval_loss()
    overfit(model, batch, 600)
    after = eval_loss()
    # flow losses keep a hard small-t part (see tests/test_heads.py), hence 10x here rather than 100x
    assert after < before / 10, (before, after)
    a = model.eval().predict(batch["images"], batch["instruction"], torch.Generator().manual_seed(3))
    b = model.predict(batch["images"], batch["instruction"], torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # seeded sampling is deterministic
    assert (a - batch["actions"]).abs().mean() < 0.15


def test_discrete_decodes_the_whole_chunk_after_overfitting():
    model = micro(formulation="one_step_discrete", window=1, chunk=2)
    batch = make_batch(H=1, L=2)
    overfit(model, batch, 150)
    at = model.action_tokenizer
    for b in range(2):
        chunk = model.eval().decode_chunk(batch["images"][b:b + 1, 0], INSTR[b])  # (1, L, 7), 7·L tokens
        torch.testing.assert_close(chunk[0], at.decode(at.encode(batch["actions"][b, 0])))


@pytest.mark.parametrize("head", ["lstm", "gpt"])
def test_policy_head_streaming_equals_batch(head):
    """Feeding frames one at a time (cached per-frame [LRN] features) == teacher-forced windows, at every step,
    also after the window is full (sliding window of the last H frames)."""
    model = micro(formulation="policy_head", head=head).eval()
    H = model.config.window
    images = make_batch(B=1, H=6)["images"]
    full = model.predict(images[:, :H], INSTR[:1])  # (1, H, L, 7)
    cached, naive = Policy(model, STATS, execution="first"), Policy(model, STATS, execution="first", cache=False)
    for t in range(6):
        c1 = cached.predict_chunk(obs_of(images, t), INSTR[0])
        c2 = naive.predict_chunk(obs_of(images, t), INSTR[0])
        ref = model.predict(images[:, max(0, t - H + 1):t + 1], INSTR[:1])[0, -1]
        np.testing.assert_allclose(c1, ref.numpy(), atol=1e-5)
        np.testing.assert_allclose(c2, ref.numpy(), atol=1e-5)
        if t < H:
            np.testing.assert_allclose(c1, full[0, t].numpy(), atol=1e-5)


def test_interleaved_streaming_with_kv_cache_equals_batch():
    """The default Policy (per-frame image tokens cached) == the batch pass at every step; the opt-in KV cache
    (cache="approximate") only until the first eviction."""
    model = micro(formulation="interleaved").eval()
    H = model.config.window
    images = make_batch(B=1, H=5)["images"]
    full = model.predict(images[:, :H], INSTR[:1])  # one causal pass over H segments
    cached, naive = Policy(model, STATS, execution="first"), Policy(model, STATS, execution="first", cache=False)
    approx = Policy(model, STATS, execution="first", cache="approximate")
    for t in range(5):
        c1 = cached.predict_chunk(obs_of(images, t), INSTR[0])
        c2 = naive.predict_chunk(obs_of(images, t), INSTR[0])
        c3 = approx.predict_chunk(obs_of(images, t), INSTR[0])
        ref = model.predict(images[:, max(0, t - H + 1):t + 1], INSTR[:1])[0, -1]  # newest frame's [LRN]
        np.testing.assert_allclose(c1, ref.numpy(), atol=1e-5)
        np.testing.assert_allclose(c2, ref.numpy(), atol=1e-5)
        if t < H:  # the KV cache is exact until the first eviction (see VLA.interleaved_step)
            np.testing.assert_allclose(c3, full[0, t].numpy(), atol=1e-5)
            np.testing.assert_allclose(c3, ref.numpy(), atol=1e-5)
    assert len(cached.history) == H and not cached.kv_state  # the default keeps image tokens, no KV cache
    assert approx.kv_state["n_seg"] == H  # the cache holds at most H segments
    n = approx.kv_state["cache"][0][0].shape[2]
    assert n == H * (n // H)


def test_interleaved_is_causal():
    model = micro(formulation="interleaved").eval()
    images = make_batch(B=2, H=3)["images"]
    feats = model.interleaved_features(images, INSTR)  # (B, H, d)
    for t in range(2):
        other = images.clone()
        other[:, t + 1:] = 255 - other[:, t + 1:]  # perturb frames after t
        f2 = model.interleaved_features(other, INSTR)
        torch.testing.assert_close(f2[:, :t + 1], feats[:, :t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(f2[:, t + 1], feats[:, t + 1])


def test_interleaved_batch_with_different_instruction_lengths_matches_single_rows():
    """Rows are packed (segments back to back, padding only at the end), so batching changes nothing."""
    model = micro(formulation="interleaved").eval()
    images = make_batch(B=2, H=3)["images"]
    instr = ["go", "pick up the red block and put it in the drawer"]
    both = model.interleaved_features(images, instr)
    for b in range(2):
        torch.testing.assert_close(both[b], model.interleaved_features(images[b:b + 1], instr[b:b + 1])[0],
                                   atol=1e-5, rtol=1e-5)


def test_moe_leaves_the_vl_hidden_states_unchanged():
    model = micro(formulation="one_step_continuous", window=1, moe=True).eval()
    plain = micro(formulation="one_step_continuous", window=1).eval()
    plain.backbone.load_state_dict(model.backbone.state_dict())
    batch = make_batch(H=1)
    hidden, cache, valid, pos = model.vl_prefix(batch["images"][:, 0], INSTR)
    tok = plain.image_tokens(batch["images"][:, 0])
    x, valid2, _, _ = plain.sequences(tok, [plain.text_ids(s) for s in INSTR])
    ref, _ = plain.backbone(x, plain.positions(x))
    assert torch.equal(valid, valid2)
    torch.testing.assert_close(hidden[valid], ref[valid], atol=1e-6, rtol=0)
    # ...while the action tokens do read the VL tokens: other images give other actions
    out = model.expert.predict(cache, valid, pos)
    _, cache2, _, _ = model.vl_prefix(255 - batch["images"][:, 0], INSTR)
    assert not torch.allclose(model.expert.predict(cache2, valid, pos), out)


def test_views_are_ordered_wrist_first():
    model = micro(formulation="one_step_continuous", window=1).eval()
    images = make_batch(B=1, H=1)["images"][:, 0]  # (1, V=2, ...) in config.views order (static, wrist)
    tok = model.image_tokens(images)  # (1, 2*T, d)
    bb = model.backbone
    x = vla.data.normalize_images(images, bb.image_mean, bb.image_std)
    T = tok.shape[1] // 2
    torch.testing.assert_close(tok[:, :T], bb.encode_images(x[:, 1]))  # wrist
    torch.testing.assert_close(tok[:, T:], bb.encode_images(x[:, 0]))  # static


def test_chunk_execution_runs_the_model_once_per_chunk_and_unnormalizes(monkeypatch):
    model = micro(formulation="one_step_continuous", window=1, chunk=3).eval()
    calls = []
    orig = model.predict
    monkeypatch.setattr(model, "predict", lambda *a, **k: calls.append(1) or orig(*a, **k))
    pol = Policy(model, STATS, execution="chunk")
    images = make_batch(B=1, H=1)["images"]
    acts, chunks = [], []
    for t in range(6):
        acts.append(pol.act(obs_of(images, 0), INSTR[0]))
        if t % 3 == 0:
            chunks.append(pol.last_chunk.copy())
    assert len(calls) == 2
    expect = data.unnormalize_action(np.concatenate(chunks), STATS["toy"])
    np.testing.assert_allclose(np.stack(acts), expect, atol=1e-6)
    assert set(np.stack(acts)[:, 6].tolist()) <= {-1.0, 1.0}
    assert np.abs(np.stack(acts)[:, :6]).max() <= 0.5 + 1e-6  # inside [q01, q99]


def test_checkpoint_roundtrip(tmp_path):
    model = micro(formulation="policy_head", head="gpt").eval()
    vla.save_checkpoint(tmp_path, model, STATS, extra={"step": 3})
    assert {"model.safetensors", "config.json", "action_stats.json", "tokenizer.model"} <= set(
        p.name for p in tmp_path.iterdir())
    pol = Policy.from_pretrained(tmp_path, execution="first")
    ref = Policy(model, STATS, execution="first")
    images = make_batch(B=1, H=4)["images"]
    for t in range(4):
        np.testing.assert_allclose(pol.act(obs_of(images, t), INSTR[0]), ref.act(obs_of(images, t), INSTR[0]),
                                   atol=1e-6)
    assert pol.vla.backbone.tokenizer.encode("open the drawer") == model.backbone.tokenizer.encode("open the drawer")
    with pytest.raises(KeyError, match="no action statistics for dataset 'calvin'"):
        Policy.from_pretrained(tmp_path, dataset_key="calvin")
    with pytest.raises(ValueError, match="dataset_key"):
        Policy(model, {"a": STATS["toy"], "b": STATS["toy"]})
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Policy.from_pretrained(tmp_path / "nothing")


def test_weights_in_one_flat_buffer_and_tied_weights_save_and_load(tmp_path):
    """On CUDA, cuDNN packs an LSTM's weights into one flat buffer (flatten_parameters); safetensors'
    save_model refuses such views (found on an H200: the first CUDA checkpoint crashed). Rebuild that layout
    on the CPU, tie two weights as an LM head does, and check save_weights/load_weights round-trip both."""
    from safetensors.torch import save_model

    def make(seed):
        torch.manual_seed(seed)
        m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10, bias=False),
                                 "lstm": torch.nn.LSTM(4, 8, num_layers=1, batch_first=True)})
        m["head"].weight = m["emb"].weight  # tied, as an LM head
        return m
    net = make(0)
    weights = list(net["lstm"].parameters())
    flat = torch.cat([w.detach().flatten() for w in weights])
    offset = 0
    for name, w in list(net["lstm"].named_parameters()):  # every LSTM weight a view into `flat`
        setattr(net["lstm"], name, torch.nn.Parameter(flat[offset:offset + w.numel()].view_as(w)))
        offset += w.numel()
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in net["lstm"].parameters())
    with pytest.raises(RuntimeError, match="storage"):
        save_model(net, str(tmp_path / "refused.safetensors"))  # the reference library's behaviour
    vla.save_weights(net, str(tmp_path / "w.safetensors"))
    fresh = make(1)
    vla.load_weights(fresh, str(tmp_path / "w.safetensors"))
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert "head.weight" not in f.keys() and "emb.weight" in f.keys()  # the tied tensor is stored once
    with pytest.raises(RuntimeError, match="missing weights"):
        vla.load_weights(torch.nn.ModuleDict({"other": torch.nn.Linear(2, 2)}), str(tmp_path / "w.safetensors"))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="moe and flow do not apply"):
        micro(formulation="one_step_discrete", action_loss="flow")
    with pytest.raises(ValueError, match="one_step_continuous"):
        micro(formulation="policy_head", moe=True)
    with pytest.raises(ValueError, match="formulation must be one of"):
        micro(formulation="two_step")
    model = micro(formulation="policy_head")
    batch = make_batch()
    batch["images"] = batch["images"].float()
    with pytest.raises(ValueError, match="expected uint8 images"):
        model(batch)
    batch = make_batch(L=2)
    with pytest.raises(ValueError, match="chunk=3"):
        model(batch)
    pol = Policy(model.eval(), STATS)
    with pytest.raises(KeyError, match="wrist"):
        pol.act({"static": np.zeros((32, 32, 3), np.uint8)}, "go")


def test_train_flags_freeze_backbone_parts():
    model = micro(train_vision=False, train_embeddings=False)
    groups = model.backbone.trainable_groups()
    assert not any(p.requires_grad for p in groups["vision"] + groups["embeddings"])
    assert all(p.requires_grad for p in groups["language"])
    ids = {id(p) for p in model.trainable_parameters()}
    assert id(model.lrn) in ids and not any(id(p) in ids for p in groups["vision"])


def test_flow_policy_is_reproducible_per_seed():
    model = micro(formulation="policy_head", head="lstm", action_loss="flow").eval()
    images = make_batch(B=1, H=3)["images"]

    def episode(pol):
        pol.reset()
        return np.stack([pol.act(obs_of(images, t), INSTR[0]) for t in range(3)])
    a, b = Policy(model, STATS, execution="first", seed=1), Policy(model, STATS, execution="first", seed=1)
    ep = episode(a)
    np.testing.assert_array_equal(ep, episode(b))
    np.testing.assert_array_equal(ep, episode(a))  # reset() reseeds the noise
    assert not np.array_equal(ep, episode(Policy(model, STATS, execution="first", seed=2)))
