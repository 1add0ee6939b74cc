"""LeRobotDataset (v3.0, v2.1) and RLDS/TFDS readers: tiny datasets written in the real formats by real tools.

LeRobot: parquet by pyarrow, mp4 by PyAV (AV1 with libsvtav1 at LeRobot's defaults g=2 crf=30 yuv420p, and
H.264), layouts and info.json fields as in a real v3.0 / v2.1 dataset (docs/data_formats.md; lerobot itself
needs Python 3.12). RLDS: tf.train.Example records written by the `tfrecord` package's TFRecordWriter (its own
CRC framing and Example classes), features.json in TFDS's FeaturesDict tree like the bridge fixture of
tensorflow_datasets (robotics/dummy_data/bridge/1.0.0). Every frame has its own flat colour, so a decoded
frame identifies its source frame despite lossy video; windows, chunks, masks and statistics are checked
against the arrays the writers were given.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import compute_action_stats, normalize_action

av = pytest.importorskip("av")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
tfrecord = pytest.importorskip("tfrecord")

ROOT = Path(__file__).resolve().parents[1]
H, L, S = 2, 3, 32


def colour(cam, ep, t):
    """A flat RGB colour unique to (camera, episode, frame): the decoded frame's mean names its source."""
    return np.array([(20 + 23 * t) % 230 + 10, (40 + 61 * ep) % 230 + 10, 60 + 120 * cam], np.uint8)


