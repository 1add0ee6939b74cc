"""data.py: CALVIN reader, HDF5 format, windows/chunks/masks, statistics, mixtures, bad input, image helpers.

Every dataset is built here in tmp_path, in the exact on-disk layout. Frame f of the fake CALVIN data has
rel_actions [f/1000, -f/1000, f/500, 0.1, -0.1, 0.01 f, +1 if f % 4 < 2 else -1] and constant images whose
pixels encode f, so every window can be checked against indices computed by hand.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
from data import compute_action_stats, normalize_action

REPO = Path(__file__).resolve().parents[1]
H, L, S = 4, 3, 32  # window, chunk, image size used throughout

# two recordings per split (frame ids are not contiguous across recordings, like the real data)
TRAIN_RECORDINGS = [(100, 139), (200, 229)]
TRAIN_ANN = [((100, 111), "open the drawer", "open_drawer"),
             ((105, 120), "push the blue block left", "push_blue_block_left"),
             ((200, 215), "pull the handle to open the drawer", "open_drawer"),
             ((210, 229), "slide the blue block to the left", "push_blue_block_left"),
             ((130, 132), "turn on the led", "turn_on_led")]  # 3 frames: shorter than H, gives no window
VAL_RECORDINGS = [(500, 519)]
VAL_ANN = [((500, 509), "open the drawer", "open_drawer")]


def rel_action(f):
    g = 1.0 if f % 4 < 2 else -1.0
    return np.array([f / 1000, -f / 1000, f / 500, 0.1, -0.1, 0.01 * f, g], dtype=np.float64)


def static_pixel(f):
    return np.array([f % 251, (f // 251) % 251, 7], dtype=np.uint8)


def wrist_pixel(f):
    return np.array([(f * 3) % 251, 11, 13], dtype=np.uint8)


def write_calvin_frame(path, f, compressed=False, **override):
    arrays = {
        "actions": np.concatenate([np.full(6, f / 100.0), [rel_action(f)[6]]]),  # absolute, float64
        "rel_actions": rel_action(f),
        "robot_obs": np.arange(15, dtype=np.float64) + f,
        "scene_obs": np.zeros(24, dtype=np.float64),
        "rgb_static": np.broadcast_to(static_pixel(f), (200, 200, 3)).copy(),
        "rgb_gripper": np.broadcast_to(wrist_pixel(f), (84, 84, 3)).copy(),
        "rgb_tactile": np.zeros((160, 120, 6), dtype=np.uint8),
        "depth_static": np.ones((200, 200), dtype=np.float32),
        "depth_gripper": np.ones((84, 84), dtype=np.float32),
        "depth_tactile": np.zeros((160, 120, 2), dtype=np.float32),
    }
    arrays.update(override)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def write_calvin_split(split_dir, recordings, annotations, compressed=False):
    split_dir = Path(split_dir)
    (split_dir / "lang_annotations").mkdir(parents=True)
    for s, e in recordings:
        for f in range(s, e + 1):
            write_calvin_frame(split_dir / f"episode_{f:07d}.npz", f, compressed)
    np.save(split_dir / "ep_start_end_ids.npy", np.array(recordings, dtype=np.int64))
    np.save(split_dir / "ep_lens.npy", np.array([e - s + 1 for s, e in recordings], dtype=np.int64))
    ann = {"info": {"indx": [se for se, _, _ in annotations], "episodes": []},
           "language": {"ann": [a for _, a, _ in annotations], "task": [t for _, _, t in annotations],
                        "emb": np.zeros((len(annotations), 1, 384), dtype=np.float32)}}
    np.save(split_dir / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)


@pytest.fixture(scope="module")
def calvin_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_D_D")
    write_calvin_split(root / "training", TRAIN_RECORDINGS, TRAIN_ANN)
    write_calvin_split(root / "validation", VAL_RECORDINGS, VAL_ANN, compressed=True)  # deflated npz too
    return root


def annotated_frames(annotations):
    return sorted({f for (s, e), _, _ in annotations for f in range(s, e + 1)})


def expected_windows(annotations, h):
    """[(annotation index, first frame id)] in order, by hand: all H frames inside the segment."""
    return [(k, t0) for k, ((s, e), _, _) in enumerate(annotations) for t0 in range(s, e - h + 2)]


# ----------------------------------------------------------------------------------------------- CALVIN


def test_calvin_windows_frames_chunks_masks(calvin_root):
    ds = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S, state=True)
    exp = expected_windows(TRAIN_ANN, H)
    assert len(ds) == len(exp) == 9 + 13 + 13 + 17  # the 3-frame annotation gives none
    assert ds.n_short == 1
    raw = np.stack([rel_action(f) for f in annotated_frames(TRAIN_ANN)])
    stats = compute_action_stats(raw.astype(np.float32))
    np.testing.assert_allclose(ds.stats["q01"], stats["q01"], rtol=1e-6)
    for i in [0, 8, 9, 21, 22, 34, len(ds) - 1]:
        k, t0 = exp[i]
        (s, e), instr, task = TRAIN_ANN[k]
        w = ds[i]
        assert w["images"].shape == (H, 2, 3, S, S) and w["images"].dtype == torch.uint8
        assert w["actions"].shape == (H, L, 7) and w["actions"].dtype == torch.float32
        assert w["action_mask"].shape == (H, L) and w["action_mask"].dtype == torch.bool
        assert (w["instruction"], w["task"], w["dataset"]) == (instr, task, "calvin")
        for t in range(H):
            f = t0 + t
            # constant images survive resizing exactly: pixels name the frame that was loaded
            assert torch.equal(w["images"][t, 0, :, 0, 0], torch.from_numpy(static_pixel(f)))
            assert torch.equal(w["images"][t, 1, :, S - 1, S - 1], torch.from_numpy(wrist_pixel(f)))
            np.testing.assert_allclose(w["state"][t].numpy(), np.arange(15) + f)
            for j in range(L):
                valid = f + j <= e  # never past the annotation, even where the recording continues
                assert bool(w["action_mask"][t, j]) == valid
                want = normalize_action(rel_action(f + j).astype(np.float32), stats) if valid else np.zeros(7)
                np.testing.assert_allclose(w["actions"][t, j].numpy(), want, atol=1e-6)
    # last window of annotation 0 ends on frame 111: its last frame has 1 valid action, the one before 2
    last = ds[8]
    assert last["action_mask"].tolist() == [[True] * 3, [True] * 3, [True, True, False], [True, False, False]]
    assert set(last["actions"][..., 6][last["action_mask"]].tolist()) <= {-1.0, 1.0}  # canonical gripper


def test_calvin_stats_ignore_unannotated_frames(calvin_root):
    ds = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S)
    frames = annotated_frames(TRAIN_ANN)  # 100-120, 130-132, 200-229; not 121-129, 133-139
    assert ds.frame_ids.tolist() == frames
    raw = np.stack([rel_action(f) for f in frames])
    for name, value in (("min", raw.min(0)), ("max", raw.max(0)), ("mean", raw.mean(0)),
                        ("q99", np.quantile(raw, 0.99, axis=0))):
        np.testing.assert_allclose(ds.stats[name], value, rtol=1e-5, atol=1e-7)
    assert ds.stats["max"][2] == pytest.approx(229 / 500)


def test_calvin_static_only_and_validation_uses_training_stats(calvin_root):
    train = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, views=("static",), image_size=S)
    assert train[0]["images"].shape == (H, 1, 3, S, S)
    with pytest.raises(data.DataError, match="training split"):
        data.CalvinDataset(calvin_root, "validation", window=H, chunk=L, image_size=S)
    val = data.CalvinDataset(calvin_root, "validation", window=H, chunk=L, image_size=S, stats=train.stats)
    assert len(val) == 10 - H + 1
    w = val[0]
    want = normalize_action(np.stack([rel_action(500 + t + j) for t in range(H) for j in range(L)]).astype(np.float32),
                            train.stats).reshape(H, L, 7)
    np.testing.assert_allclose(w["actions"].numpy(), want, atol=1e-6)  # compressed npz reads the same
    assert torch.equal(w["images"][2, 0, :, 5, 5], torch.from_numpy(static_pixel(502)))


def test_calvin_few_shot_and_fraction(calvin_root, tmp_path):
    full = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S)
    one = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S, few_shot=1, seed=3)
    tasks = sorted(one.tasks)
    assert tasks == ["open_drawer", "push_blue_block_left", "turn_on_led"]  # exactly one segment per task
    again = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S, few_shot=1, seed=3)
    assert one.instructions == again.instructions  # reproducible
    chosen = {(int(a), int(b)) for a, b in zip(one.frame_ids[one.seg_start], one.frame_ids[one.seg_end])}
    assert chosen <= {se for se, _, _ in TRAIN_ANN}
    seen = set()
    for seed in range(8):  # different seeds reach different segments of a task
        d = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S, few_shot=1, seed=seed)
        seen.add(tuple(sorted(d.instructions)))
    assert len(seen) > 1
    # statistics follow the selected data only
    rows = np.unique(np.concatenate([np.arange(s, e + 1) for s, e in zip(one.seg_start, one.seg_end)]))
    np.testing.assert_allclose(one.stats["max"], one.raw_actions[rows].max(0), rtol=1e-6)
    # the official few-shot file format: {task: [[start, end], ...]}
    path = tmp_path / "shots.json"
    path.write_text(json.dumps({"open_drawer": [[200, 215]], "push_blue_block_left": [[105, 120]]}))
    listed = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S, few_shot=str(path))
    assert listed.instructions == ["push the blue block left", "pull the handle to open the drawer"]
    assert len(listed) == 13 + 13
    # fraction: round(0.4 * 5) = 2 annotations
    frac = data.CalvinDataset(calvin_root, "training", window=H, chunk=L, image_size=S, fraction=0.4)
    assert len(frac.instructions) == 2 and set(frac.instructions) <= set(full.instructions)
    assert len(frac) < len(full)


@pytest.mark.parametrize("compressed", [False, True])
def test_calvin_image_bytes_match_numpys_reader(tmp_path, compressed):
    """Images read at indexed offsets (or inflated) equal np.load's, pixel for pixel, on random content."""
    root = tmp_path / "calvin_debug_dataset"
    write_calvin_split(root / "training", [(0, 7)], [((0, 7), "a", "ta")])
    rng = np.random.default_rng(0)
    for f in range(8):
        write_calvin_frame(root / "training" / f"episode_{f:07d}.npz", f, compressed,
                           rgb_static=rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
                           rgb_gripper=rng.integers(0, 256, (84, 84, 3), dtype=np.uint8))
    ds = data.CalvinDataset(root, "training", H, L, image_size=S)
    assert (ds.offsets >= 0).all() != compressed  # direct reads only for stored (np.savez) members
    got = ds._load_frames(0, np.arange(8))
    for f in range(8):
        with np.load(root / "training" / f"episode_{f:07d}.npz") as z:
            assert np.array_equal(got["static"][f], z["rgb_static"])
            assert np.array_equal(got["wrist"][f], z["rgb_gripper"])


