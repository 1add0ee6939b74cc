"""CALVIN and SimplerEnv adapters and protocols (evaluate.py sections 4-5), run against the test doubles in
tests/fakes/calvin_env and tests/fakes/simpler_env, plus checks against things we did not write: the official
CALVIN sequence file, pyhash's FNV-1 test vectors, the official validation instructions, scipy's rotations and
the paper's own table averages."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate as ev

FAKES = Path(__file__).parent / "fakes"


def _forget(monkeypatch, *packages):
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES))
    _forget(monkeypatch, "calvin_env", "simpler_env")


# -----------------------------------------------------------------------------------------------------------
# CALVIN: the official sequence set, hashing, instructions (checked against material we did not write)
# -----------------------------------------------------------------------------------------------------------

# First and last entries of the official eval_sequences.json (RoboFlamingo/RoboFlamingo@c8c0cb1, the same
# 1000 chains RoboVLMs ships as configs/data/calvin/eval_sequences.json).
OFFICIAL_FIRST = [
    ({"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left", "blue_block": "table",
      "pink_block": "slider_right", "grasped": 0},
     ("rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider", "turn_off_lightbulb")),
    ({"led": 1, "lightbulb": 1, "slider": "right", "drawer": "open", "red_block": "slider_right", "blue_block": "table",
      "pink_block": "slider_left", "grasped": 0},
     ("turn_off_led", "push_into_drawer", "lift_blue_block_drawer", "place_in_slider", "close_drawer")),
    ({"led": 0, "lightbulb": 1, "slider": "right", "drawer": "closed", "red_block": "table",
      "blue_block": "slider_right", "pink_block": "slider_left", "grasped": 0},
     ("lift_pink_block_slider", "place_in_slider", "open_drawer", "rotate_red_block_right", "lift_red_block_table")),
    ({"led": 1, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "slider_right",
      "blue_block": "table", "pink_block": "table", "grasped": 0},
     ("rotate_blue_block_right", "lift_pink_block_table", "place_in_slider", "move_slider_left", "open_drawer")),
]
OFFICIAL_LAST = [
    ({"led": 1, "lightbulb": 0, "slider": "right", "drawer": "open", "red_block": "slider_left", "blue_block": "table",
      "pink_block": "table", "grasped": 0},
     ("move_slider_left", "lift_blue_block_table", "place_in_drawer", "close_drawer", "push_pink_block_left")),
    ({"led": 1, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "slider_right",
      "blue_block": "table", "pink_block": "slider_left", "grasped": 0},
     ("move_slider_left", "turn_on_lightbulb", "open_drawer", "rotate_blue_block_right", "lift_blue_block_table")),
    ({"led": 1, "lightbulb": 0, "slider": "left", "drawer": "closed", "red_block": "slider_right",
      "blue_block": "slider_left", "pink_block": "table", "grasped": 0},
     ("move_slider_right", "turn_on_lightbulb", "push_pink_block_left", "open_drawer", "push_into_drawer")),
]

# calvin_models/conf/annotations/new_playtable_validation.yaml (mees/calvin@c7051d2), element [0] of each task
OFFICIAL_VALIDATION = {
    **{f"rotate_{c}_block_{d}": f"take the {c} block and rotate it to the {d}"
       for c in ("red", "blue", "pink") for d in ("right", "left")},
    **{f"push_{c}_block_{d}": f"go push the {c} block {d}" for c in ("red", "blue", "pink") for d in ("right", "left")},
    "move_slider_left": "push the sliding door to the left side", "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer", "close_drawer": "push the handle to close the drawer",
    **{f"lift_{c}_block_table": f"grasp and lift the {c} block" for c in ("red", "blue", "pink")},
    **{f"lift_{c}_block_slider": f"lift the {c} block from the sliding cabinet" for c in ("red", "blue", "pink")},
    **{f"lift_{c}_block_drawer": f"Take the {c} block from the drawer" for c in ("red", "blue", "pink")},
    "place_in_slider": "store the grasped block in the sliding cabinet", "place_in_drawer": "store the grasped block in the drawer",
    "push_into_drawer": "slide the block that it falls into the drawer", "stack_block": "stack the grasped block",
    "unstack_block": "remove the stacked block", "turn_on_lightbulb": "use the switch to turn on the light bulb",
    "turn_off_lightbulb": "use the switch to turn off the light bulb", "turn_on_led": "press the button to turn on the led light",
    "turn_off_led": "press the button to turn off the led light",
}


def test_fnv1_32_matches_pyhash_test_vectors():
    # flier/pyfasthash tests/test_fnv1.py: bytes b"test" and the Python-3 str "test" (hashed as UTF-16-LE)
    assert ev.fnv1_32(b"test") == 3698262380
    assert ev.fnv1_32("test") == 3910690890
    assert ev.fnv1_32("") == 0


def test_task_table_matches_official_config():
    assert len(ev.CALVIN_TASKS) == 34
    assert ev.CALVIN_INSTRUCTIONS == OFFICIAL_VALIDATION
    spec = ev.calvin_oracle_spec()  # = calvin_models/conf/callbacks/rollout/tasks/new_playtable_tasks.yaml
    assert spec["rotate_pink_block_right"] == ["rotate_object", "block_pink", -60]
    assert spec["push_blue_block_left"] == ["push_object", "block_blue", -0.1, 0]
    assert spec["lift_red_block_slider"] == ["lift_object", "block_red", 0.03, "table", "plank_link"]
    assert spec["move_slider_left"] == ["move_door_rel", "base__slide", 0.15]
    assert spec["close_drawer"] == ["move_door_rel", "base__drawer", -0.12]
    assert spec["turn_off_led"] == ["toggle_light", "led", 1, 0]
    assert spec["push_into_drawer"] == ["push_object_into", ["block_red", "block_blue", "block_pink"], "table",
                                        "base_link", "table", "drawer_link"]


def test_initial_states_and_quota():
    states = ev.calvin_initial_states()
    assert len(states) == 192 and list(states[0]) == ["led", "lightbulb", "slider", "drawer", "red_block",
                                                      "blue_block", "pink_block", "grasped"]
    counts = [len(c) for c in np.array_split(np.arange(1000), len(states))]
    assert counts.count(6) == 40 and counts.count(5) == 152


def test_per_state_generator_reproduces_official_chains():
    """Fast check without the final shuffle: each official chain is among those drawn for its start state."""
    states = ev.calvin_initial_states()
    counts = [len(c) for c in np.array_split(np.arange(1000), len(states))]
    for state, chain in OFFICIAL_FIRST[:2] + OFFICIAL_LAST[-1:]:
        i = states.index(state)
        assert chain in ev.calvin_state_chains(i, state, counts[i])
        assert ev.calvin_chain_is_valid(state, chain)
    assert not ev.calvin_chain_is_valid(OFFICIAL_FIRST[0][0], ("open_drawer",) * 5)  # drawer already open


@pytest.mark.slow
def test_full_generator_reproduces_official_file_order():
    seqs = ev.calvin_sequences()
    assert len(seqs) == 1000
    assert seqs[:4] == OFFICIAL_FIRST and seqs[-3:] == OFFICIAL_LAST


@pytest.mark.slow
def test_novel_instructions_reproduce_roboflamingo_cache(tmp_path):
    # enrich_lang_annotations.json (RoboFlamingo@e5cde1c), the task of the first official subtask; the official
    # novel-instruction cache (lang_annotation_cache.json) starts with "pivot the cobalt unit to your right".
    rbr = ["Turn the blue block to the right", "twist the blue piece to your right", "rotate the azure object in a clockwise direction", "pivot the cobalt unit to your right", "take the blue block and give it a right-handed turn", "maneuver the cerulean item to the right", "manipulate the sapphire mechanism to face right", "revolve the indigo object in a clockwise direction", "swivel the blue creation in a rightward direction", "swing the sky-blue piece towards the right", "rotate the Prussian blue block clockwise", "face the navy block on the right side", "make the blue object head right", "orient the blue block to the right", "put the blue piece in a right turn position", "point the blue unit in the eastward direction", "cause the blue entity to turn right", "execute a right turn with the blue block", "effectuate a rightward turn with the blue part", "perform a clockwise turn with the blue object", "angle the blue block towards the right", "direct the blue piece to a rightward rotation", "drive the blue brick to turn right", "govern the cyan block to go right", "guide the royal blue piece to spin right", "lead the blue unit to rotate clockwise", "navigate the blue entity to wheel right", "steer the blue block to a right turn", "adjust the blue piece towards the right", "amend the blue object to a clockwise direction", "change the blue item to point right", "modify the blue constituent to turn clockwise", "reposition the blue brick to face right", "revamp the blue part to swivel right", "manipulate the turquoise entity to spin right", "twist the blue cube to the east", "pivot the sapphire block in the right direction", "turn the blue prism to face the east", "rotate the robin's egg blue brick clockwise", "swing the teal unit towards the right", "swivel the azure item in a clockwise manner", "manipulate the steel blue object to the right", "maneuver the midnight blue mechanism in the right direction", "flip the sky-blue gadget to the east", "spin the electric blue gear clockwise", "rotate the powder blue piece towards the right", "twist the blue-green object to the right", "revolve the baby blue block clockwise", "redirect the Persian blue item towards the right."]  # noqa: E501
    paraphrases = {t: [f"{t} variant {k}" for k in range(5)] for t in ev.CALVIN_TASKS}
    paraphrases["rotate_blue_block_right"] = rbr
    path = tmp_path / "enrich.json"
    path.write_text(json.dumps(paraphrases))
    seqs = ev.calvin_sequences()[:3]
    texts = ev.load_calvin_instructions(path, seqs, novel=True)
    assert texts[0][0] == "pivot the cobalt unit to your right"
    assert len(texts) == 3 and all(len(t) == 5 for t in texts)
    assert ev.load_calvin_instructions(path, seqs)["rotate_blue_block_right"] == rbr[0]  # not novel: element [0]


def test_env_state_for_initial_condition():
    state = dict(OFFICIAL_FIRST[0][0])  # slider left, drawer open, lights on; red on slider left, pink right
    robot, scene = ev.calvin_env_state(state)
    assert robot.shape == (15,) and scene.shape == (24,)
    np.testing.assert_allclose(robot, ev.CALVIN_NEUTRAL_ROBOT_OBS)
    assert scene[0] == 0.28 and scene[1] == 0.22 and scene[3] == 0.088 and scene[4] == 1 and scene[5] == 1
    np.testing.assert_allclose(scene[6:9], ev._BLOCK_SLIDER["slider_left"])  # red
    np.testing.assert_allclose(scene[18:21], ev._BLOCK_SLIDER["slider_right"])  # pink
    assert tuple(scene[12:15]) in ev._BLOCK_TABLE  # blue takes a table slot
    yaws = scene[[11, 17, 23]]
    assert np.all(np.abs(yaws - np.pi / 2) <= np.pi / 8)
    np.testing.assert_array_equal(ev.calvin_env_state(dict(state))[1], scene)  # deterministic per condition
    other = dict(state, led=0)
    assert not np.allclose(ev.calvin_env_state(other)[1][[11, 17, 23]], yaws)  # the hash changes the draw
    two = dict(OFFICIAL_FIRST[3][0])  # blue and pink on the table: different slots
    s2 = ev.calvin_env_state(two)[1]
    assert {tuple(s2[12:15]), tuple(s2[18:21])} == set(ev._BLOCK_TABLE)


def test_calvin_action_conversion():
    a = [0.1, -0.2, 0.3, 0.0, 0.1, -0.1, 0.3]
    out = ev.calvin_action(a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (7,)
    assert out[6] == 1.0 and list(out[:6]) == a[:6]
    src = np.array([0, 0, 0, 0, 0, 0, -0.2], dtype=np.float32)
    out = ev.calvin_action(src)
    assert out[6] == -1.0 and out is not src
    assert ev.calvin_action(np.zeros(7))[6] == -1.0  # 0 is not open
    with pytest.raises(ValueError, match="shape"):
        ev.calvin_action(np.zeros(6))
    with pytest.raises(ValueError):
        ev.calvin_action([np.nan] * 7)


def test_calvin_double_is_strict(fakes, tmp_path):
    """The double must catch what the real env rejects, or the protocol tests below would prove nothing."""
    root = _calvin_root(tmp_path)
    env, oracle = ev.make_calvin(root)
    env.reset()
    with pytest.raises(AssertionError):
        env.step(np.array([0, 0, 0, 0, 0, 0, 0.3]))  # gripper not exactly +-1
    a = np.array([1.0, 0, 0, 0, 0, 0, 1.0])
    env.step(a)
    assert a[0] == pytest.approx(0.02)  # the pinned env scales the caller's array in place
    obs = env.get_obs()
    assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["rgb_obs"]["rgb_gripper"].shape == (84, 84, 3)
    assert "rgb_tactile" not in obs["rgb_obs"]  # make_calvin drops the tactile camera
    assert oracle.num_tasks == 34
    conv = ev.calvin_obs(obs)
    assert conv["static"].dtype == np.uint8 and conv["wrist"].shape == (84, 84, 3)
    assert conv["state"].dtype == np.float32 and conv["state"].shape == (15,)


def _calvin_root(tmp_path):
    conf = tmp_path / "task_D_D" / "validation" / ".hydra"
    conf.mkdir(parents=True)
    (conf / "merged_config.yaml").write_text("# stand-in for the split's env config\n")
    return tmp_path / "task_D_D"


class ScriptedCalvinPolicy:
    """Knows how to do the door/drawer/light subtasks of the fake world; does nothing for the others.
    Keeps every returned action to check that the env did not mutate them."""

    DOOR = {"pull the handle to open the drawer": (0.7, 0, 0), "push the handle to close the drawer": (-0.7, 0, 0),
            "push the sliding door to the left side": (0, 1, 0), "push the sliding door to the right side": (0, -1, 0),
            "use the switch to turn on the light bulb": (0, 0, 1)}

    def __init__(self, gripper_open=1.0):
        self.resets, self.seen, self.returned, self.t = 0, [], [], 0
        self.gripper_open = gripper_open  # a value > 0 that the adapter must turn into exactly +1

    def reset(self):
        self.resets += 1
        self.t = 0

    def act(self, obs, instruction):
        assert obs["static"].shape == (200, 200, 3) and obs["wrist"].shape == (84, 84, 3) and obs["state"].shape == (15,)
        self.seen.append(instruction)
        a = np.zeros(7, dtype=np.float32)
        if instruction in self.DOOR:
            a[:3], a[6] = self.DOOR[instruction], -1.0  # grasp and move
        elif "led light" in instruction:  # release, then press the button (one press edge per subtask)
            a[2], a[6] = (1.0 if self.t == 0 else -1.0), self.gripper_open
        else:
            a[6] = self.gripper_open
        self.t += 1
        self.returned.append((a, a.copy()))
        return a


CHAINS = [  # (start state, chain, expected result, expected steps per attempted subtask)
    (dict(OFFICIAL_FIRST[3][0]),  # drawer closed, slider right, led on
     ("open_drawer", "move_slider_left", "turn_off_led", "rotate_red_block_right", "close_drawer"), 3, [9, 8, 2, 360]),
    (dict(OFFICIAL_FIRST[2][0], led=0),  # drawer closed, slider right, led off, bulb on
     ("open_drawer", "close_drawer", "move_slider_left", "move_slider_right", "turn_on_led"), 5, [9, 9, 8, 8, 2]),
    (dict(OFFICIAL_FIRST[0][0]), ("push_red_block_left", "open_drawer", "turn_off_led", "close_drawer",
                                  "move_slider_right"), 0, [360]),
    (dict(OFFICIAL_FIRST[3][0], led=0), ("turn_on_led", "turn_off_led", "turn_on_lightbulb", "open_drawer",
                                         "lift_blue_block_table"), 4, [2, 2, 3, 9, 360]),
]


def test_calvin_protocol_on_double(fakes, tmp_path):
    env, oracle = ev.make_calvin(_calvin_root(tmp_path))
    policy = ScriptedCalvinPolicy(gripper_open=0.37)
    seqs = [(s, c) for s, c, _, _ in CHAINS]
    summary = ev.evaluate_calvin(policy, env, oracle, seqs, out_dir=tmp_path / "out", progress=False)
    # exact chain results, steps, resets
    records = json.loads((tmp_path / "out" / "calvin_sequences.json").read_text())
    assert [r["result"] for r in records] == [r for _, _, r, _ in CHAINS]
    assert [r["steps"] for r in records] == [s for _, _, _, s in CHAINS]
    assert env.n_resets == len(CHAINS)  # once per chain, never between subtasks
    assert policy.resets == sum(len(s) for _, _, _, s in CHAINS)  # history reset at every subtask
    assert env.n_steps == sum(sum(s) for _, _, _, s in CHAINS)
    for (state, _, _, _), (robot, scene) in zip(CHAINS, env.reset_args):
        np.testing.assert_allclose(scene, ev.calvin_env_state(state)[1])
        np.testing.assert_allclose(robot, ev.CALVIN_NEUTRAL_ROBOT_OBS)
    # instructions: the first validation instruction of each attempted subtask
    assert set(policy.seen) == {ev.CALVIN_INSTRUCTIONS[t] for _, c, r, _ in CHAINS for t in c[:r + 1]}
    # actions reached the env as float64 copies with the gripper exactly +-1; the policy's arrays stay intact
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 and a[6] in (-1.0, 1.0) for a in env.received)
    assert all(np.array_equal(a, before) for a, before in policy.returned)
    # metrics, as the official count_success / print_and_save
    assert summary["chain_sr"] == {1: 0.75, 2: 0.75, 3: 0.75, 4: 0.5, 5: 0.25}
    assert summary["avg_seq_len"] == 3.0
    ti = summary["task_info"]
    assert ti["open_drawer"] == {"success": 3, "total": 3} and ti["rotate_red_block_right"] == {"success": 0, "total": 1}
    assert "close_drawer" in ti and ti["close_drawer"] == {"success": 1, "total": 1}  # chain 1's never attempted
    assert ti["push_red_block_left"] == {"success": 0, "total": 1} and "move_slider_right" in ti
    assert ti["move_slider_right"] == {"success": 1, "total": 1}  # chain 2's move_slider_right was not attempted
    table = (tmp_path / "out" / "calvin_results.md").read_text()
    assert "| 1 | 2 | 3 | 4 | 5 | Avg. Len. |" in table
    assert "| 0.750 | 0.750 | 0.750 | 0.500 | 0.250 | 3.00 |" in table
    assert json.loads((tmp_path / "out" / "calvin_results.json").read_text())["avg_seq_len"] == 3.0


def test_calvin_sharding_and_merge(fakes, tmp_path):
    seqs = [(s, c) for s, c, _, _ in CHAINS]
    whole = ev.evaluate_calvin(ScriptedCalvinPolicy(), *ev.make_calvin(_calvin_root(tmp_path)), seqs, progress=False)
    out = tmp_path / "shards"
    for rank in (0, 1):
        env, oracle = ev.make_calvin(tmp_path / "task_D_D")
        part = ev.evaluate_calvin(ScriptedCalvinPolicy(), env, oracle, seqs, out_dir=out, rank=rank, world_size=2,
                                  progress=False)
        assert part["num_sequences"] == 2 and env.n_resets == 2  # sequences[rank::2], as the official code
    assert not (out / "calvin_results.json").exists()  # a partial rank never writes the final results
    records = ev.merge_calvin_results([out / "calvin_rank0.json", out / "calvin_rank1.json"])
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert ev.write_calvin_results(out, records) == whole
    with pytest.raises(ValueError, match="overlap"):
        ev.merge_calvin_results([out / "calvin_rank0.json", out / "calvin_rank0.json"])


def test_calvin_per_sequence_instructions(fakes, tmp_path):
    env, oracle = ev.make_calvin(_calvin_root(tmp_path))
    state, chain, _, _ = CHAINS[1]
    texts = [["pull the handle to open the drawer", "push the handle to close the drawer", "novel a", "novel b",
              "novel c"]]
    policy = ScriptedCalvinPolicy()
    summary = ev.evaluate_calvin(policy, env, oracle, [(state, chain)], texts, progress=False)
    assert summary["avg_seq_len"] == 2  # the policy does not know "novel a"
    assert policy.seen[-1] == "novel a"
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(texts))
    assert ev.load_calvin_instructions(path, [(state, chain)]) == texts
    yml = tmp_path / "new_playtable_validation.yaml"  # the official file's format: task: ["text"]
    yml.write_text("".join(f'{t}: ["{v}"]\n' for t, v in OFFICIAL_VALIDATION.items()))
    assert ev.load_calvin_instructions(yml, [(state, chain)]) == ev.CALVIN_INSTRUCTIONS
    yml.write_text('open_drawer: ["x"]\n')
    with pytest.raises(KeyError, match="close_drawer"):
        ev.load_calvin_instructions(yml, [(state, chain)])


def test_calvin_errors(tmp_path, monkeypatch):
    _forget(monkeypatch, "calvin_env")
    monkeypatch.setitem(sys.modules, "calvin_env", None)  # as if not installed
    with pytest.raises(ImportError, match="git clone"):
        ev.make_calvin(tmp_path)
    with pytest.raises(ValueError, match="unknown CALVIN task"):
        p = tmp_path / "seq.json"
        p.write_text(json.dumps([[OFFICIAL_FIRST[0][0], ["open_the_door"] * 5]]))
        ev.load_calvin_sequences(p)


def test_calvin_missing_validation_folder(fakes, tmp_path):
    with pytest.raises(FileNotFoundError, match="validation"):
        ev.make_calvin(tmp_path)


# -----------------------------------------------------------------------------------------------------------
# SimplerEnv: conversions, episode grids, protocol on the double, table layout
# -----------------------------------------------------------------------------------------------------------

def test_euler_to_axis_angle_matches_scipy():
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-1.2, 1.2, size=(50, 3)):
        expected = Rotation.from_euler("xyz", rpy).as_rotvec()  # extrinsic xyz = transforms3d 'sxyz'
        np.testing.assert_allclose(ev.euler_to_axis_angle(*rpy), expected, atol=1e-9)
    np.testing.assert_array_equal(ev.euler_to_axis_angle(0.0, 0.0, 0.0), np.zeros(3))
    q = ev.simpler_robot_quat(-0.09)  # euler2quat(0,0,-0.09) * (0,0,0,1): a turn of pi - 0.09 about +z
    expected = Rotation.from_euler("z", np.pi - 0.09).as_quat()  # xyzw
    np.testing.assert_allclose(np.abs(q), np.abs(np.r_[expected[3], expected[:3]]), atol=1e-12)
    np.testing.assert_allclose(ev.simpler_robot_quat(0.0), [0, 0, 0, 1], atol=1e-12)


def test_google_gripper_relative_with_sticky_repeat():
    ad = ev.SimplerActionAdapter("google_robot_static")
    opens = [1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, 1, 1, 1]  # canonical: +1 open, -1 closed
    got = [ad(np.r_[np.zeros(6), o])[6] for o in opens]
    assert got == [0, 0, 2, 2, 0, 0, -2, -2, 0, 0, 2, 2, 0, 0]  # + closes; a change is sent twice; a change
    ad.reset()  # during the sticky phase is swallowed (prev is still updated), as in RoboVLMs' wrapper
    assert ad(np.r_[np.zeros(6), -1])[6] == 0  # first step after reset: no previous action -> 0


def test_widowx_gripper_delayed_open():
    ad = ev.SimplerActionAdapter("widowx")
    got = [ad(np.r_[np.zeros(6), o])[6] for o in [1, 1, 1, -1, 1, 1, -0.3]]
    assert got == [-1, 1, 1, -1, -1, 1, -1]  # open only from the 2nd consecutive open prediction


def test_simpler_action_format():
    ad = ev.SimplerActionAdapter("widowx")
    a = ad([0.01, -0.02, 0.0, 0.1, -0.2, 0.3, 1.0])
    assert isinstance(a, np.ndarray) and a.shape == (7,) and a.dtype == np.float64
    np.testing.assert_allclose(a[:3], [0.01, -0.02, 0.0])
    np.testing.assert_allclose(a[3:6], ev.euler_to_axis_angle(0.1, -0.2, 0.3))
    with pytest.raises(ValueError, match="shape"):
        ad(np.zeros((1, 7)))
    with pytest.raises(ValueError, match="robot"):
        ev.SimplerActionAdapter("franka")


def test_q99_unnormalization_matches_official_formula():
    """Policy.act unnormalizes with data.unnormalize_action: on the official Bridge q01/q99 it must equal the
    RoboVLMs SimplerEnv wrapper's 0.5 (a + 1)(q99 - q01) + q01 on the pose dims."""
    data = pytest.importorskip("data")
    q01 = [-0.02873, -0.04170, -0.02609, -0.08092, -0.09289, -0.20718, 0.0]
    q99 = [0.02831, 0.04086, 0.04016, 0.08192, 0.07793, 0.20383, 1.0]
    stats = {"q01": q01, "q99": q99, "mean": [0.0] * 7, "std": [1.0] * 7, "min": q01, "max": q99}
    a = np.random.default_rng(0).uniform(-1, 1, (20, 7))
    out = data.unnormalize_action(a, stats, mode="quantile")
    np.testing.assert_allclose(out[:, :6], 0.5 * (a[:, :6] + 1) * (np.array(q99[:6]) - q01[:6]) + q01[:6], atol=1e-6)
    assert set(np.unique(out[:, 6])) <= {-1.0, 1.0}