def make_episode(ep, n, size=(32, 32), n_cams=2, seed=0, tasks=("pick up the red block",)):
    """Ground truth of one episode: images per camera (T, h, w, 3), 7-d actions (gripper in {0, 1}), task per frame."""
    rng = np.random.default_rng(seed + ep)
    a = rng.normal(0, 0.3, (n, 7)).astype(np.float32)
    a[:, 6] = (np.arange(n) // 3 + ep) % 2  # 1 = open, 0 = closed (bridge convention)
    images = [np.broadcast_to(np.stack([colour(c, ep, t) for t in range(n)])[:, None, None],
                              (n, *size, 3)).copy() for c in range(n_cams)]
    task = [tasks[min(len(tasks) - 1, t * len(tasks) // n)] for t in range(n)]  # several tasks: split in order
    return {"images": images, "actions": a, "task": task, "state": rng.normal(size=(n, 5)).astype(np.float32)}


def encode_mp4(path, frames, fps, codec="libsvtav1"):
    """frames uint8 (T, h, w, 3) -> mp4 written by PyAV (LeRobot's encoder defaults for AV1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"g": "2", "crf": "30", "preset": "12"} if codec == "libsvtav1" else {"g": "5"}
        for i, im in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(im), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _features(cams, n_state, fps, size, dtype="video", codec="av1"):
    f = {"action": {"dtype": "float32", "shape": [7], "names": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]},
         "observation.state": {"dtype": "float32", "shape": [n_state], "names": None}}
    for k in cams:
        f[k] = {"dtype": dtype, "shape": [*size, 3], "names": ["height", "width", "channels"]}
        if dtype == "video":
            f[k]["info"] = {"video.height": size[0], "video.width": size[1], "video.codec": codec,
                            "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                            "video.channels": 3, "has_audio": False}
    for k, t in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                 ("index", "int64"), ("task_index", "int64")):
        f[k] = {"dtype": t, "shape": [1], "names": None}
    return f


def _frame_table(eps, ep_ids, task_index, fps, first_index, png_cams=()):
    cols = {k: [] for k in ("action", "observation.state", "timestamp", "frame_index", "episode_index", "index",
                            "task_index", *dict(png_cams))}
    i = first_index
    for e in ep_ids:
        d = eps[e]
        for t in range(len(d["actions"])):
            cols["action"].append(d["actions"][t].tolist())
            cols["observation.state"].append(d["state"][t].tolist())
            cols["timestamp"].append(np.float32(t / fps))
            cols["frame_index"].append(t)
            cols["episode_index"].append(e)
            cols["index"].append(i)
            cols["task_index"].append(task_index[d["task"][t]])
            for k, c in png_cams:  # (column, camera index): PNG bytes in the parquet (dtype image)
                buf = io.BytesIO()
                from PIL import Image
                Image.fromarray(d["images"][c][t]).save(buf, format="PNG")
                cols[k].append({"bytes": buf.getvalue(), "path": None})
            i += 1
    types = {"action": pa.list_(pa.float32(), 7), "observation.state": pa.list_(pa.float32(), 5),
             "timestamp": pa.float32(), **{k: pa.int64() for k in ("frame_index", "episode_index", "index",
                                                                   "task_index")},
             **{k: pa.struct([("bytes", pa.binary()), ("path", pa.string())]) for k, _ in png_cams}}
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def tasks_table(tasks):
    """meta/tasks.parquet as pandas writes LeRobot's tasks DataFrame: task_index, and the task string as the
    index (the pandas metadata marks __index_level_0__ as the index; checked against the library's file)."""
    meta = {"index_columns": ["__index_level_0__"], "column_indexes": [],
            "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                         "numpy_type": "int64", "metadata": None},
                        {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                         "numpy_type": "object", "metadata": None}], "pandas_version": "2.2.0"}
    t = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "__index_level_0__": tasks})
    return t.replace_schema_metadata({"pandas": json.dumps(meta)})


def write_lerobot_v3(root, eps, fps=10, cams=("observation.images.top", "observation.images.wrist")):
    """A v3.0 folder: episodes 0-1 in data file-000, the rest in file-001; the top camera in one mp4 for all
    episodes, the wrist camera in file-000 (episode 0) and file-001 (the rest): episodes share files, cameras of
    one episode sit in different file indices, video offsets come from from_timestamp."""
    root = Path(root)
    tasks = sorted({t for d in eps for t in d["task"]})
    task_index = {t: i for i, t in enumerate(tasks)}
    size = eps[0]["images"][0].shape[1:3]
    data_file = [0 if e < 2 else 1 for e in range(len(eps))]
    vid_file = {cams[0]: [0] * len(eps), cams[1]: [0 if e < 1 else 1 for e in range(len(eps))]}
    index, rows = 0, []
    for f in sorted(set(data_file)):
        ids = [e for e in range(len(eps)) if data_file[e] == f]
        path = root / f"data/chunk-000/file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table(eps, ids, task_index, fps, index), path)
        index += sum(len(eps[e]["actions"]) for e in ids)
    offsets = {}
    for c, k in enumerate(cams):
        for f in sorted(set(vid_file[k])):
            ids = [e for e in range(len(eps)) if vid_file[k][e] == f]
            encode_mp4(root / f"videos/{k}/chunk-000/file-{f:03d}.mp4",
                       np.concatenate([eps[e]["images"][c] for e in ids]), fps)
            t0 = 0
            for e in ids:
                offsets[k, e] = (t0 / fps, (t0 + len(eps[e]["actions"])) / fps)
                t0 += len(eps[e]["actions"])
    start = 0
    for e, d in enumerate(eps):
        n = len(d["actions"])
        row = {"episode_index": e, "tasks": sorted(set(d["task"])), "length": n, "data/chunk_index": 0,
               "data/file_index": data_file[e], "dataset_from_index": start, "dataset_to_index": start + n,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        for k in cams:
            row.update({f"videos/{k}/chunk_index": 0, f"videos/{k}/file_index": vid_file[k][e],
                        f"videos/{k}/from_timestamp": offsets[k, e][0], f"videos/{k}/to_timestamp": offsets[k, e][1]})
        rows.append(row)
        start += n
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(tasks_table(tasks), root / "meta/tasks.parquet")
    info = {"codebase_version": "v3.0", "robot_type": "test_arm", "total_episodes": len(eps), "total_frames": start,
            "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": _features(cams, 5, fps, size)}
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    (root / "meta/stats.json").write_text("{}")
    return root


def write_lerobot_v21(root, eps, fps=10, cams=("observation.images.cam_high", "observation.images.cam_left_wrist")):
    """A v2.1 folder: one parquet and one mp4 (H.264) per episode; the wrist camera as dtype image (PNG bytes)."""
    root = Path(root)
    tasks = sorted({t for d in eps for t in d["task"]})
    task_index = {t: i for i, t in enumerate(tasks)}
    index = 0
    for e, d in enumerate(eps):
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table(eps, [e], task_index, fps, index, png_cams=((cams[1], 1),)), path)
        index += len(d["actions"])
        encode_mp4(root / f"videos/chunk-000/{cams[0]}/episode_{e:06d}.mp4", d["images"][0], fps, "libx264")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps({"episode_index": e, "tasks": sorted(set(d["task"])),
                                                                  "length": len(d["actions"])}) + "\n"
                                                      for e, d in enumerate(eps)))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(tasks)))
    feats = _features(cams[:1], 5, fps, eps[0]["images"][0].shape[1:3], codec="h264")
    feats.update(_features(cams[1:], 5, fps, eps[0]["images"][1].shape[1:3], dtype="image"))
    info = {"codebase_version": "v2.1", "robot_type": "test_arm", "total_episodes": len(eps), "total_frames": index,
            "total_tasks": len(tasks), "total_videos": len(eps), "total_chunks": 1, "chunks_size": 1000, "fps": fps,
            "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": feats}
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    return root


