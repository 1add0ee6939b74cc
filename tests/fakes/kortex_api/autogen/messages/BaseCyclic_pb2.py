"""Double of kortex_api.autogen.messages.BaseCyclic_pb2 (feedback part). Units as on the real arm:
tool pose in metres and DEGREES, twists in m/s and deg/s, gripper motor position in % (0 = open)."""
from kortex_api._pb import Message, repeated


class BaseFeedback(Message):
    FIELDS = {k: float for k in (
        "tool_pose_x", "tool_pose_y", "tool_pose_z", "tool_pose_theta_x", "tool_pose_theta_y", "tool_pose_theta_z",
        "tool_twist_linear_x", "tool_twist_linear_y", "tool_twist_linear_z",
        "tool_twist_angular_x", "tool_twist_angular_y", "tool_twist_angular_z",
        "commanded_tool_pose_x", "commanded_tool_pose_y", "commanded_tool_pose_z",
        "commanded_tool_pose_theta_x", "commanded_tool_pose_theta_y", "commanded_tool_pose_theta_z",
        "arm_voltage", "arm_current", "temperature_cpu")}
    FIELDS.update({"active_state": int, "fault_bank_a": int, "fault_bank_b": int, "warning_bank_a": int,
                   "warning_bank_b": int})


class ActuatorFeedback(Message):
    FIELDS = {"position": float, "velocity": float, "torque": float, "fault_bank_a": int, "fault_bank_b": int}


class MotorFeedback(Message):
    FIELDS = {"motor_id": int, "position": float, "velocity": float, "current_motor": float}


class GripperFeedback(Message):
    FIELDS = {"motor": repeated(MotorFeedback)}


class InterconnectFeedback(Message):
    FIELDS = {"gripper_feedback": GripperFeedback}


class Feedback(Message):
    FIELDS = {"frame_id": int, "base": BaseFeedback, "actuators": repeated(ActuatorFeedback),
              "interconnect": InterconnectFeedback}
