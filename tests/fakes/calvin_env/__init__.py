"""Test double of calvin_env (github.com/mees/calvin_env, the revision pinned by mees/calvin), used only by
tests/test_calvin_simpler.py. It reproduces the interface evaluate.py relies on -- get_env(dataset_path,
obs_space, show_gui), PlayTableSimEnv.reset/get_obs/step/get_info, the observation and info layouts, the
in-place scaling of the action array and the gripper assertion, and Tasks(tasks).get_task_info_for_set -- over a
small scripted world (see envs/play_table_env.py) instead of pybullet."""
