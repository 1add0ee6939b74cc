"""The Meta-World adapter (evaluate.py section 2): action and observation conversion, seeds, demos, results."""

import os

import numpy as np
import pytest

import evaluate as E  # (first: it picks MUJOCO_GL before mujoco is imported)

pytest.importorskip("metaworld")


# --- action conversion ---------------------------------------------------------------------------------------

def test_canonical_to_metaworld_maps_gripper_and_ignores_rotation():
    a = np.array([0.5, -0.2, 0.1, 0.3, -0.3, 0.9, 1.0], np.float32)  # gripper +1 = open
    np.testing.assert_allclose(E.canonical_to_metaworld(a), [0.5, -0.2, 0.1, -1.0])  # Meta-World: -1 opens
    a[6] = -1.0  # closed
    assert E.canonical_to_metaworld(a)[3] == 1.0
    a[:3] = [3.0, -5.0, 0.0]  # out of range -> clipped to Meta-World's box
    np.testing.assert_allclose(E.canonical_to_metaworld(a)[:3], [1.0, -1.0, 0.0])


def test_metaworld_to_canonical_round_trip():
    for g in (-1.0, 1.0):
        a4 = np.array([0.1, 0.2, -0.3, g], np.float32)
        a7 = E.metaworld_to_canonical(a4)
        assert a7.shape == (7,) and a7.dtype == np.float32
        assert (a7[3:6] == 0).all() and a7[6] == -g  # canonical: +1 open; Meta-World: +1 closes
        np.testing.assert_allclose(E.canonical_to_metaworld(a7), a4)


