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
        pol = vla.Policy(net, {"d": data.compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (50, 7)))},
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
    vla.save_checkpoint(tmp_path, net, {"d": data.compute_action_stats(np.zeros((4, 7)))})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["attention"] == "auto"
    del cfg["config"]["attention"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "manifest.json").unlink()  # such a run also predates the digests
    with pytest.warns(UserWarning, match="no manifest.json"):
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


# -----------------------------------------------------------------------------------------------------------
# CALVIN splits: train.py --data SPLIT, and the recordings file every split has
# -----------------------------------------------------------------------------------------------------------

CALVIN_ANN = [((0, 11), "pull the handle to open the drawer", "open_drawer"),
              ((12, 23), "push the sliding door to the left side", "move_slider_left"),
              ((30, 41), "use the switch to turn on the light bulb", "turn_on_lightbulb")]


@pytest.fixture(scope="module")
def calvin_split(tmp_path_factory):
    """A CALVIN-layout split (two recordings, three annotated segments, the real npz keys) with the
    validation/.hydra/merged_config.yaml that the CALVIN double's get_env reads."""
    from test_data import write_calvin_split
    root = tmp_path_factory.mktemp("calvin") / "task_D_D"
    write_calvin_split(root / "training", [(0, 23), (30, 41)], CALVIN_ANN)
    (root / "validation" / ".hydra").mkdir(parents=True)
    (root / "validation" / ".hydra" / "merged_config.yaml").write_text("# stand-in for the split's env config\n")
    return root


def test_calvin_split_needs_its_recordings_file(calvin_split, tmp_path):
    import shutil
    ds = data.CalvinDataset(calvin_split, "training", window=2, chunk=2, image_size=32)
    assert len(ds.seg_start) == 3
    broken = tmp_path / "task_D_D"
    shutil.copytree(calvin_split / "training", broken / "training")
    (broken / "training" / "ep_start_end_ids.npy").unlink()
    with pytest.raises(data.DataError, match=r"training/ep_start_end_ids.npy: not found"):
        data.CalvinDataset(broken, "training", window=2, chunk=2, image_size=32)


def test_dataset_summary_names_every_kind(calvin_split, tmp_path):
    import train
    calvin = data.CalvinDataset(calvin_split, "training", window=2, chunk=2, image_size=32)
    h5 = write_episodes(tmp_path / "b.h5", "bridge_orig", n_eps=2, views=("static", "wrist"))
    assert train.describe_dataset(calvin) == "3 annotated segments"
    assert train.describe_dataset(data.HDF5Dataset(h5, 2, 2, image_size=32)) == "2 episodes"
    mix = data.MixtureDataset([(calvin, 1.0), (data.HDF5Dataset(h5, 2, 2, image_size=32), 1.0)])
    assert train.describe_dataset(mix) == "mixture of 2 datasets (calvin: 3 annotated segments, bridge_orig: 2 episodes)"


# -----------------------------------------------------------------------------------------------------------
# Rehearsals: the real command lines in fresh processes, tiny model, a few steps, the test doubles
# -----------------------------------------------------------------------------------------------------------

ATTRS = {"control_hz": 5, "action_convention": "delta xyz (m) + delta euler xyz (rad) + gripper 1 open/-1 closed"}
TRAIN = ["--steps", "3", "--batch", "4", "--window", "2", "--chunk", "2", "--image-size", "32", "--threads", "1",
         "--loader-workers", "0", "--log-every", "1", "--eval-episodes", "0", "--warmup", "1"]