def _tfds_tensor(shape, dtype):
    return {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]} if shape else {}, "dtype": dtype,
                       "encoding": "none"}}


def _tfds_dict(features):
    return {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            "featuresDict": {"features": features}}


def write_rlds(root, eps, name="my_robot", layout="flat", cams=("image", "wrist_image"), shards=2, fmt="PNG"):
    """A TFDS folder: dataset_info.json, features.json, <name>-train.tfrecord-0000i-of-0000n, one Example per
    episode (TFDS's encoding: step fields flattened under steps/, packed over the steps). layout "flat":
    steps/action float32 (7,) and steps/language_instruction (bridge_orig); "oxe": the action dict
    world_vector / rotation_delta / open_gripper / terminate_episode and
    steps/observation/natural_language_instruction (the OXE bridge copy, as in the TFDS fixture)."""
    from PIL import Image
    from tfrecord.writer import TFRecordWriter
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    size = eps[0]["images"][0].shape[1:3]
    obs = {c: {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
               "image": {"shape": {"dimensions": [str(size[0]), str(size[1]), "3"]}, "dtype": "uint8"}}
           for c in cams}
    obs["state"] = _tfds_tensor([5], "float32")
    step = {"is_first": _tfds_tensor([], "bool"), "is_last": _tfds_tensor([], "bool"),
            "is_terminal": _tfds_tensor([], "bool"), "reward": _tfds_tensor([], "float32")}
    if layout == "flat":
        step["action"] = _tfds_tensor([7], "float32")
        step["language_instruction"] = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                                        "text": {}}  # as bridge_orig declares it
    else:
        step["action"] = _tfds_dict({"world_vector": _tfds_tensor([3], "float32"),
                                     "rotation_delta": _tfds_tensor([3], "float32"),
                                     "open_gripper": _tfds_tensor([], "bool"),
                                     "terminate_episode": _tfds_tensor([], "float32")})
        obs["natural_language_instruction"] = _tfds_tensor([], "string")
    step["observation"] = _tfds_dict(obs)
    features = _tfds_dict({"steps": {"pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                                     "sequence": {"feature": _tfds_dict(step), "length": "-1"}},
                           "episode_metadata": _tfds_dict({"file_path": _tfds_tensor([], "string")})})
    (root / "features.json").write_text(json.dumps(features, indent=2))
    per_shard = [list(range(len(eps)))[i::shards] for i in range(shards)]
    for i, ids in enumerate(per_shard):
        w = TFRecordWriter(str(root / f"{name}-train.tfrecord-{i:05d}-of-{shards:05d}"))
        for e in ids:
            d, n = eps[e], len(eps[e]["actions"])
            rec = {"steps/is_first": ([1] + [0] * (n - 1), "int"), "steps/is_last": ([0] * (n - 1) + [1], "int"),
                   "steps/is_terminal": ([0] * (n - 1) + [1], "int"), "steps/reward": ([0.0] * n, "float"),
                   "steps/observation/state": (d["state"].reshape(-1).tolist(), "float"),
                   "episode_metadata/file_path": ([f"/raw/ep{e}".encode()], "byte")}
            instr = [t.encode() for t in d["task"]]
            if layout == "flat":
                rec["steps/action"] = (d["actions"].reshape(-1).tolist(), "float")
                rec["steps/language_instruction"] = (instr, "byte")
            else:
                rec["steps/action/world_vector"] = (d["actions"][:, :3].reshape(-1).tolist(), "float")
                rec["steps/action/rotation_delta"] = (d["actions"][:, 3:6].reshape(-1).tolist(), "float")
                rec["steps/action/open_gripper"] = (d["actions"][:, 6].astype(int).tolist(), "int")
                rec["steps/action/terminate_episode"] = ([0.0] * n, "float")
                rec["steps/observation/natural_language_instruction"] = (instr, "byte")
            for c, k in enumerate(cams):
                bufs = []
                for im in d["images"][c]:
                    b = io.BytesIO()
                    Image.fromarray(im).save(b, format=fmt)
                    bufs.append(b.getvalue())
                rec[f"steps/observation/{k}"] = (bufs, "byte")
            w.write(rec)
        w.close()
    info = {"fileFormat": "tfrecord", "name": name, "version": "1.0.0",
            "splits": [{"filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", "name": "train",
                        "shardLengths": [str(len(ids)) for ids in per_shard]}]}
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root


def expected_frames(eps, drop_last=False, order=None):
    """Ground-truth frame table in reading order: (episode, frame, raw 7-d action with gripper +-1, task)."""
    rows = []
    for e in order or range(len(eps)):
        d = eps[e]
        for t in range(len(d["actions"]) - int(drop_last)):
            a = d["actions"][t].copy()
            a[6] = 1.0 if a[6] > 0.5 else -1.0
            rows.append((e, t, a, d["task"][t]))
    return rows


def check_windows(ds, eps, rows, cams=(0, 1)):
    """Every window against the ground truth: images (by colour), actions, masks, instruction; and the stats."""
    truth = np.stack([r[2] for r in rows])
    assert np.allclose(ds.raw_actions, truth, atol=1e-6)
    assert ds.stats == compute_action_stats(truth)
    norm = normalize_action(truth, ds.stats).astype(np.float32)
    # segments: maximal runs of one (episode, task)
    seg_of_row = np.cumsum([i == 0 or rows[i][:1] + rows[i][3:] != rows[i - 1][:1] + rows[i - 1][3:]
                            for i in range(len(rows))]) - 1
    n_seg = seg_of_row[-1] + 1
    assert len(ds.seg_start) == n_seg
    assert len(ds) == sum(max(0, int((seg_of_row == s).sum()) - H + 1) for s in range(n_seg))
    for i in range(len(ds)):
        w = ds[i]
        t0 = int(ds.win_t0[i])
        end = int(np.nonzero(seg_of_row == seg_of_row[t0])[0][-1])
        assert w["images"].shape == (H, len(ds.views), 3, S, S) and w["images"].dtype == torch.uint8
        assert w["instruction"] == rows[t0][3] and w["dataset"] == ds.key
        for h in range(H):
            e, t = rows[t0 + h][:2]
            for k, c in enumerate(cams):
                got = w["images"][h, k].float().mean((1, 2)).numpy()
                assert np.abs(got - colour(c, e, t)).max() <= 4, (i, h, k, got, colour(c, e, t))
            for j in range(L):
                r = t0 + h + j
                assert bool(w["action_mask"][h, j]) == (r <= end)
                want = norm[r] if r <= end else np.zeros(7, np.float32)
                assert np.allclose(w["actions"][h, j].numpy(), want, atol=1e-5)


@pytest.fixture(scope="module")
def episodes():
    return [make_episode(0, 7), make_episode(1, 8, tasks=("open the drawer", "close the drawer")),
            make_episode(2, 6)]


@pytest.fixture(scope="module")
def v3(tmp_path_factory, episodes):
    return write_lerobot_v3(tmp_path_factory.mktemp("lerobot") / "my_arm", episodes)


@pytest.fixture(scope="module")
def rlds(tmp_path_factory, episodes):
    return write_rlds(tmp_path_factory.mktemp("rlds") / "my_robot", episodes)


def test_lerobot_v3_windows_match_ground_truth(v3, episodes):
    ds = data.LeRobotDataset(v3, H, L, image_size=S)
    assert ds.cameras == {"static": "observation.images.top", "wrist": "observation.images.wrist"}
    assert ds.control_hz == 10 and ds.key == "my_arm"
    assert len(ds.seg_start) == 4  # episode 1 holds two tasks: two segments
    check_windows(ds, episodes, expected_frames(episodes))


def test_lerobot_v3_written_by_the_lerobot_library():
    """tests/data/lerobot_v30_fixture was written by LeRobot's own writer (tests/data/make_lerobot_fixture.py):
    its real task table (pandas index), episodes table (with per-episode stats columns), concatenated AV1
    videos and timestamps must give the same windows as the episodes it was given."""
    eps = [make_episode(0, 7, size=(48, 64)),
           make_episode(1, 8, size=(48, 64), tasks=("open the drawer", "close the drawer")),
           make_episode(2, 6, size=(48, 64))]
    ds = data.LeRobotDataset(ROOT / "tests/data/lerobot_v30_fixture", H, L, image_size=S)
    assert ds.cameras == {"static": "observation.images.front", "wrist": "observation.images.wrist"}
    check_windows(ds, eps, expected_frames(eps))


def test_lerobot_v21_h264_and_png_images(tmp_path, episodes):
    root = write_lerobot_v21(tmp_path / "aloha_like", episodes[:2])
    ds = data.LeRobotDataset(root, H, L, image_size=S, state=True)
    assert ds.cameras == {"static": "observation.images.cam_high", "wrist": "observation.images.cam_left_wrist"}
    check_windows(ds, episodes[:2], expected_frames(episodes[:2]))
    assert np.allclose(ds[0]["state"].numpy(), episodes[0]["state"][:H])


def test_rlds_windows_match_ground_truth_and_drop_is_last(rlds, episodes):
    ds = data.RLDSDataset(rlds, H, L, image_size=S)
    assert ds.cameras == {"static": "image", "wrist": "wrist_image"}
    assert len(ds.shards) == 2 and ds.key == "my_robot"
    # shards hold episodes 0, 2 and 1: the reader's order is shard order
    order = [0, 2, 1]
    check_windows(ds, episodes, expected_frames(episodes, drop_last=True, order=order))


def test_rlds_oxe_action_dict_and_jpeg(tmp_path, episodes):
    root = write_rlds(tmp_path / "bridge", episodes[:1], name="bridge", layout="oxe", shards=1, fmt="JPEG")
    ds = data.RLDSDataset(root, H, L, views=("static",), image_size=S)
    assert ds.control_hz == 5  # bridge, from the OXE table
    truth = np.stack([r[2] for r in expected_frames(episodes[:1], drop_last=True)])
    assert np.allclose(ds.raw_actions, truth, atol=1e-6)  # world_vector, rotation_delta, open_gripper -> +-1
    w = ds[1]
    got = w["images"][0, 0].float().mean((1, 2)).numpy()
    assert np.abs(got - colour(0, 0, 1)).max() <= 4
    assert w["instruction"] == episodes[0]["task"][0]


def test_unmappable_action_space_is_refused(tmp_path, episodes):
    root = write_lerobot_v3(tmp_path / "so100", episodes[:1])
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["action"]["names"] = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex",
                                           "wrist_roll", "gripper", "base"]
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(data.DataError, match=r"shape \(T, 7\).*joint-space"):
        data.LeRobotDataset(root, H, L, image_size=S)
    ds = data.LeRobotDataset(root, H, L, image_size=S, action_dims=[0, 1, 2, 3, 4, 5, 6])  # the user's override
    assert len(ds) > 0
    droid = {"": np.zeros((4, 7))}  # DROID's features.json: 7-d `action` described as joint velocities + gripper
    with pytest.raises(data.DataError, match="joint-space"):
        data.map_action7(droid, "x", names=["Robot action, consists of [6x joint velocities, 1x gripper position]."])
    with pytest.raises(data.DataError, match=r"shape \(T, 6\)"):
        data.map_action7({"": np.zeros((4, 6))}, "x")
    with pytest.raises(data.DataError, match=r"action dict \{'joint_velocity': \(7,\)\}"):
        data.map_action7({"joint_velocity": np.zeros((4, 7))}, "x")