def test_simpler_episode_grids():
    n = {t: len(ev.simpler_episodes(t)) for t in ev.SIMPLER_TASKS}
    assert n == {"google_pick_coke_can_horizontal": 100, "google_pick_coke_can_vertical": 100,
                 "google_pick_coke_can_standing": 100, "google_move_near": 240, "google_open_drawer": 108,
                 "google_close_drawer": 108, "google_place_apple_in_drawer": 108, "widowx_spoon_on_towel": 24,
                 "widowx_carrot_on_plate": 24, "widowx_stack_block": 24, "widowx_eggplant_in_basket": 24}
    coke = ev.simpler_episodes("google_pick_coke_can_vertical")
    assert sorted({e["obj"]["init_xy"][0] for e in coke}) == pytest.approx([-0.35, -0.2925, -0.235, -0.1775, -0.12])
    assert all(e["build"]["laid_vertically"] and e["max_episode_steps"] == 80 for e in coke)
    assert {e["build"]["urdf_version"] for e in coke} == set(ev.SIMPLER_URDFS)
    drawer = ev.simpler_episodes("google_close_drawer")
    assert {e["env_name"] for e in drawer} == {f"Close{d}DrawerCustomInScene-v0" for d in ("Top", "Middle", "Bottom")}
    assert all(e["build"]["shader_dir"] == "rt" and e["max_episode_steps"] == 113 for e in drawer)
    egg = ev.simpler_episodes("widowx_eggplant_in_basket")[0]
    assert (egg["robot"], egg["scene_name"], egg["max_episode_steps"]) == ("widowx_sink_camera_setup", "bridge_table_1_v2", 120)
    assert ev.simpler_task_names("widowx,google_move_near") == [t for t in ev.SIMPLER_TASKS if t.startswith("widowx")] + ["google_move_near"]
    with pytest.raises(ValueError, match="unknown SimplerEnv task"):
        ev.simpler_task_names("pick_everything")


