"""Bad input gets a clear error (issue 15): damaged run directories, invalid configs and statistics, implausible
actions, bad episodes, a backbone folder without its tokenizer, and what Policy.act refuses. Each test asserts
what the message names (file, key, limit). One tiny model is built per module and shared."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import backbones
import data
import vla

CAMS = {"static": [64, 64], "wrist": [64, 64]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vla.VLA(vla.VLAConfig.tiny(camera_sizes=CAMS)).eval()


@pytest.fixture(scope="module")
def stats():
    return {"d": data.compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (100, 7)))}


@pytest.fixture(scope="module")
def saved(model, stats, tmp_path_factory):
    """A good run directory, saved once; tests copy it before damaging it."""
    d = tmp_path_factory.mktemp("good") / "run"
    vla.save_checkpoint(d, model, stats)
    return d


@pytest.fixture
def run(saved, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(saved, d)
    return d


@pytest.fixture(scope="module")
def policy(model, stats):
    return vla.Policy(model, stats, execution="first")


def obs(h=64, w=64):
    rng = np.random.default_rng(0)
    return {"static": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
            "wrist": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)}


# ---- run directories: digests ----

def test_saved_run_directory_has_a_manifest_of_every_file(run):
    m = json.loads((run / "manifest.json").read_text())
    assert set(m) == {"model.safetensors", "config.json", "action_stats.json", "tokenizer.model"}
    assert m["model.safetensors"]["bytes"] == (run / "model.safetensors").stat().st_size
    assert vla.verify_manifest(run) is True


def test_flipped_bytes_in_the_weights_are_refused_by_every_loader(run):
    path = run / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle of a weight: same size, loads fine otherwise
    path.write_bytes(bytes(raw))
    for load in (vla.load_checkpoint, vla.Policy.from_pretrained):
        with pytest.raises(vla.CheckpointError, match=r"model\.safetensors does not match its sha256") as e:
            load(run)
        assert str(run) in str(e.value) and "checkpoints" in str(e.value)  # and what to do


def test_robot_and_evaluate_load_through_the_verified_path(run):
    """robot.py and evaluate.py load with Policy.from_pretrained: a damaged run stops them, naming the file."""
    import evaluate
    import robot
    stats_file = run / "action_stats.json"
    stats_file.write_text(stats_file.read_text().replace("1", "2", 1))  # still valid JSON, different bytes
    with pytest.raises(vla.CheckpointError, match=r"action_stats\.json does not match"):
        robot.main(["--ckpt", str(run), "--instruction", "push", "--backend", "sim", "--dry-run", "--episodes", "1", "--max-steps", "1"])
    with pytest.raises(vla.CheckpointError, match=r"action_stats\.json does not match"):
        evaluate.run_metaworld_eval(run, 1, 0, "first", ["button-press-topdown"], workers=1)


def test_run_directory_without_manifest_loads_with_a_warning(run):
    (run / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        vla.load_checkpoint(run)


def test_truncated_weights_name_the_file(run):
    path = run / "model.safetensors"
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full // 3)
    with pytest.raises(vla.CheckpointError, match=rf"model\.safetensors has {full // 3} bytes, manifest\.json "
                                                  rf"says {full} \(truncated\?\)"):
        vla.load_checkpoint(run)
    (run / "manifest.json").unlink()  # an older run directory: the read itself names the file
    with pytest.warns(UserWarning), pytest.raises(vla.CheckpointError, match=r"model\.safetensors: cannot read "
                                                                             r"the weights .*truncated"):
        vla.load_checkpoint(run)


def reseal(run):
    """Record the current digests (as after an edit made on purpose), so the content checks are reached."""
    vla.write_manifest(run, vla.read_manifest(run))


@pytest.mark.parametrize("name", ["config.json", "action_stats.json"])
def test_invalid_json_names_the_file_and_line(run, name):
    text = (run / name).read_text()
    (run / name).write_text(text[:len(text) // 2])  # cut in the middle
    reseal(run)
    with pytest.raises(vla.CheckpointError, match=rf"{name}: not valid JSON \(line \d+, column \d+\)"):
        vla.load_checkpoint(run)


@pytest.mark.parametrize("key,value,says", [
    ("window", "2", r"key 'window' must be int, got '2' \(str\)"),
    ("views", "static", r"key 'views' must be a list of str, got 'static' \(str\)"),
    ("head_mlp", [128.5], r"key 'head_mlp' must be a list of int"),
    ("chunk", 0, r"chunk \(L\) must be >= 1"),
    ("camera_sizes", {"static": [64]}, r"camera_sizes\['static'\] must be \[height, width\]"),
])
def test_config_json_is_validated_like_a_flag(run, key, value, says):
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"][key] = value
    (run / "config.json").write_text(json.dumps(cfg))
    reseal(run)
    with pytest.raises(vla.CheckpointError, match=r"config\.json: \"config\": .*" + says):
        vla.load_checkpoint(run)


def test_config_without_camera_sizes_still_loads(run):
    """Configs saved before camera_sizes existed load (the field defaults to unknown)."""
    cfg = json.loads((run / "config.json").read_text())
    del cfg["config"]["camera_sizes"]
    (run / "config.json").write_text(json.dumps(cfg))
    reseal(run)
    assert vla.load_checkpoint(run)[0].config.camera_sizes == {}


@pytest.mark.parametrize("edit,says", [
    (lambda s: s["d"]["q99"].__setitem__(2, float("nan")), r"dataset 'd' key 'q99' has NaN/inf in dim\(s\) \[2\]"),
    (lambda s: s["d"]["q01"].__setitem__(0, float("-inf")), r"dataset 'd' key 'q01' has NaN/inf in dim\(s\) \[0\]"),
    (lambda s: s["d"]["q01"].pop(), r"dataset 'd' key 'q01' must be a list of 7 numbers .*got 6"),
    (lambda s: s["d"].__setitem__("q99", 1.0), r"dataset 'd' key 'q99' must be a list of 7 numbers .*got float"),
    (lambda s: s["d"].pop("q99"), r"dataset 'd' lacks key 'q99'"),
])
def test_bad_action_statistics_are_refused(run, edit, says):
    s = json.loads((run / "action_stats.json").read_text())
    edit(s)
    (run / "action_stats.json").write_text(json.dumps(s))  # json writes NaN / -Infinity as python reads them
    reseal(run)
    with pytest.raises(vla.CheckpointError, match=r"action_stats\.json: " + says):
        vla.load_checkpoint(run)


def test_save_refuses_non_finite_statistics(model, stats, tmp_path):
    bad = {"d": dict(stats["d"], q99=[float("nan")] * 7)}
    with pytest.raises(vla.CheckpointError, match=r"dataset 'd' key 'q99' has NaN/inf"):
        vla.save_checkpoint(tmp_path / "x", model, bad)


def test_train_state_checkpoint_manifest_verifies(model, stats, tmp_path):
    """train.py's checkpoints/step_* manifest covers every file (and not itself); the run directory's top level
    gets save_checkpoint's manifest; a damaged file is named by --resume's check."""
    import argparse
    import train
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = argparse.Namespace(batch=2)
    final = train.save_train_state(tmp_path, 5, model, model, opt, sched, stats, args, keep=2)
    assert train.verify_checkpoint(final) is None
    assert {"train_state.pt", "rng_rank0.pt", "model.safetensors"} <= set(json.loads((final / "manifest.json")
                                                                                   .read_text()))
    assert vla.verify_manifest(tmp_path) is True
    with open(final / "model.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"xyz")
    assert "model.safetensors does not match its sha256" in train.verify_checkpoint(final)


# ---- data: implausible actions, empty instructions ----

def write_h5(path, n_eps=3, t=20, instruction="open the drawer", edit=None):
    rng = np.random.default_rng(1)
    with data.EpisodeWriter(path, {"control_hz": 10, "action_convention": "test"}) as w:
        for e in range(n_eps):
            a = rng.uniform(-0.05, 0.05, (t, 7)).astype(np.float32)
            a[:, 6] = 1
            if edit is not None:
                edit(e, a)
            w.add_episode({"static": rng.integers(0, 255, (t, 24, 32, 3), dtype=np.uint8)}, a, instruction, "t")
    return path


def test_one_huge_action_is_flagged_with_episode_and_frame(tmp_path):
    def edit(e, a):
        if e == 1:
            a[7, 2] = 1e30
    path = write_h5(tmp_path / "d.h5", edit=edit)
    with pytest.raises(data.DataError, match=r"d\.h5 episode ep_000001 frame 7, dim 2 \(0-5 pose\) is 1e\+30, "
                                             r"implausibly far"):
        data.HDF5Dataset(path, 2, 2, views=("static",), image_size=32)
    # a direct call names the row
    a = np.random.default_rng(0).uniform(-1, 1, (60, 7))
    a[13, 4] = -1e30
    with pytest.raises(ValueError, match=r"action row 13, dim 4"):
        data.compute_action_stats(a)


def test_plausible_heavy_tails_and_constant_dims_pass():
    rng = np.random.default_rng(0)
    a = rng.standard_t(3, (5000, 7))  # heavy tails: a few values ~30 x the q10-q90 spread
    a[:, 3:6] = 0.0  # unused rotation dims
    a[100, 4] = 0.5  # a rare rotation in an otherwise constant dim: borrows the other dims' spread
    assert data.find_implausible_actions(a) == []
    s = data.compute_action_stats(a)
    assert np.isfinite(s["q99"]).all()


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_instruction_in_an_hdf5_episode_is_refused(tmp_path, empty):
    path = write_h5(tmp_path / "d.h5")
    with h5py.File(path, "a") as f:
        f["episodes/ep_000002"].attrs["instruction"] = empty  # a file written by another tool
    with pytest.raises(data.DataError, match=r"d\.h5 episode ep_000002: attr 'instruction' is empty"):
        data.HDF5Dataset(path, 2, 2, views=("static",), image_size=32)
    ds = data.HDF5Dataset(path, 2, 2, views=("static",), image_size=32, skip_bad=True)
    assert ds.n_bad == 1 and len(ds.episodes) == 2


def test_dataset_reports_its_camera_sizes(tmp_path):
    ds = data.HDF5Dataset(write_h5(tmp_path / "d.h5"), 2, 2, views=("static",), image_size=32)
    assert ds.camera_sizes == {"static": [24, 32]}


# ---- a backbone folder without its tokenizer ----

def test_backbone_folder_without_tokenizer_is_refused(tmp_path):
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(backbones.tiny_family_config("llava")))
    # the run-directory path (weights come from the run); training's path (weights from the folder) reaches the
    # same check in VLA.__init__ after load_vlm
    with pytest.raises(FileNotFoundError, match=rf"backbone folder {folder} has no tokenizer file 'tokenizer\.model' "
                                                rf"\(found \['config\.json'\]\)"):
        vla.VLA(vla.VLAConfig.tiny(backbone=str(folder)), backbone_folder=str(folder))


# ---- Policy.act ----

def test_instruction_longer_than_the_context_is_refused(policy):
    long = "open the drawer and then " * 400  # 10,000 characters
    with pytest.raises(ValueError, match=r"instruction of 10000 characters \(\d+ tokens\) gives a sequence of \d+ "
                                         r"tokens, but the backbone 'tiny' has a context of 2048 positions"):
        policy.act(obs(), long)
    assert policy.act(obs(), "open the drawer").shape == (7,)  # a normal one still works afterwards


@pytest.mark.parametrize("h,w,says", [
    (1, 1, r"camera 'static' image is 1x1 \(h x w\) pixels: below the minimum of 16 px"),
    (120, 200, r"camera 'static' image is 120x200 \(h x w\) pixels, but this policy was trained on 64x64"),
    (200, 120, r"image is 200x120 .* trained on 64x64"),
])
def test_images_that_cannot_be_the_trained_camera_are_refused(policy, h, w, says):
    with pytest.raises(ValueError, match=says):
        policy.act(obs(h, w), "open the drawer")


def test_camera_rule():
    """The rule itself (vla.check_camera_image): CALVIN's 200x200 static camera, a 4:3 camera stored squashed."""
    check = vla.check_camera_image
    with pytest.raises(ValueError, match=r"image is 40x40 .* trained on 200x200 .* at least 0.25 x the trained size"):
        check("static", (40, 40), [200, 200], 224)
    assert check("static", (200, 200), [200, 200], 224) is None
    assert check("static", (100, 100), [200, 200], 224) is None  # a lower resolution of the same camera
    assert check("static", (480, 640), [256, 256], 224) is None  # SimplerEnv / robot.py --record-size: 4:3 squashed
    with pytest.raises(ValueError, match="aspect 1.78 vs 1.00"):
        check("static", (720, 1280), [256, 256], 224)