@pytest.fixture
def small_calvin(tmp_path):
    root = tmp_path / "calvin_debug_dataset"
    write_calvin_split(root / "training", [(0, 29)], [((0, 9), "a", "ta"), ((10, 19), "b", "tb"),
                                                      ((20, 29), "c", "tc")])
    return root


def test_calvin_missing_directory_and_annotations(tmp_path, small_calvin):
    with pytest.raises(data.DataError, match="root directory not found"):
        data.CalvinDataset(tmp_path / "nope", "training", H, L, image_size=S)
    with pytest.raises(data.DataError, match="split directory not found"):
        data.CalvinDataset(small_calvin, "validation", H, L, image_size=S, stats={})
    (small_calvin / "training" / "lang_annotations" / "auto_lang_ann.npy").unlink()
    with pytest.raises(data.DataError, match="auto_lang_ann.npy: CALVIN language annotation file not found"):
        data.CalvinDataset(small_calvin, "training", H, L, image_size=S)


def test_calvin_annotation_length_mismatch_and_recording_boundary(small_calvin):
    path = small_calvin / "training" / "lang_annotations" / "auto_lang_ann.npy"
    ann = np.load(path, allow_pickle=True).item()
    ann["language"]["task"] = ann["language"]["task"][:2]
    np.save(path, ann, allow_pickle=True)
    with pytest.raises(data.DataError, match="3 segments but 3 instructions and 2 task names"):
        data.CalvinDataset(small_calvin, "training", H, L, image_size=S)
    ann["language"]["task"] = ["ta", "tb", "tc"]
    ann["info"]["indx"][2] = (20, 35)  # runs past the end of recording (0, 29)
    np.save(path, ann, allow_pickle=True)
    with pytest.raises(data.DataError, match=r"ep_start_end_ids.npy: annotation #2 \[20, 35\] 'c' is not inside one"):
        data.CalvinDataset(small_calvin, "training", H, L, image_size=S)
    with pytest.warns(UserWarning, match="skipped 1 annotation"):
        assert data.CalvinDataset(small_calvin, "training", H, L, image_size=S, skip_bad=True).instructions == ["a", "b"]
    path.write_bytes(path.read_bytes()[:50])  # truncated pickle
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.CalvinDataset(small_calvin, "training", H, L, image_size=S)