class ScriptedSimplerPolicy:
    """A scripted expert for the SimplerEnv double: it peeks at the world (the newest env built) and outputs
    canonical actions (metres, euler, gripper +1 open). drop_at: release everything from that step on."""

    def __init__(self, drop_at=None, idle=False):
        self.drop_at, self.idle, self.resets, self.seen, self.released = drop_at, idle, 0, [], False

    def reset(self):
        self.resets += 1
        self.released = False

    def act(self, obs, instruction):
        from simpler_env._world import CREATED
        w = CREATED[-1].unwrapped
        img = obs["static"]
        assert img.dtype == np.uint8 and img.shape == w.image_shape and set(obs) == {"static"}
        self.seen.append(instruction)
        a = np.zeros(7)
        a[6] = 1.0
        if self.idle or self.released:
            return a
        if w.kind == "apple" and w.subtask == 0:  # apple: pull the drawer handle 16 cm to +x, let go, wait
            if w.episode_stats["is_drawer_open"]:
                return a
            d = w.handle - w.tcp if not w.holding else np.array([0.01, 0.0, 0.0])
            a[:3], a[6] = np.clip(d, -0.01, 0.01), (-1.0 if w.holding else 1.0)
            if not w.holding and np.linalg.norm(d) < 0.005:
                a[:3], a[6] = 0.0, -1.0  # close on the handle
            return a
        if self.drop_at is not None and w.elapsed_steps >= self.drop_at:
            return a  # open the gripper and stay
        if not w.grasped:
            d = w.obj - w.tcp
            a[:3] = np.clip(d, -0.01, 0.01)
            if np.linalg.norm(d) < 0.005:
                a[:3], a[6] = 0.0, -1.0  # close
            return a
        a[6] = -1.0
        goal = {"lift": w.obj0 + [0, 0, 0.05], "open": w.obj0 + [0.2, 0, 0], "close": w.obj0 - [0.2, 0, 0]}.get(
            w.kind, w.obj0 + [0, 0.05, 0.01])
        d = goal - w.tcp
        a[:3] = np.clip(d, -0.01, 0.01)
        if w.kind in ("place", "apple") and np.linalg.norm(d) < 0.012:
            a[:3], a[6] = 0.0, 1.0  # release over the target (WidowX: takes effect one step later)
            self.released = True  # from now on: gripper open, no motion
        return a