def test_any_numpy_view_is_accepted(policy):
    o = obs()
    flipped = {"static": o["static"][..., ::-1], "wrist": o["wrist"][::-1]}  # BGR -> RGB, upside down: negative strides
    copied = {k: np.ascontiguousarray(v) for k, v in flipped.items()}
    policy.reset()
    a = policy.act(flipped, "open the drawer")
    policy.reset()
    np.testing.assert_array_equal(a, policy.act(copied, "open the drawer"))
    policy.reset()
    big = {"static": np.zeros((128, 130, 3), np.uint8)[:, 1:-1], "wrist": o["wrist"]}  # a strided crop, same aspect
    assert policy.act(big, "open the drawer").shape == (7,)


def test_unknown_camera_size_warns_instead(model, stats):
    p = vla.Policy(model, stats, execution="first")
    p.config = vla.VLAConfig.tiny()  # as loaded from a config saved before camera_sizes existed
    with pytest.warns(UserWarning, match=r"does not record its training camera size"):
        p.act(obs(120, 200), "open the drawer")
    with pytest.raises(ValueError, match="below the minimum of 16 px"):
        p.act(obs(1, 1), "open the drawer")


# ---- train.py: the camera sizes travel in the config; --init-from verifies ----

def test_train_stores_camera_sizes_and_init_from_verifies(tmp_path):
    import train
    h5 = write_h5(tmp_path / "d.h5", n_eps=2, t=8)
    flags = ["--data", str(h5), "--steps", "1", "--batch", "2", "--window", "2", "--chunk", "2", "--image-size", "32",
             "--views", "static", "--eval-episodes", "0", "--threads", "1", "--loader-workers", "0"]
    train.main(flags + ["--out", str(tmp_path / "a")])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["config"]["camera_sizes"] == {"static": [24, 32]}
    path = tmp_path / "a" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match=rf"--init-from {tmp_path / 'a'}: .*model\.safetensors does not match its "
                                         rf"sha256"):
        train.main(flags + ["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a")])


@pytest.mark.parametrize("name", ["tiny", "tiny-kosmos2", "tiny-paligemma", "tiny-llava", "tiny-flamingo",
                                  "tiny-qwen-vl", "tiny-moondream", "tiny-uform"])
def test_every_family_states_its_context(name):
    """Policy.act's context check needs backbone.max_positions on every family (else it silently checks nothing)."""
    import backbones
    bb = backbones.build_backbone(name, image_size=32)
    assert isinstance(bb.max_positions, int) and bb.max_positions >= 512, (name, getattr(bb, "max_positions", None))
