"""The seams between parts, tried as a new user would (issue 14): the paper's own paths end to end at miniature
scale, and the fixes they needed.

- PaliGemma is a prefix-LM: our VLA's default mask against transformers' PaliGemma with token_type_ids on a
  tiny random configuration, for every formulation's sequences, in training and in the closed loop.
- CALVIN splits: `train.py --data SPLIT` and the required ep_start_end_ids.npy.
- SimplerEnv "put apple into drawer": RoboVLMs' instruction switch (as soon as the drawer is open) and the
  midpoint rule, on the double.
- Rehearsals (subprocesses running the real command lines, tiny model, a few steps): CALVIN split -> train.py ->
  evaluate.py --benchmark calvin; bridge_orig HDF5 -> train.py -> evaluate.py --benchmark simpler --task widowx;
  co-training on two HDF5 files -> post-training with --init-from -> evaluation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
import data
import vla

ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).parent / "fakes"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared CI cores: intra-op threads only add contention for models this small
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------------------------------------
# PaliGemma's prefix-LM mask, against transformers (token_type_ids 0 = prefix, 1 = causal suffix)
# -----------------------------------------------------------------------------------------------------------

S = 32  # image size: 2 x 2 patches of 16 px -> 4 image tokens per view
LRN_STANDIN = 7  # a vocabulary id whose embedding the [LRN] token is set to, so transformers can see it as a token


@pytest.fixture(scope="module")
def paligemma_folder(tmp_path_factory):
    """A tiny random transformers PaliGemma (the tiny-paligemma architecture) saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle (requirements-dev.txt)")
    vocab = backbones.build_backbone("tiny-paligemma", image_size=S).vocab_size
    cfg = backbones.tiny_family_config("paligemma", S, vocab)
    cfg.pop("model_type")
    torch.manual_seed(0)
    hf = transformers.PaliGemmaForConditionalGeneration._from_config(transformers.PaliGemmaConfig(**cfg),
                                                                      attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the init (zero biases, unit norms)
    folder = tmp_path_factory.mktemp("paligemma")
    hf.save_pretrained(folder)
    return folder, hf


def paligemma_vla(folder, **overrides):
    """A VLA whose backbone is the transformers model's folder (our loader), tokenizer of tiny-paligemma."""
    net = vla.VLA(vla.VLAConfig.tiny(backbone="tiny-paligemma", image_size=S, views=("static",), **overrides))
    bb = backbones.load_vlm(str(folder))
    bb.tokenizer, bb.tokenizer_filename = net.backbone.tokenizer, net.backbone.tokenizer_filename
    net.backbone = bb
    with torch.no_grad():
        net.lrn.copy_(bb.embed_tokens(torch.tensor(LRN_STANDIN)))  # [LRN] == that token's layer-0 input
    return net.eval()


def hf_logits(hf, net, images, rows):
    """transformers' logits for token rows [(prefix ids, suffix ids)] with image placeholders (-1) in the ids:
    token_type_ids 0 on the prefix, 1 on the suffix, labels given (its prefix-LM training mask); right padding.
    images uint8 (N, 3, S, S) in placeholder order."""
    bb = net.backbone
    T = max(len(p) + len(s) for p, s in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    types, am = torch.ones_like(ids), torch.zeros_like(ids)
    for i, (p, s) in enumerate(rows):
        ids[i, :len(p) + len(s)] = torch.tensor([bb.image_token_id if t == -1 else t for t in p + s])
        types[i, :len(p)], am[i, :len(p) + len(s)] = 0, 1
    pixels = data.normalize_images(images, bb.image_mean, bb.image_std)
    with torch.no_grad():
        # the inner model (no loss): labels only switch on its prefix-LM mask, as in transformers' training
        out = hf.model(input_ids=ids, pixel_values=pixels, attention_mask=am, token_type_ids=types, labels=ids)
    return hf.lm_head(out.last_hidden_state), am.bool()


def _segment(net, instruction):
    """[BOS] [image placeholders] prompt | [LRN] [EOS] as (prefix, suffix) ids."""
    tok = net.backbone.tokenizer
    return [tok.bos_id] + [-1] * net.backbone.n_image_tokens + net.text_ids(instruction), [LRN_STANDIN, tok.eos_id]


INSTR = ["open the drawer", "push the blue block to the left side of the table"]  # different lengths: padding


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 1, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_paligemma_policy_head_features_match_transformers_prefix_lm(paligemma_folder):
    folder, hf = paligemma_folder
    net = paligemma_vla(folder, formulation="policy_head", head="mlp")
    assert net.config.attention == "auto" and net.prefix_lm  # PaliGemma's default is the prefix-LM
    img = _images(2)
    ours = net.backbone.lm_logits(net.frame_features(img[:, None], INSTR)[:, 0])  # (2, vocab) at [LRN]
    ref, _ = hf_logits(hf, net, img[:, 0], [_segment(net, s) for s in INSTR])
    at = [len(_segment(net, s)[0]) for s in INSTR]  # [LRN]'s position in each row
    ref = torch.stack([ref[i, at[i]] for i in range(2)])
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max() < 1e-4
    causal = paligemma_vla(folder, formulation="policy_head", head="mlp", attention="causal")
    assert not causal.prefix_lm
    diff = (causal.backbone.lm_logits(causal.frame_features(img[:, None], INSTR)[:, 0]) - ref).abs().max()
    assert diff > 1e-3  # the causal option is a different model (what this project ran before)


def test_paligemma_discrete_training_logits_match_transformers(paligemma_folder):
    """one_step_discrete: prefix [BOS] images prompt, causal action tokens + EOS (teacher forcing)."""
    folder, hf = paligemma_folder
    net = paligemma_vla(folder, formulation="one_step_discrete", chunk=2)
    seen = {}
    net.backbone.register_forward_hook(lambda m, a, out: seen.update(hidden=out[0]))  # returns None: output kept
    acts = torch.rand(2, 1, 2, 7) * 2 - 1
    batch = {"images": _images(2, 1)[:, None], "instruction": INSTR, "actions": acts,
             "action_mask": torch.ones(2, 1, 2, dtype=torch.bool)}
    with torch.no_grad():
        net(batch)
    ours = net.backbone.lm_logits(seen["hidden"])
    act_ids = net.action_tokenizer.encode(acts.flatten(0, 1)).flatten(1).tolist()
    tok = net.backbone.tokenizer
    rows = [([tok.bos_id] + [-1] * net.backbone.n_image_tokens + net.text_ids(s), act_ids[i] + [tok.eos_id])
            for i, s in enumerate(INSTR)]
    ref, real = hf_logits(hf, net, batch["images"][:, 0, 0], rows)
    assert (ours[real] - ref[real]).abs().max() < 1e-4
    # decoding (KV cache after a bidirectional prompt) gives the argmax chunk of the same model
    chunk = net.decode_chunk(batch["images"][0, 0][None], INSTR[0])
    assert chunk.shape == (1, 2, 7)


def test_paligemma_interleaved_prefix_is_the_first_frame_only(paligemma_folder):
    """interleaved: [BOS] img prompt of the FIRST frame is the prefix; from its [LRN] on everything is causal (a
    later frame's tokens must never be seen by an earlier one). Training pass, recompute and streaming agree."""
    folder, hf = paligemma_folder
    H = 3
    net = paligemma_vla(folder, formulation="interleaved", window=H)
    img = _images(2 * H, 2).view(2, H, 1, 3, S, S)
    ours = net.backbone.lm_logits(net.interleaved_features(img, INSTR))  # (2, H, vocab)
    rows, at = [], []
    for s in INSTR:
        p, x = _segment(net, s)
        rows.append((p, x + (p + x) * (H - 1)))
        at.append([len(p) + t * len(p + x) for t in range(H)])
    ref, _ = hf_logits(hf, net, img.flatten(0, 1)[:, 0], rows)
    ref = torch.stack([ref[i, at[i]] for i in range(2)])  # (2, H, vocab)
    assert (ours - ref).abs().max() < 1e-4
    # closed loop: recompute over the window, and the streaming cache while it holds <= H frames
    for cache in (False, True):
        pol = vla.Policy(net, {"d": vla.compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (50, 7)))},
                         cache=cache)
        for t in range(H):
            pol.predict_chunk({"static": img[0, t, 0].permute(1, 2, 0).numpy()}, INSTR[0])
            want = net.head.predict(net.interleaved_features(img[:1, :t + 1], INSTR[:1]), None, 1, last=True)[0, -1]
            assert np.abs(pol.last_chunk - want.numpy()).max() < 1e-4, (cache, t)