def _overlays(tmp_path):
    d = tmp_path / "real_inpainting"
    d.mkdir()
    names = {e["overlay"] for t in ev.SIMPLER_TASKS for e in ev.simpler_episodes(t)}
    for n in names:
        (d / n).write_bytes(b"")
    return d


def test_simpler_protocol_on_double(fakes, tmp_path):
    from simpler_env._world import CREATED
    tasks = ["google_pick_coke_can_horizontal", "google_open_drawer", "google_place_apple_in_drawer",
             "widowx_carrot_on_plate", "widowx_eggplant_in_basket"]
    policies = {"google_robot": ScriptedSimplerPolicy(), "widowx": ScriptedSimplerPolicy()}
    asked = []
    n0 = len(CREATED)
    summary = ev.evaluate_simpler(lambda kind: asked.append(kind) or policies[kind], ",".join(tasks), _overlays(tmp_path),
                                  tmp_path / "out", max_episodes=2, progress=False)
    assert asked == ["google_robot"] * 3 + ["widowx"] * 2
    envs = CREATED[n0:]
    assert len(envs) == 2 * len(tasks) and all(e.closed_env for e in envs)  # a fresh env per episode, closed
    for e in envs:
        w = e.unwrapped
        assert len(w.received) == e._max_episode_steps  # every episode runs to the horizon
        assert all(isinstance(a, np.ndarray) and a.shape == (7,) and a.dtype == np.float64 for a in w.received)
        assert Path(w.rgb_overlay_path).parent == tmp_path / "real_inpainting"
    eps = ev.simpler_episodes("google_open_drawer")
    opts = envs[2].unwrapped.reset_options[0]
    np.testing.assert_allclose(opts["robot_init_options"]["init_xy"], eps[0]["robot_xy"])
    np.testing.assert_allclose(opts["robot_init_options"]["init_rot_quat"], ev.simpler_robot_quat(eps[0]["robot_yaw"]))
    assert opts["obj_init_options"] == eps[0]["obj"]
    assert [e.unwrapped.reset_options[0]["obj_init_options"] for e in envs[6:8]] == [{"episode_id": 0}, {"episode_id": 1}]
    for t in tasks:
        assert summary[t]["success"] == 1.0 and summary[t]["episodes"] == 2
    assert summary["widowx_carrot_on_plate"]["grasp"] == 1.0 and summary["google_open_drawer"]["grasp"] is None
    # apple: the instruction switches once the drawer is open (RoboVLMs' rule) and the policy history is reset then
    g = policies["google_robot"]
    assert g.resets == 2 + 2 + 2 * 2 and "place apple into top drawer" in g.seen
    records = json.loads((tmp_path / "out" / "simpler_episodes.json").read_text())
    assert records["google_place_apple_in_drawer"][0]["instruction"] == "open top drawer"
    assert records["google_place_apple_in_drawer"][0]["steps"] == 200
    assert "1.000" in (tmp_path / "out" / "simpler_results.md").read_text()


