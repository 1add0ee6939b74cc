"""The generalization split of the Meta-World suite (evaluate.py --scene shifted / --instructions paraphrased).

Shifted scenes change only appearance (materials, lights, camera poses), deterministically per episode seed, and
never accumulate from one episode to the next; paraphrases are held out (never a training instruction).
"""

import numpy as np
import pytest

import evaluate as E


@pytest.fixture(scope="module")
def envs():
    seen = E.MetaWorldEnv("drawer-open", image_size=32, max_steps=5)
    shifted = E.MetaWorldEnv("drawer-open", image_size=32, max_steps=5, scene="shifted", instructions="paraphrased")
    yield seen, shifted
    E.close_renderer()
    seen.close()
    shifted.close()


def test_shifted_scene_changes_pixels_not_physics(envs):
    seen, shifted = envs
    s = 1_000_007
    a, b = seen.reset(s), shifted.reset(s)
    np.testing.assert_array_equal(a["state"], b["state"])  # same objects, same hand: physics untouched
    for cam in ("static", "wrist"):
        diff = np.abs(a[cam].astype(int) - b[cam].astype(int)).mean()
        assert diff > 5, f"{cam}: shifted frame too close to the seen one (mean |diff| {diff:.1f})"
    # the expert's first actions agree: appearance does not enter the task
    for _ in range(3):
        np.testing.assert_allclose(seen.expert_action(), shifted.expert_action())
        seen.step(seen.expert_action())
        shifted.step(shifted.expert_action())
    np.testing.assert_allclose(seen.raw, shifted.raw)


def test_shift_is_deterministic_per_seed_and_does_not_accumulate(envs):
    seen, shifted = envs
    before = seen.reset(1_000_003)["static"]
    first = shifted.reset(1_000_003)["static"]
    other = shifted.reset(1_000_004)["static"]
    again = shifted.reset(1_000_003)["static"]
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1  # another seed, another look
    # the seen environment of the same task is unaffected by the shifted one (they share the renderer)
    np.testing.assert_array_equal(seen.reset(1_000_003)["static"], before)


def test_camera_perturbation_is_as_documented(envs):
    _, shifted = envs
    model = shifted.env.model
    for seed in range(1_000_000, 1_000_020):
        shifted.reset(seed)
        for name, (dpos, ddeg) in E.SHIFT_CAMERA.items():
            p0, q0 = shifted.seen_look["cams"][name]
            assert np.abs(model.cam(name).pos - p0).max() <= dpos + 1e-9
            angle = 2 * np.degrees(np.arccos(min(1.0, abs(float(np.dot(model.cam(name).quat, q0))))))
            assert angle <= ddeg + 1e-6


def test_paraphrases_are_held_out_and_deterministic(envs):
    seen, shifted = envs
    assert seen.reset(1_000_001) is not None and seen.instruction == "open the drawer"
    said = set()
    for seed in range(1_000_000, 1_000_012):
        shifted.reset(seed)
        said.add(shifted.instruction)
        assert shifted.instruction in E.METAWORLD_PARAPHRASES["drawer-open"]
    assert len(said) > 1
    shifted.reset(1_000_005)
    first = shifted.instruction
    shifted.reset(1_000_006)
    shifted.reset(1_000_005)
    assert shifted.instruction == first
    training = set(E.METAWORLD_INSTRUCTIONS.values())
    for task, options in E.METAWORLD_PARAPHRASES.items():
        assert task in E.METAWORLD_INSTRUCTIONS and len(options) >= 3
        assert not training & set(options), f"{task}: a paraphrase equals a training instruction"


def test_evaluation_passes_the_split_to_the_policy():
    class Recorder:
        def __init__(self):
            self.said, self.frames = [], []

        def reset(self):
            pass

        def act(self, obs, instruction):
            self.said.append(instruction)
            self.frames.append(obs["static"])
            return np.zeros(7, dtype=np.float32)

    out = {}
    for scene, instr in (("seen", "seen"), ("shifted", "paraphrased")):
        rec = Recorder()
        res = E.evaluate_metaworld(rec, tasks=("button-press-topdown",), episodes=2, image_size=32, max_steps=2,
                                   baselines=False, progress=False, scene=scene, instructions=instr)
        assert res["button-press-topdown"]["policy"] == 0.0
        out[scene] = rec
    rec = Recorder()  # the probe: one task-free instruction for every task
    E.evaluate_metaworld(rec, tasks=("button-press-topdown", "drawer-open"), episodes=1, image_size=32, max_steps=2,
                         baselines=False, progress=False, instructions="generic")
    assert set(rec.said) == {E.GENERIC_INSTRUCTION}
    assert E.GENERIC_INSTRUCTION not in set(E.METAWORLD_INSTRUCTIONS.values())
    assert set(out["seen"].said) == {"press the button from the top"}
    assert set(out["shifted"].said) <= set(E.METAWORLD_PARAPHRASES["button-press-topdown"])
    assert np.abs(out["seen"].frames[0].astype(int) - out["shifted"].frames[0].astype(int)).mean() > 5
    with pytest.raises(ValueError, match="scene must be one of"):
        E.evaluate_metaworld(Recorder(), tasks=("button-press-topdown",), episodes=1, scene="dark")