def write_episodes(path, key, n_eps=3, T=10, views=("static",), seed=0):
    """An HDF5 file in the project's format (data.EpisodeWriter) whose statistics key is `key`."""
    rng = np.random.default_rng(seed)
    with data.EpisodeWriter(path, {**ATTRS, "dataset_key": key}) as w:
        for e in range(n_eps):
            a = rng.uniform(-0.02, 0.02, (T, 7)).astype(np.float32)
            a[:, 6] = np.where(np.arange(T) < T // 2, 1.0, -1.0)
            w.add_episode({v: rng.integers(0, 256, (T, 48, 48, 3), dtype=np.uint8) for v in views}, a,
                          "put carrot on plate" if e % 2 else "put the spoon on the towel", f"task{e % 2}")
    return str(path)


def cli(script, *args, cwd):
    """`python script args` in a fresh process, the doubles of tests/fakes importable (as an install would be)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(FAKES)])}
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def loss_rows(run):
    import csv
    rows = list(csv.DictReader(open(Path(run) / "metrics.csv")))
    assert len(rows) == 3 and all(np.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    return rows


def overlays(tmp_path):
    import evaluate as ev
    d = tmp_path / "real_inpainting"
    d.mkdir()
    for name in {e["overlay"] for t in ev.SIMPLER_TASKS for e in ev.simpler_episodes(t)}:
        (d / name).write_bytes(b"")
    return d


def table_row(text, first_cell):
    """The cells of the markdown row that starts with `first_cell`."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


@pytest.mark.slow
def test_rehearsal_calvin_split_train_then_evaluate(calvin_split, tmp_path):
    """CALVIN split -> python train.py --data SPLIT -> python evaluate.py --benchmark calvin (the double)."""
    run = tmp_path / "run"
    out = cli("train.py", "--data", calvin_split / "training", "--out", run, *TRAIN, cwd=tmp_path)
    assert "dataset: 3 annotated segments," in out
    loss_rows(run)
    assert set(json.loads((run / "action_stats.json").read_text())) == {"calvin"}
    seq = tmp_path / "eval_sequences.json"  # two official chains (eval_sequences.json entries 0 and 3)
    seq.write_text(json.dumps([
        [{"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
          "blue_block": "table", "pink_block": "slider_right", "grasped": 0},
         ["rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider",
          "turn_off_lightbulb"]],
        [{"led": 1, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "slider_right",
          "blue_block": "table", "pink_block": "table", "grasped": 0},
         ["rotate_blue_block_right", "lift_pink_block_table", "place_in_slider", "move_slider_left", "open_drawer"]]]))
    text = cli("evaluate.py", "--ckpt", run, "--benchmark", "calvin", "--calvin-root", calvin_split,
               "--calvin-sequences", seq, "--out", tmp_path / "eval", cwd=tmp_path)
    print(text)
    row = table_row(text, "RoboVLMs (this run)")
    assert row[1] == "task_D_D" and len(row) == 8
    sr, avg = [float(c) for c in row[2:7]], float(row[7])
    assert all(0 <= x <= 1 for x in sr) and sr == sorted(sr, reverse=True) and avg == pytest.approx(sum(sr), abs=0.01)
    res = json.loads((tmp_path / "eval" / "calvin_results.json").read_text())
    assert res["num_sequences"] == 2 and res["avg_seq_len"] == pytest.approx(avg, abs=0.005)
    records = json.loads((tmp_path / "eval" / "calvin_sequences.json").read_text())
    assert [len(r["steps"]) for r in records] == [min(r["result"] + 1, 5) for r in records]
    assert all(1 <= s <= 360 for r in records for s in r["steps"])
    assert (tmp_path / "eval" / "calvin_results.md").read_text().count("Avg. Len.") == 1


@pytest.mark.slow
def test_rehearsal_bridge_hdf5_train_then_simpler_widowx(tmp_path):
    """HDF5 with statistics key bridge_orig -> python train.py -> python evaluate.py --benchmark simpler --task widowx."""
    h5 = write_episodes(tmp_path / "bridge.h5", "bridge_orig")
    run = tmp_path / "run"
    out = cli("train.py", "--data", h5, "--views", "static", "--out", run, *TRAIN, cwd=tmp_path)
    assert "dataset: 3 episodes," in out
    loss_rows(run)
    text = cli("evaluate.py", "--ckpt", run, "--benchmark", "simpler", "--task", "widowx", "--max-episodes", "1",
               "--simpler-overlays", overlays(tmp_path), "--out", tmp_path / "eval", cwd=tmp_path)
    print(text)
    row = table_row(text, "RoboVLMs (this run)")
    assert len(row) == 9 and all(0 <= float(c) <= 1 for c in row[1:])  # grasp, final for the 4 Bridge tasks
    episodes = json.loads((tmp_path / "eval" / "simpler_episodes.json").read_text())
    assert {t: [e["steps"] for e in eps] for t, eps in episodes.items()} == {
        "widowx_spoon_on_towel": [60], "widowx_carrot_on_plate": [60], "widowx_stack_block": [60],
        "widowx_eggplant_in_basket": [120]}
    res = json.loads((tmp_path / "eval" / "simpler_results.json").read_text())
    assert [f"{res[t]['grasp']:.3f}" for t in episodes] == row[1::2]


@pytest.mark.slow
def test_rehearsal_cotrain_posttrain_evaluate(tmp_path):
    """Co-train on two HDF5 files (Google fractal + Bridge) -> post-train on Bridge with --init-from -> evaluate
    on a task of each robot: the co-training statistics travel into the post-trained run."""
    fractal = write_episodes(tmp_path / "fractal.h5", "fractal20220817_data", seed=1)
    bridge = write_episodes(tmp_path / "bridge.h5", "bridge_orig", seed=2)
    co, post = tmp_path / "cotrain", tmp_path / "posttrain"
    out = cli("train.py", "--data", fractal, bridge, "--data-weights", "1", "2", "--views", "static", "--out", co,
              *TRAIN, cwd=tmp_path)
    assert "mixture of 2 datasets (fractal20220817_data: 3 episodes, bridge_orig: 3 episodes)" in out
    loss_rows(co)
    out = cli("train.py", "--data", bridge, "--views", "static", "--init-from", co, "--out", post, *TRAIN, cwd=tmp_path)
    assert "post-train: initialized from" in out and "bridge_orig" in out
    loss_rows(post)
    stats = json.loads((post / "action_stats.json").read_text())
    assert set(stats) == {"fractal20220817_data", "bridge_orig"}
    from safetensors.torch import load_file
    w_co, w_post = load_file(str(co / "model.safetensors")), load_file(str(post / "model.safetensors"))
    assert w_co.keys() == w_post.keys() and any(not torch.equal(w_co[k], w_post[k]) for k in w_co)
    text = cli("evaluate.py", "--ckpt", post, "--benchmark", "simpler", "--task", "google_move_near,widowx_carrot_on_plate",
               "--max-episodes", "1", "--simpler-overlays", overlays(tmp_path), "--out", tmp_path / "eval", cwd=tmp_path)
    print(text)
    res = json.loads((tmp_path / "eval" / "simpler_results.json").read_text())
    assert set(res) == {"google_move_near", "widowx_carrot_on_plate"}
    assert all(r["episodes"] == 1 and 0 <= r["success"] <= 1 for r in res.values())
    assert "(a) WidowX + Bridge" in text and "(b) Google Robot" in text
    assert table_row(text.split("(b) Google Robot")[1], "RoboVLMs (this run)")[5] == f"{res['google_move_near']['success']:.3f}"