def test_simpler_success_is_read_at_the_last_step(fakes, tmp_path):
    overlays = _overlays(tmp_path)
    # lifts the can, then lets go at step 60 of 80: successful mid-episode, failed at the end
    s = ev.evaluate_simpler(lambda kind: ScriptedSimplerPolicy(drop_at=60), "google_pick_coke_can_standing",
                            overlays, max_episodes=1, progress=False)
    assert s["google_pick_coke_can_standing"]["success"] == 0.0
    # WidowX: grasped then dropped 3 cm short of the target -> grasp 1, final 0; idle -> both 0
    s = ev.evaluate_simpler(lambda kind: ScriptedSimplerPolicy(drop_at=8), "widowx_spoon_on_towel", overlays,
                            max_episodes=2, progress=False)
    assert s["widowx_spoon_on_towel"] == {"success": 0.0, "grasp": 1.0, "episodes": 2}
    s = ev.evaluate_simpler(lambda kind: ScriptedSimplerPolicy(idle=True), "widowx_stack_block", overlays,
                            max_episodes=2, progress=False)
    assert s["widowx_stack_block"] == {"success": 0.0, "grasp": 0.0, "episodes": 2}


def test_simpler_double_is_strict(fakes, tmp_path):
    from simpler_env.utils.env.env_builder import build_maniskill2_env
    ep = ev.simpler_episodes("widowx_carrot_on_plate")[0]
    overlay = _overlays(tmp_path) / ep["overlay"]
    env = build_maniskill2_env(ep["env_name"], robot="widowx", control_mode="arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos",
                               max_episode_steps=60, rgb_overlay_path=str(overlay), scene_name=ep["scene_name"])
    env.reset()
    with pytest.raises(TypeError):
        env.step([0.0] * 7)  # a list
    with pytest.raises(AssertionError):
        env.step(np.zeros((1, 7)))  # a batch
    with pytest.raises(FileNotFoundError):
        build_maniskill2_env(ep["env_name"], robot="widowx", max_episode_steps=60, rgb_overlay_path=str(tmp_path / "x.png"),
                             control_mode="arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos")