@pytest.mark.parametrize("problem, match", [
    ("truncated", "episode_0000013.npz \\(frame 13, in annotation #1 \\[10, 19\\] 'b'\\): corrupt or truncated npz"),
    ("missing", "episode_0000013.npz \\(frame 13, in annotation #1 \\[10, 19\\] 'b'\\): frame file is missing"),
    ("nan", "episode_0000013.npz .*rel_actions contains NaN/inf"),
    ("shape", "episode_0000013.npz .*rgb_static must be uint8 \\(h, w, 3\\), found uint8 \\(200, 200\\)"),
    ("other_size", "episode_0000013.npz .*rgb_static has shape \\(100, 100, 3\\), other frames have \\(200, 200, 3\\)"),
    ("action_dim", "episode_0000013.npz .*rel_actions must have shape \\(7,\\), found \\(6,\\)"),
])
def test_calvin_bad_frame_is_named_and_skip_bad_counts(small_calvin, problem, match):
    path = small_calvin / "training" / "episode_0000013.npz"
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif problem == "missing":
        path.unlink()
    elif problem == "nan":
        write_calvin_frame(path, 13, rel_actions=np.full(7, np.nan))
    elif problem == "shape":
        write_calvin_frame(path, 13, rgb_static=np.zeros((200, 200), np.uint8))
    elif problem == "other_size":
        write_calvin_frame(path, 13, rgb_static=np.zeros((100, 100, 3), np.uint8))
    elif problem == "action_dim":
        write_calvin_frame(path, 13, rel_actions=np.zeros(6))
    with pytest.raises(data.DataError, match=match):
        data.CalvinDataset(small_calvin, "training", H, L, image_size=S)
    with pytest.warns(UserWarning, match="skipped 1 annotation"):
        ds = data.CalvinDataset(small_calvin, "training", H, L, image_size=S, skip_bad=True)
    assert ds.n_bad == 1 and ds.instructions == ["a", "c"] and len(ds) == 2 * (10 - H + 1)
    assert "frame 13" in ds.bad[0]