def test_dataloader_workers_fork_after_ffmpeg_threads_ran(tmp_path):
    """DataLoader workers forked from a process that had encoded video (FFmpeg threads) hung in a threaded
    decoder. Run in a fresh process group, killed if it hangs."""
    import os
    import signal
    code = ("import sys; sys.path.insert(0, 'tests'); import data, test_formats as t; "
            f"root = t.write_lerobot_v21({str(tmp_path / 'v21')!r}, [t.make_episode(e, 9) for e in range(3)]); "
            "ds = data.LeRobotDataset(root, 2, 3, image_size=32); ds[0]; "
            "print(len(ds), sum(len(b['images']) for b in data.make_dataloader(ds, 4, num_workers=2, drop_last=False)))")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError("DataLoader workers hung decoding video after a fork")
    assert p.returncode == 0, err[-2000:]
    n, got = map(int, out.split()[-2:])
    assert got == n > 0


def test_frame_cache_gives_the_same_windows(tmp_path, v3, rlds):
    for n, (cls, root) in enumerate(((data.LeRobotDataset, v3), (data.RLDSDataset, rlds)), 1):
        plain, cached = cls(root, H, L, image_size=S), cls(root, H, L, image_size=S, cache_dir=tmp_path)
        assert cached._cache is not None and cached._cache.exists()
        for i in range(len(plain)):
            assert torch.equal(plain[i]["images"], cached[i]["images"])
        again = cls(root, H, L, image_size=S, cache_dir=tmp_path)  # reused, not rebuilt
        assert again._cache == cached._cache and len(list(tmp_path.iterdir())) == n