def test_action_conversion_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="shape"):
        E.canonical_to_metaworld(np.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        E.metaworld_to_canonical(np.zeros(7))
    with pytest.raises(ValueError, match="NaN"):
        E.canonical_to_metaworld(np.full(7, np.nan))


# --- the environment ----------------------------------------------------------------------------------------

def test_observation_dict_and_seeding():
    env = E.MetaWorldEnv("drawer-open", image_size=32, max_steps=5)
    try:
        o1 = env.reset(1_000_123)
        assert set(o1) == {"static", "wrist", "state"}
        for cam in ("static", "wrist"):
            assert o1[cam].shape == (32, 32, 3) and o1[cam].dtype == np.uint8 and o1[cam].std() > 5
        assert o1["state"].shape == (4,) and o1["state"].dtype == np.float32
        o2 = env.reset(1_000_123)  # same seed, same scene, same pixels
        np.testing.assert_array_equal(o1["static"], o2["static"])
        o3 = env.reset(1_000_124)  # another seed moves the drawer
        assert not np.array_equal(o1["static"], o3["static"])
        assert env.instruction == "open the drawer"
        done_steps = 0
        while not env.done:
            env.step(np.zeros(7, np.float32))
            done_steps += 1
        assert done_steps == 5
    finally:
        env.close()
        E.close_renderer()


def test_gripper_sign_reaches_the_fingers():
    """Canonical -1 must close the Sawyer gripper and +1 open it (state[3] is Meta-World's finger opening)."""
    env = E.MetaWorldEnv("drawer-open", cameras=(), max_steps=40)
    env.reset(1_000_000)
    for _ in range(15):
        obs, _ = env.step(np.array([0, 0, 0, 0, 0, 0, -1], np.float32))
    closed = obs["state"][3]
    for _ in range(15):
        obs, _ = env.step(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
    assert obs["state"][3] > closed + 0.2, (closed, obs["state"][3])
    env.close()


def test_scripted_expert_succeeds_through_the_canonical_conversion():
    # the expert's actions pass metaworld_to_canonical -> canonical_to_metaworld; Meta-World's own success check
    assert E.baseline_success("button-press-topdown", E.eval_seeds(0, 2), "expert") == 1.0


def test_unknown_task_and_camera_are_clear_errors():
    with pytest.raises(ValueError, match="known tasks"):
        E.MetaWorldEnv("make-coffee")
    with pytest.raises(ValueError, match="camera"):
        E.MetaWorldEnv("drawer-open", cameras=("top",))


def test_demo_and_eval_seeds_never_overlap():
    ev = E.eval_seeds(0, 1000) + E.eval_seeds(999, 1000)
    assert min(ev) >= E.EVAL_SEEDS[0] and max(ev) < E.EVAL_SEEDS[1]
    assert E.DEMO_SEEDS[1] <= E.EVAL_SEEDS[0]  # demo seeds are DEMO_SEEDS[0] + seed * 10000 + i, seed < 100
    assert len(set(E.eval_seeds(3, 10))) == 10


# --- demonstrations -----------------------------------------------------------------------------------------

def test_noisy_demo_keeps_clean_expert_labels():
    task, seed, ep = E._demo_episode(("button-press-topdown", 8, 32, ("static",), 200, 0.5))
    assert ep is not None and set(ep["images"]) == {"static"}
    # labels are the expert's own actions in the visited states: replaying them from the visited states'
    # raw observations is not possible here, but they must lie in the expert's clipped range with a binary gripper
    assert np.abs(ep["actions"][:, :3]).max() <= 1.0 and set(np.unique(ep["actions"][:, 6])) <= {-1.0, 1.0}
    _, _, clean = E._demo_episode(("button-press-topdown", 8, 32, ("static",), 200, 0.0))
    E.close_renderer()
    assert not np.array_equal(ep["state"], clean["state"][:len(ep["state"])])  # the noise moved the arm

def test_demo_episode_replays_to_success():
    task, seed, ep = E._demo_episode(("button-press-topdown", 7, 32, ("static", "wrist"), 200, 0.0))
    assert ep is not None
    T = len(ep["actions"])
    assert ep["images"]["static"].shape == (T, 32, 32, 3) and ep["state"].shape == (T, 4)
    assert set(np.unique(ep["actions"][:, 6])) <= {-1.0, 1.0}
    E.close_renderer()
    # the recorded canonical actions, replayed open loop from the same seed, succeed again (determinism)
    env = E.MetaWorldEnv(task, cameras=(), max_steps=T)
    acts = iter(ep["actions"])
    ok, _, _ = E._rollout(env, seed, lambda o, e: next(acts))
    assert ok and env.t == T


def test_demo_cache_is_reused(tmp_path):
    h5py = pytest.importorskip("h5py")
    # Temporary files of the same cache entry: a live process's (another sweep process rendering the same demos
    # right now) must survive; an interrupted run's (dead pid, or the old pid-less name) are removed.
    final = E.demo_paths(["button-press-topdown"], 2, 32, 0, tmp_path)["button-press-topdown"]
    live, dead, old = (tmp_path / f"{final.name}.tmp{pid}" for pid in (os.getppid(), 2 ** 22 + 12345, ""))
    for f in (live, dead, old):
        f.write_text("partial")
    paths = E.generate_demos(["button-press-topdown"], 2, image_size=32, cache_dir=tmp_path, workers=1,
                             progress=False)
    with h5py.File(paths[0]) as f:
        eps = sorted(f["episodes"])
        assert len(eps) == 2
        assert f["episodes"][eps[0]].attrs["instruction"] == "press the button from the top"
        assert f.attrs["control_hz"] == E.METAWORLD_CONTROL_HZ
    assert live.read_text() == "partial" and not dead.exists() and not old.exists()
    live.unlink()
    stamp = [p.stat().st_mtime_ns for p in tmp_path.iterdir()]
    again = E.generate_demos(["button-press-topdown"], 2, image_size=32, cache_dir=tmp_path, workers=1,
                             progress=False)
    assert again == paths and [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == stamp
    # a damaged cache file (here: emptied, as a crashed writer could leave it) is set aside and rendered again
    with h5py.File(paths[0], "w") as f:
        f.create_group("episodes")
    assert E.generate_demos(["button-press-topdown"], 2, image_size=32, cache_dir=tmp_path, workers=1,
                            progress=False) == paths
    with h5py.File(paths[0]) as f:
        assert sum(g.attrs.get("complete", 0) for g in f["episodes"].values()) == 2
    assert (tmp_path / (final.name + ".bad")).exists()
    # another configuration is another file
    other = E.demo_paths(["button-press-topdown"], 3, 32, 0, tmp_path)
    assert str(other["button-press-topdown"]) != paths[0]


# --- results ------------------------------------------------------------------------------------------------

def test_results_table_and_gif(tmp_path):
    res = {"a": {"instruction": "do a", "policy": 0.5, "expert": 1.0, "random": 0.0},
           "b": {"instruction": "do b", "policy": 1.0, "expert": 1.0, "random": 0.1}}
    text = E.write_results(tmp_path, res, "header")
    assert "| a | do a | 50% | 100% | 0% |" in text and "**75.0%**" in text and "**5.0%**" in text
    assert (tmp_path / "results.md").read_text() == text
    frames = [{"static": np.full((8, 8, 3), i, np.uint8), "wrist": np.zeros((8, 8, 3), np.uint8)} for i in range(6)]
    from PIL import Image
    p = E.save_gif(frames, tmp_path / "x.gif", every=2)
    im = Image.open(p)
    assert im.size == (32, 16) and im.n_frames == 3