def test_simpler_table_layout_reproduces_paper_averages():
    paper = {"widowx_spoon_on_towel": (0.458, 0.583), "widowx_carrot_on_plate": (0.417, 0.458),
             "widowx_stack_block": (0.167, 0.375), "widowx_eggplant_in_basket": (0.958, 0.958),
             "google_pick_coke_can_horizontal": (1.0, None), "google_pick_coke_can_vertical": (0.91, None),
             "google_pick_coke_can_standing": (1.0, None), "google_move_near": (0.888, None),
             "google_open_drawer": (0.565, None), "google_close_drawer": (0.537, None),
             "google_place_apple_in_drawer": (0.325, None)}
    summary = {t: {"success": s, "grasp": g, "episodes": 1} for t, (s, g) in paper.items()}
    text = ev.simpler_table(summary, method="RoboVLMs (Ours)")
    # Extended Table 3 rows, including the paper's own averages (0.970 coke can, 0.551 drawers)
    assert "| RoboVLMs (Ours) | 0.583 | 0.458 | 0.458 | 0.417 | 0.375 | 0.167 | 0.958 | 0.958 |" in text
    assert "| RoboVLMs (Ours) | 1.000 | 0.910 | 1.000 | 0.970 | 0.888 | 0.565 | 0.537 | 0.551 | 0.325 |" in text
    assert "Put Spoon on Towel: Grasp Spoon" in text and "Open Top Drawer and Place Apple" in text