def test_paligemma_moe_prefix_is_bidirectional(paligemma_folder):
    folder, hf = paligemma_folder
    net = paligemma_vla(folder, formulation="one_step_continuous", moe=True)
    img = _images(2, 3)
    hidden, _, valid, _ = net.vl_prefix(img, INSTR)
    ref, real = hf_logits(hf, net, img[:, 0], [(_segment(net, s)[0], []) for s in INSTR])
    assert (net.backbone.lm_logits(hidden)[real] - ref[real]).abs().max() < 1e-4


def test_attention_option_validation(tmp_path):
    with pytest.raises(ValueError, match="attention must be"):
        vla.VLAConfig.tiny(attention="bidirectional").validate()
    with pytest.raises(ValueError, match="always causal"):
        vla.VLA(vla.VLAConfig.tiny(attention="prefix", image_size=32))
    assert not vla.VLA(vla.VLAConfig.tiny(image_size=32, backbone="tiny-llava")).prefix_lm  # auto: causal
    assert vla.VLA(vla.VLAConfig.tiny(image_size=32, backbone="tiny-llava", attention="prefix")).prefix_lm
    # a checkpoint written before the option existed was trained causally and stays causal when loaded
    net = vla.VLA(vla.VLAConfig.tiny(image_size=32, backbone="tiny-paligemma", views=("static",)))
    vla.save_checkpoint(tmp_path, net, {"d": vla.compute_action_stats(np.zeros((4, 7)))})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["attention"] == "auto"
    del cfg["config"]["attention"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old, _, _ = vla.load_checkpoint(tmp_path)
    assert old.config.attention == "causal" and not old.prefix_lm


# -----------------------------------------------------------------------------------------------------------
# SimplerEnv "open top drawer and place apple": when the second instruction starts
# -----------------------------------------------------------------------------------------------------------

@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES))
    for name in list(sys.modules):
        if name.split(".")[0] in ("calvin_env", "simpler_env"):
            monkeypatch.delitem(sys.modules, name)


