"""Double of kortex_api.autogen.messages.Base_pb2: the messages and enum values robot.py and the Kinova
examples use (numeric values as in the API reference where it gives them)."""
from kortex_api._pb import Message, repeated

# CartesianReferenceFrame
CARTESIAN_REFERENCE_FRAME_UNSPECIFIED, CARTESIAN_REFERENCE_FRAME_MIXED = 0, 1
CARTESIAN_REFERENCE_FRAME_TOOL, CARTESIAN_REFERENCE_FRAME_BASE = 2, 3
# GripperMode
GRIPPER_UNSPECIFIED, GRIPPER_FORCE, GRIPPER_SPEED, GRIPPER_POSITION = 0, 1, 2, 3
# ServoingMode
SERVOING_MODE_UNSPECIFIED, SINGLE_LEVEL_SERVOING, LOW_LEVEL_SERVOING, BYPASS_SERVOING = 0, 2, 3, 4
# ActionEvent
UNSPECIFIED_ACTION_EVENT, ACTION_END, ACTION_ABORT, ACTION_PAUSE, ACTION_START, ACTION_FEEDBACK = 0, 1, 2, 3, 4, 11
# ActionType (subset)
UNSPECIFIED_ACTION, REACH_POSE, REACH_JOINT_ANGLES = 0, 6, 7


class Twist(Message):
    FIELDS = {"linear_x": float, "linear_y": float, "linear_z": float,  # m/s
              "angular_x": float, "angular_y": float, "angular_z": float}  # deg/s


class TwistCommand(Message):
    FIELDS = {"reference_frame": int, "twist": Twist, "duration": int}


class Finger(Message):
    FIELDS = {"finger_identifier": int, "value": float}


class Gripper(Message):
    FIELDS = {"finger": repeated(Finger)}


class GripperCommand(Message):
    FIELDS = {"mode": int, "gripper": Gripper, "duration": int}


class GripperRequest(Message):
    FIELDS = {"mode": int}


class Pose(Message):
    FIELDS = {"x": float, "y": float, "z": float, "theta_x": float, "theta_y": float, "theta_z": float}


class ServoingModeInformation(Message):
    FIELDS = {"servoing_mode": int}


class ActionHandle(Message):
    FIELDS = {"identifier": int, "action_type": int, "permission": int}


class Action(Message):
    FIELDS = {"handle": ActionHandle, "name": str, "application_data": str}


class ActionList(Message):
    FIELDS = {"action_list": repeated(Action)}


class RequestedActionType(Message):
    FIELDS = {"action_type": int}


class NotificationOptions(Message):
    FIELDS = {"type": int, "rate_m_sec": int, "threshold_value": float}


class NotificationHandle(Message):
    FIELDS = {"identifier": int}


class ActionNotification(Message):
    FIELDS = {"action_event": int, "handle": ActionHandle}


class ArmStateInformation(Message):
    FIELDS = {"active_state": int, "connection_information": str}
