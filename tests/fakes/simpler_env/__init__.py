"""Test double of SimplerEnv (github.com/simpler-env/SimplerEnv) + its ManiSkill2_real2sim environments, used only
by tests/test_calvin_simpler.py and tests/test_rehearsals.py. Faithful to the interface evaluate.py relies on (shared/reference/
env-and-robot-apis.md section 2): utils.env.env_builder.build_maniskill2_env / get_robot_control_mode,
utils.env.observation_utils.get_image_from_maniskill2_obs_dict, gymnasium-style reset(seed, options) ->
(obs, info) and step(ndarray (7,)) -> (obs, reward, terminated, truncated, info) behind a TimeLimit wrapper that
forwards attributes, get_language_instruction / is_final_subtask / advance_to_next_subtask, robot_uid, the obs
nesting and image shapes, cumulative episode_stats, and the place-in-drawer task's drawer (qpos, is_drawer_open,
has_contact) and its own instruction switch at the start of step 101 (the first step taken with elapsed_steps >= 100).
The world is a scripted point-mass gripper and one object (+ a drawer handle; see _world.py), not SAPIEN."""

from ._world import ENV_IDS, make_env

# simpler_env.ENVIRONMENTS: the 25 prepackaged names (only validated here; evaluate.py builds envs by id)
ENVIRONMENTS = [
    "google_robot_pick_coke_can", "google_robot_pick_horizontal_coke_can", "google_robot_pick_vertical_coke_can",
    "google_robot_pick_standing_coke_can", "google_robot_pick_object", "google_robot_move_near_v0",
    "google_robot_move_near_v1", "google_robot_move_near", "google_robot_open_drawer", "google_robot_open_top_drawer",
    "google_robot_open_middle_drawer", "google_robot_open_bottom_drawer", "google_robot_close_drawer",
    "google_robot_close_top_drawer", "google_robot_close_middle_drawer", "google_robot_close_bottom_drawer",
    "google_robot_place_in_closed_drawer", "google_robot_place_in_closed_top_drawer",
    "google_robot_place_in_closed_middle_drawer", "google_robot_place_in_closed_bottom_drawer",
    "google_robot_place_apple_in_closed_top_drawer", "widowx_spoon_on_towel", "widowx_carrot_on_plate",
    "widowx_stack_cube", "widowx_put_eggplant_in_basket"]


def make(task_name, **kwargs):
    assert task_name in ENVIRONMENTS, f"Task {task_name} is not supported. Environments: \n {ENVIRONMENTS}"
    raise NotImplementedError("the test double only supports build_maniskill2_env (what evaluate.py uses)")