def test_simpler_missing_install(monkeypatch, tmp_path):
    _forget(monkeypatch, "simpler_env")
    monkeypatch.setitem(sys.modules, "simpler_env", None)
    with pytest.raises(ImportError, match="SimplerEnv"):
        ev.simpler_run_episode(ev.simpler_episodes("widowx_stack_block")[0], ScriptedSimplerPolicy(), tmp_path)
    with pytest.raises(FileNotFoundError, match="overlay"):
        ev.simpler_overlay_dir(tmp_path / "nowhere")


def test_cli_requires_calvin_root(tmp_path):
    with pytest.raises(SystemExit, match="calvin-root"):
        ev.main(["--ckpt", str(tmp_path), "--benchmark", "calvin"])


# -----------------------------------------------------------------------------------------------------------
# End to end: a tiny trained-format checkpoint through `python evaluate.py --benchmark calvin|simpler`
# -----------------------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention for a model this small
    yield
    torch.set_num_threads(n)


def _tiny_checkpoint(path, views, key):
    torch = pytest.importorskip("torch")
    vla = pytest.importorskip("vla")
    data = pytest.importorskip("data")
    torch.manual_seed(0)
    model = vla.VLA(vla.VLAConfig.tiny(image_size=32, window=2, chunk=2, views=views))
    stats = data.compute_action_stats(np.random.default_rng(0).uniform(-1, 1, (200, 7)).astype(np.float32))
    vla.save_checkpoint(path, model, {key: stats})
    return path