def test_camera_mapping_and_missing_camera(v3, rlds):
    ds = data.LeRobotDataset(v3, H, L, views=("static",), image_size=S,
                             cameras=data.parse_cameras("static=observation.images.wrist"))
    assert ds.cameras == {"static": "observation.images.wrist"}
    with pytest.raises(data.DataError, match="no camera for view 'wrist'.*--cameras wrist=KEY"):
        data.pick_cameras(["image_0", "image_1"], ("static", "wrist"))
    with pytest.raises(data.DataError, match="does not have"):
        data.RLDSDataset(rlds, H, L, image_size=S, cameras={"wrist": "image_9"})


def test_video_timestamp_mismatch_is_named(tmp_path):
    import shutil
    import pyarrow.compute as pc
    root = tmp_path / "shifted"
    shutil.copytree(ROOT / "tests/data/lerobot_v30_fixture", root)
    f = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(f)
    shifted = pc.add(t.column("timestamp"), pa.scalar(0.05, pa.float32()))  # half a frame at 10 fps
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp", shifted), f)
    ds = data.LeRobotDataset(root, H, L, image_size=S)
    with pytest.raises(data.DataError, match=r"file-000.mp4 \(episode 0, camera 'observation.images.front'\): no "
                                             r"video frame within 0.0001 s of t = 0.05000 s"):
        ds[0]
    assert len(data.LeRobotDataset(root, H, L, image_size=S, tolerance_s=0.06)[0]["images"]) == H