def test_cli_reports_skipped_count_and_writes_stats(small_calvin, tmp_path, capsys):
    write_calvin_frame(small_calvin / "training" / "episode_0000025.npz", 25, rel_actions=np.full(7, np.inf))
    with pytest.raises(data.DataError, match="episode_0000025.npz"):
        data.main([str(small_calvin), "--window", str(H), "--chunk", str(L)])
    with pytest.warns(UserWarning, match="skipped 1 annotation"):
        ds = data.main([str(small_calvin), "--window", str(H), "--chunk", str(L), "--skip-bad",
                        "--stats-out", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "2 segments" in out and "1 bad skipped" in out and "frame 25" in out
    assert data.load_stats(tmp_path / "s.json") == {"calvin": ds.stats}


def test_calvin_scan_cache(small_calvin, tmp_path):
    a = data.CalvinDataset(small_calvin, "training", H, L, image_size=S, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("calvin_scan_*.npz"))) == 1
    (small_calvin / "training" / "episode_0000005.npz").unlink()  # the cached scan no longer opens frame files
    b = data.CalvinDataset(small_calvin, "training", H, L, image_size=S, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(a.raw_actions, b.raw_actions)
    assert a.stats == b.stats
    with pytest.raises(data.DataError, match="episode_0000005.npz"):  # a sample that needs it still says so
        b[2]  # frames 2..5


def test_calvin_image_cache_gives_identical_windows(calvin_root, tmp_path):
    plain = data.CalvinDataset(calvin_root, "training", H, L, image_size=S)
    cached = data.CalvinDataset(calvin_root, "training", H, L, image_size=S, cache_dir=tmp_path, cache_images=True)
    assert len(plain) == len(cached)
    for i in range(0, len(plain), 5):
        a, b = plain[i], cached[i]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["actions"], b["actions"])
    few = data.CalvinDataset(calvin_root, "training", H, L, views=("wrist",), image_size=S, cache_dir=tmp_path,
                             cache_images=True, few_shot=1)  # reuses the cache files, fills what is missing
    assert torch.equal(few[0]["images"][:, 0], plain[plain.win_t0.tolist().index(few.win_t0[0])]["images"][:, 1])
    with pytest.raises(ValueError, match="cache_dir"):
        data.CalvinDataset(calvin_root, "training", H, L, image_size=S, cache_images=True)


# ----------------------------------------------------------------------------------------------- HDF5

ATTRS = {"control_hz": 10, "action_convention": "delta xyz, delta euler, gripper 1 open / 0 closed",
         "dataset_key": "toy"}


def episode(n, seed, views=("static", "wrist"), gripper01=True):
    """Episode e of length n: actions[t] = seed + t/10 on pose dims, gripper open on even t; pixels encode t."""
    t = np.arange(n)
    a = np.zeros((n, 7), np.float32)
    a[:, :6] = (seed + t / 10.0)[:, None] * np.array([1, -1, 0.5, 0.1, 0.2, 0.3])
    a[:, 6] = np.where(t % 2 == 0, 1.0, 0.0 if gripper01 else -1.0)
    sizes = {"static": 48, "wrist": 24}
    images = {v: np.broadcast_to(np.stack([t % 256, np.full(n, seed), np.full(n, 9)], 1)[:, None, None, :],
                                 (n, sizes[v], sizes[v], 3)).astype(np.uint8) for v in views}
    state = np.stack([t, np.full(n, seed)], 1).astype(np.float32)
    return images, a, state


def write_toy(path, lengths=(6, 9, 3), attrs=ATTRS):
    with data.EpisodeWriter(path, attrs) as w:
        for e, n in enumerate(lengths):
            images, a, st = episode(n, e)
            w.add_episode(images, a, f"instruction {e}", f"task{e % 2}", st)


def test_hdf5_roundtrip_windows_and_masks(tmp_path):
    path = tmp_path / "toy.h5"
    write_toy(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["control_hz"] == 10 and f.attrs["format"] == data.HDF5_FORMAT
        g = f["episodes/ep_000001"]
        assert g["images/static"].shape == (9, 48, 48, 3) and g["actions"].dtype == np.float32
        assert g.attrs["instruction"] == "instruction 1" and g.attrs["complete"] == 1
    ds = data.HDF5Dataset(path, window=H, chunk=L, image_size=S, state=True)
    assert ds.key == "toy"
    assert len(ds) == (6 - H + 1) + (9 - H + 1) + 0 and ds.n_short == 1
    raw = np.concatenate([episode(n, e)[1] for e, n in enumerate((6, 9, 3))])
    stats = compute_action_stats(raw)
    np.testing.assert_allclose(ds.stats["mean"], stats["mean"], rtol=1e-6)
    w = ds[3 + 5]  # episode 1 (9 frames), window starting at its frame 5: frames 5..8, last frame = 8
    a1 = episode(9, 1)[1]
    assert w["instruction"] == "instruction 1" and w["task"] == "task1" and w["dataset"] == "toy"
    assert w["action_mask"].tolist() == [[True] * 3, [True] * 3, [True, True, False], [True, False, False]]
    for t in range(H):
        assert w["images"][t, 0, 0, 0, 0] == 5 + t and w["images"][t, 1, 1, 3, 3] == 1
        np.testing.assert_allclose(w["state"][t].numpy(), [5 + t, 1])
        for j in range(L):
            f = 5 + t + j
            want = normalize_action(a1[f], stats) if f <= 8 else np.zeros(7)
            np.testing.assert_allclose(w["actions"][t, j].numpy(), want, atol=1e-6)
    assert w["actions"][0, 0, 6] == -1.0 and w["actions"][1, 0, 6] == 1.0  # frame 5 closed (0), 6 open (1)


def test_hdf5_multiple_files_split_few_shot(tmp_path):
    write_toy(tmp_path / "a.h5", lengths=(5,) * 6)
    write_toy(tmp_path / "b.h5", lengths=(5,) * 4)
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    full = data.HDF5Dataset(paths, H, L, image_size=S)
    assert len(full.episodes) == 10 and len(full) == 10 * 2
    train = data.HDF5Dataset(paths, H, L, image_size=S, split="train", val_fraction=0.2, seed=1)
    val = data.HDF5Dataset(paths, H, L, image_size=S, split="val", val_fraction=0.2, seed=1)
    assert len(val.episodes) == 2 and len(train.episodes) == 8
    assert set(train.episodes).isdisjoint(val.episodes) and set(train.episodes) | set(val.episodes) == set(full.episodes)
    assert val.stats == train.stats  # held-out episodes use the training statistics
    shots = data.HDF5Dataset(paths, H, L, image_size=S, few_shot=2)
    assert sorted(shots.tasks) == ["task0", "task0", "task1", "task1"]
    assert len(data.HDF5Dataset(paths, H, L, image_size=S, fraction=0.5).episodes) == 5


def test_stats_json_roundtrip_and_few_shot_type(tmp_path):
    write_toy(tmp_path / "toy.h5")
    ds = data.HDF5Dataset(tmp_path / "toy.h5", H, L, image_size=S)
    data.save_stats(ds.stats_by_key, tmp_path / "stats.json")
    assert data.load_stats(tmp_path / "stats.json") == {"toy": ds.stats}
    again = data.HDF5Dataset(tmp_path / "toy.h5", H, L, image_size=S, stats=data.load_stats(tmp_path / "stats.json")["toy"])
    assert torch.equal(again[2]["actions"], ds[2]["actions"])
    with pytest.raises(ValueError, match="few_shot must be a number"):
        data.HDF5Dataset(tmp_path / "toy.h5", H, L, image_size=S, few_shot={"task0": [[0, 5]]})


def test_hdf5_writer_validates_input(tmp_path):
    images, a, st = episode(5, 0)
    with pytest.raises(ValueError, match=r"must include \['control_hz'\]"):
        data.EpisodeWriter(tmp_path / "x.h5", {"action_convention": "x"})
    with data.EpisodeWriter(tmp_path / "x.h5", ATTRS) as w:
        with pytest.raises(data.DataError, match=r"images\['wrist'\] has 4 frames but actions have 5"):
            w.add_episode({"static": images["static"], "wrist": images["wrist"][:4]}, a, "i", "t")
        bad = a.copy()
        bad[2, 3] = np.inf
        with pytest.raises(data.DataError, match="action at frame 2, dim 3 is inf"):
            w.add_episode(images, bad, "i", "t")
        with pytest.raises(data.DataError, match=r"images\['static'\] must be uint8 \(T, h, w, 3\)"):
            w.add_episode({"static": images["static"].astype(np.float32)}, a, "i", "t")
        with pytest.raises(data.DataError, match="state must have shape"):
            w.add_episode(images, a, "i", "t", st[:3])
        w.add_episode(images, a, "i", "t")
    with pytest.raises(data.DataError, match="file attr 'control_hz' is '10' but this writer got '30'"):
        data.EpisodeWriter(tmp_path / "x.h5", {**ATTRS, "control_hz": 30})


def test_hdf5_bad_files_and_episodes(tmp_path):
    good = tmp_path / "good.h5"
    write_toy(good, lengths=(6, 6, 6))
    # an episode whose arrays disagree in length, and one with NaN actions (written around the writer's checks)
    with h5py.File(good, "a") as f:
        del f["episodes/ep_000001/actions"]
        f["episodes/ep_000001"].create_dataset("actions", data=np.zeros((5, 7), np.float32))
        a = f["episodes/ep_000002/actions"][()]
        a[4, 0] = np.nan
        f["episodes/ep_000002/actions"][...] = a
    with pytest.raises(data.DataError, match=r"good.h5 episode ep_000001: images\['static'\] has 6 frames but actions have 5"):
        data.HDF5Dataset(good, H, L, image_size=S)
    with pytest.warns(UserWarning, match="skipped 2 bad"):
        ds = data.HDF5Dataset(good, H, L, image_size=S, skip_bad=True)
    assert ds.n_bad == 2 and ds.episodes == [(0, "ep_000000")]
    assert "ep_000002: action at frame 4, dim 0 is nan" in ds.bad[1]
    with pytest.raises(data.DataError, match=r"no images for view 'wrist'"):
        p = tmp_path / "static_only.h5"
        with data.EpisodeWriter(p, ATTRS) as w:
            w.add_episode(episode(6, 0, views=("static",))[0], episode(6, 0)[1], "i", "t")
        data.HDF5Dataset(p, H, L, image_size=S)
    with h5py.File(good, "a") as f:  # an image array of the wrong shape (T, h, w): no colour channels
        g = f["episodes/ep_000000"]
        im = g["images/static"][()]
        del g["images/static"]
        g.create_dataset("images/static", data=im[..., 0])
    with pytest.raises(data.DataError, match=r"good.h5 episode ep_000000: images\['static'\] must be uint8 \(T, h, w, 3\), got uint8 \(6, 48, 48\)"):
        data.HDF5Dataset(good, H, L, image_size=S, skip_bad=False)
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(good.read_bytes()[:4000])
    with pytest.raises(data.DataError, match="trunc.h5: cannot open as HDF5 .*corrupt or truncated"):
        data.HDF5Dataset(trunc, H, L, image_size=S)
    with pytest.raises(data.DataError, match="no complete, valid episodes"):
        data.HDF5Dataset([trunc, good], H, L, image_size=S, skip_bad=True)  # everything is bad now
    write_toy(tmp_path / "ok.h5", lengths=(6,))
    with pytest.warns(UserWarning, match="skipped 4 bad"):
        ds = data.HDF5Dataset([trunc, good, tmp_path / "ok.h5"], H, L, image_size=S, skip_bad=True)
    assert ds.n_bad == 4 and ds.episodes == [(2, "ep_000000")]  # truncated file + 3 bad episodes
    with pytest.raises(data.DataError, match="HDF5 file not found"):
        data.HDF5Dataset(tmp_path / "missing.h5", H, L, image_size=S)


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    import h5py, numpy as np
    sys.path[:0] = [{repo!r}, {tests!r}]
    import data
    from test_data import ATTRS, episode
    w = data.EpisodeWriter({path!r}, ATTRS)
    for e in range(2):
        images, a, st = episode(7, e)
        w.add_episode(images, a, f"instruction {{e}}", "t", st)
    real = h5py.Group.create_dataset
    def stall(self, name, *args, **kw):  # freeze inside the third episode, after its images hit the file
        ds = real(self, name, *args, **kw)
        if name == "actions":
            print("MID-EPISODE", flush=True)
            time.sleep(120)
        return ds
    h5py.Group.create_dataset = stall
    images, a, st = episode(7, 2)
    w.add_episode(images, a, "instruction 2", "t", st)
""")


def test_hdf5_interrupted_write_keeps_earlier_episodes(tmp_path):
    path = tmp_path / "rec.h5"
    script = WRITER_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MID-EPISODE"
    finally:
        proc.kill()  # SIGKILL: no cleanup, no close, no flush
        proc.wait()
    ds = data.HDF5Dataset(path, H, L, image_size=S, state=True)
    assert [ep for _, ep in ds.episodes] == ["ep_000000", "ep_000001"]
    with h5py.File(path, "r") as f:
        for e in range(2):
            np.testing.assert_array_equal(f[f"episodes/ep_{e:06d}/actions"][()], episode(7, e)[1])
            np.testing.assert_array_equal(f[f"episodes/ep_{e:06d}/images/static"][()], episode(7, e)[0]["static"])
    # the recorder can reopen the file and carry on; the partial episode (if it reached disk) is dropped
    with data.EpisodeWriter(path, ATTRS) as w:
        images, a, st = episode(7, 5)
        w.add_episode(images, a, "instruction 5", "t", st)
    ds = data.HDF5Dataset(path, H, L, image_size=S)
    assert ds.instructions == ["instruction 0", "instruction 1", "instruction 5"] and ds.n_incomplete == 0


# ----------------------------------------------------------------------------------------------- mixtures, loaders


def test_mixture_keeps_each_datasets_key_and_stats(tmp_path, calvin_root):
    write_toy(tmp_path / "toy.h5", lengths=(8,) * 5)
    toy = data.HDF5Dataset(tmp_path / "toy.h5", H, L, image_size=S)
    calvin = data.CalvinDataset(calvin_root, "training", H, L, image_size=S)
    mix = data.MixtureDataset([(calvin, 3.0), (toy, 1.0)], length=400, seed=0)
    assert mix.stats_by_key == {"calvin": calvin.stats, "toy": toy.stats}
    with pytest.raises(AttributeError, match="stats_by_key"):
        mix.stats
    share = (mix.which == 0).mean()
    assert 0.68 < share < 0.82  # ~3:1
    for i in range(0, 400, 37):
        w, k, j = mix[i], mix.which[i], mix.inner[i]
        src = (calvin, toy)[k][int(j)]
        assert w["dataset"] == (calvin, toy)[k].key
        assert torch.equal(w["actions"], src["actions"])  # normalized with its own dataset's statistics
    counts = np.bincount(mix.inner[mix.which == 1], minlength=len(toy))
    assert counts.max() - counts.min() <= 1  # windows of a dataset are cycled, not drawn with replacement
    other = data.HDF5Dataset(tmp_path / "toy.h5", H + 1, L, image_size=S, key="toy2")
    with pytest.raises(ValueError, match="batches need one shape"):
        data.MixtureDataset([(toy, 1), (other, 1)])


def test_dataloader_workers_and_distributed_sampler(tmp_path, calvin_root):
    write_toy(tmp_path / "toy.h5", lengths=(8,) * 4)
    toy = data.HDF5Dataset(tmp_path / "toy.h5", H, L, image_size=S)
    calvin = data.CalvinDataset(calvin_root, "training", H, L, image_size=S)
    mix = data.MixtureDataset([(calvin, 1.0), (toy, 1.0)], length=16)
    loader = data.make_dataloader(mix, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    b = batches[0]
    assert b["images"].shape == (4, H, 2, 3, S, S) and b["actions"].shape == (4, H, L, 7)
    assert b["action_mask"].shape == (4, H, L) and len(b["dataset"]) == 4 and isinstance(b["instruction"][0], str)
    ordered = data.make_dataloader(toy, batch_size=5, num_workers=2, shuffle=False, drop_last=False)
    got = torch.cat([b["images"] for b in ordered])  # read by two worker processes, each with its own h5py handle
    assert torch.equal(got, torch.stack([toy[i]["images"] for i in range(len(toy))]))
    seen = [set(data.make_dataloader(toy, 2, distributed=True, num_replicas=2, rank=r).sampler) for r in (0, 1)]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == len(toy)


# ----------------------------------------------------------------------------------------------- images


def test_resize_matches_pil_bicubic():
    from PIL import Image

    yy, xx = np.mgrid[0:200, 0:200]
    img = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)  # smooth gradients
    ours = data.resize_images(img, 224)  # (3, 224, 224)
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))  # PIL antialiases too
    diff = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - pil.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 2
    batch = data.resize_images(torch.from_numpy(np.stack([img, img[::-1]]))[None], 64)
    assert batch.shape == (1, 2, 3, 64, 64) and batch.dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8 images"):
        data.resize_images(img.astype(np.float32), 64)


def test_normalize_images():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = data.normalize_images(x, data.CLIP_MEAN, data.CLIP_STD)
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), (1 - np.array(data.CLIP_MEAN)) / np.array(data.CLIP_STD),
                               rtol=1e-6)


def test_random_shift_is_a_replicate_padded_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (6, 5, 3, 20, 20), dtype=torch.uint8)
    y = data.random_shift(x, 4, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = torch.nn.functional.pad(x.float().reshape(30, 3, 20, 20), (4,) * 4, mode="replicate")
    shifts = set()
    for b, (img, out) in enumerate(zip(padded, y.reshape(30, 3, 20, 20).float())):
        found = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(img[:, dy:dy + 20, dx:dx + 20], out)]
        assert found, f"frame {b} is not a crop of its padded image"
        shifts.add(found[0])
    assert len(shifts) > 5  # every frame draws its own shift
    assert torch.equal(data.random_shift(x, 0), x)