def test_cli_calvin_end_to_end(fakes, one_thread, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "run", ("static", "wrist"), "calvin")
    seq = tmp_path / "eval_sequences.json"
    seq.write_text(json.dumps([[OFFICIAL_FIRST[0][0], ["rotate_blue_block_right", "move_slider_right",
                                                       "lift_red_block_slider", "place_in_slider", "turn_off_lightbulb"]]]))
    ev.main(["--ckpt", str(ckpt), "--benchmark", "calvin", "--calvin-root", str(_calvin_root(tmp_path)),
             "--calvin-sequences", str(seq), "--out", str(tmp_path / "out")])
    rec = json.loads((tmp_path / "out" / "calvin_sequences.json").read_text())
    assert len(rec) == 1 and rec[0]["result"] == 0 and rec[0]["steps"] == [360]  # the fake never rotates blocks
    assert rec[0]["instructions"][0] == "take the blue block and rotate it to the right"
    assert json.loads((tmp_path / "out" / "calvin_results.json").read_text())["avg_seq_len"] == 0.0


def test_cli_simpler_end_to_end(fakes, one_thread, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "run", ("static",), "bridge_orig")
    ev.main(["--ckpt", str(ckpt), "--benchmark", "simpler", "--task", "widowx_stack_block", "--max-episodes", "1",
             "--simpler-overlays", str(_overlays(tmp_path)), "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "simpler_results.json").read_text())
    assert res["widowx_stack_block"]["episodes"] == 1
    eps = json.loads((tmp_path / "out" / "simpler_episodes.json").read_text())
    assert eps["widowx_stack_block"][0]["steps"] == 60
    with pytest.raises(KeyError, match="fractal20220817_data"):  # Google tasks need the fractal statistics
        ev.main(["--ckpt", str(ckpt), "--benchmark", "simpler", "--task", "google_move_near", "--max-episodes", "1",
                 "--simpler-overlays", str(tmp_path / "real_inpainting"), "--out", str(tmp_path / "out2")])