def test_fractal_relative_gripper():
    rel = np.array([0, 0, 1, 0, 0, -1, 0, 0.05], np.float32)  # close at 2, open at 5
    assert data.relative_to_absolute_gripper(rel).tolist() == [1, 1, -1, -1, -1, 1, 1, 1]
    assert data.relative_to_absolute_gripper(np.array([0, -1, 0])).tolist() == [-1, 1, 1]  # opened: was closed
    assert data.relative_to_absolute_gripper(np.zeros(3)).tolist() == [1, 1, 1]


def test_damaged_tfrecord_is_named(tmp_path, episodes):
    root = write_rlds(tmp_path / "r", episodes[:1], shards=1)
    shard = next(root.glob("*.tfrecord-*"))
    b = bytearray(shard.read_bytes())
    b[200] ^= 0xFF
    shard.write_bytes(bytes(b))
    with pytest.raises(data.DataError, match="damaged TFRecord at byte 0"):
        data.RLDSDataset(root, H, L, image_size=S)


def test_convert_to_hdf5_round_trip(tmp_path, v3):
    out = tmp_path / "conv.h5"
    r = subprocess.run([sys.executable, "data.py", "convert", str(v3), "--to", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    src = data.LeRobotDataset(v3, H, L, image_size=S)
    ds = data.HDF5Dataset(out, H, L, image_size=S)
    assert ds.key == "my_arm" and len(ds) == len(src)
    assert np.allclose(ds.raw_actions, src.raw_actions) and ds.stats == src.stats
    for i in (0, len(ds) - 1):
        a, b = ds[i], src[i]
        assert a["instruction"] == b["instruction"] and torch.equal(a["images"], b["images"])
        assert torch.equal(a["actions"], b["actions"]) and torch.equal(a["action_mask"], b["action_mask"])


def test_convert_rlds_needs_a_control_rate_and_missing_packages_say_how_to_install(tmp_path, rlds):
    with pytest.raises(SystemExit, match="control rate is not stored.*--control-hz"):
        data.main(["convert", str(rlds), "--to", str(tmp_path / "a.h5")])
    data.main(["convert", str(rlds), "--to", str(tmp_path / "b.h5"), "--control-hz", "15", "--state"])
    ds = data.HDF5Dataset(tmp_path / "b.h5", H, L, image_size=S, state=True)
    src = data.RLDSDataset(rlds, H, L, image_size=S, state=True)
    assert np.allclose(ds.raw_actions, src.raw_actions) and np.allclose(ds.state, src.state)
    with pytest.raises(ImportError, match=r"needs the Python package 'pyarrow' .*pip install pyarrow"):
        data._need("pyarrow_not_installed_here", "pyarrow", "a LeRobotDataset")


def test_train_on_lerobot_plus_rlds_mixture(tmp_path, v3, rlds):
    """Done-when: train.py --data <lerobot> <rlds> --data-weights 1 1 trains a few steps and evaluates."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--data", str(v3), str(rlds), "--data-weights", "1", "1",
                        "--steps", "3", "--batch", "4", "--image-size", "32", "--window", "2", "--chunk", "3",
                        "--eval-episodes", "2", "--ckpt-every", "3", "--warmup", "1", "--threads", "1",
                        "--loader-workers", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = json.loads((out / "action_stats.json").read_text())
    assert {"my_arm", "my_robot"} <= set(stats)
    replay = json.loads((out / "replay.json").read_text())  # Policy.act over the first 2 segments of each
    lerobot, rl = data.LeRobotDataset(v3, 2, 3, image_size=32), data.RLDSDataset(rlds, 2, 3, image_size=32)
    for ds in (lerobot, rl):
        assert replay[ds.key]["frames"] == sum(ds.seg_end[:2] - ds.seg_start[:2] + 1)
        assert 0 <= replay[ds.key]["gripper_agreement"] <= 1 and np.isfinite(replay[ds.key]["pose_l1"])
    assert "Replay of recorded episodes" in r.stdout
