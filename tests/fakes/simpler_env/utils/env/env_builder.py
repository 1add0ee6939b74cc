from simpler_env._world import make_env


def build_maniskill2_env(env_name, **kwargs):
    if kwargs.get("rgb_overlay_path", None) is not None and kwargs.get("rgb_overlay_cameras", None) is None:
        if "google_robot_static" in kwargs["robot"]:
            kwargs["rgb_overlay_cameras"] = ["overhead_camera"]
        elif "widowx" in kwargs["robot"]:
            kwargs["rgb_overlay_cameras"] = ["3rd_view_camera"]
        else:
            raise NotImplementedError()
    return make_env(env_name, **kwargs)  # stands in for gymnasium.make(env_name, **kwargs)


def get_robot_control_mode(robot_name, policy_name):
    if "google_robot_static" in robot_name:
        return "arm_pd_ee_delta_pose_align_interpolate_by_planner_gripper_pd_joint_target_delta_pos_interpolate_by_planner"
    if "widowx" in robot_name:
        return "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
    raise NotImplementedError()
