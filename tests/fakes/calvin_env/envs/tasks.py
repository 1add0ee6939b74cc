"""Fake calvin_env.envs.tasks.Tasks: the real class's interface (built from {task: [predicate, *args]}, the
content of conf/tasks/new_playtable_tasks.yaml; get_task_info / get_task_info_for_set compare a start and an end
info dict). The door and light predicates follow the real definitions; the block predicates exist with the real
names and signatures but always answer False, since the fake world never moves blocks."""

from functools import partial


class Tasks:
    def __init__(self, tasks):
        self.tasks = {name: partial(getattr(self, args[0]), *args[1:]) for name, args in dict(tasks).items()}
        self.task_to_id = {name: i for i, name in enumerate(self.tasks)}
        self.id_to_task = {i: name for i, name in enumerate(self.tasks)}

    def get_task_info(self, start_info, end_info):
        return {name for name, fn in self.tasks.items() if fn(start_info=start_info, end_info=end_info)}

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        return {name for name, fn in self.tasks.items()
                if name in task_filter and fn(start_info=start_info, end_info=end_info)}

    @property
    def num_tasks(self):
        return len(self.tasks)

    @staticmethod
    def move_door_rel(joint_name, threshold, start_info, end_info):
        start = start_info["scene_info"]["doors"][joint_name]["current_state"]
        end = end_info["scene_info"]["doors"][joint_name]["current_state"]
        return 0 < threshold < end - start or 0 > threshold > end - start

    @staticmethod
    def toggle_light(light_name, start_state, end_state, start_info, end_info):
        return (start_info["scene_info"]["lights"][light_name]["logical_state"] == start_state
                and end_info["scene_info"]["lights"][light_name]["logical_state"] == end_state)

    @staticmethod
    def rotate_object(obj_name, z_degrees, x_y_threshold=30, z_threshold=180, movement_threshold=0.1,
                      start_info=None, end_info=None):
        return False

    @staticmethod
    def push_object(obj_name, x_direction, y_direction, start_info, end_info):
        assert x_direction * y_direction == 0 and x_direction + y_direction != 0
        return False

    @staticmethod
    def lift_object(obj_name, z_direction, surface_body=None, surface_link=None, start_info=None, end_info=None):
        assert z_direction > 0
        return False

    @staticmethod
    def place_object(dest_body, dest_link=None, start_info=None, end_info=None):
        return False

    @staticmethod
    def push_object_into(obj_name, src_body, src_link, dest_body, dest_link, start_info=None, end_info=None):
        return False

    @staticmethod
    def stack_objects(max_vel=1, start_info=None, end_info=None):
        return False

    @staticmethod
    def unstack_objects(max_vel=1, start_info=None, end_info=None):
        return False