def test_apple_second_instruction_rules(fakes, tmp_path):
    import evaluate as ev
    from test_calvin_simpler import ScriptedSimplerPolicy, _overlays
    overlays = _overlays(tmp_path)
    ep = ev.simpler_episodes("google_place_apple_in_drawer")[0]
    first, second = "open top drawer", "place apple into top drawer"
    runs = {}
    for rule in ev.SIMPLER_SUBTASK_RULES:
        policy = ScriptedSimplerPolicy()  # pulls the drawer open (>= 15 cm after ~25 steps), then waits
        rec = ev.simpler_run_episode(ep, policy, overlays, subtask_rule=rule)
        k = rec["switched_after"]  # the first action with the second instruction is step k + 1
        assert policy.seen[:k] == [first] * k and policy.seen[k:] == [second] * (200 - k)
        assert policy.resets == 2 and rec["success"] and rec["episode_stats"]["is_drawer_open"]
        runs[rule] = k
    assert 15 < runs["drawer_open"] < 40  # RoboVLMs: right after the step that opened the drawer
    # the env's own switch happens at the START of step 101: the 101st action still gets the first instruction
    assert runs["midpoint"] == 101
    idle = ev.simpler_run_episode(ep, ScriptedSimplerPolicy(idle=True), overlays)  # drawer never opens
    assert idle["switched_after"] == 101 and not idle["success"] and not idle["episode_stats"]["is_drawer_open"]
    with pytest.raises(ValueError, match="subtask_rule"):
        ev.simpler_run_episode(ep, ScriptedSimplerPolicy(), overlays, subtask_rule="half")
    summary = ev.evaluate_simpler(lambda kind: ScriptedSimplerPolicy(), "google_place_apple_in_drawer", overlays,
                                  tmp_path / "out", max_episodes=1, progress=False, subtask_rule="midpoint")
    assert summary["google_place_apple_in_drawer"]["success"] == 1.0
    table = (tmp_path / "out" / "simpler_results.md").read_text()
    assert "second instruction `midpoint`" in table
    assert "`drawer_open`" in ev.simpler_table(summary, subtask_rule="drawer_open")
