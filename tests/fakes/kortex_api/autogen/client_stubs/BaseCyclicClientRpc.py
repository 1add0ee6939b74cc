"""Double of kortex_api.autogen.client_stubs.BaseCyclicClientRpc.BaseCyclicClient."""
from kortex_api.autogen.messages import BaseCyclic_pb2


class BaseCyclicClient:
    def __init__(self, router):
        self.router, self.frame_id = router, 0

    def RefreshFeedback(self, deviceId=0, options=None):
        arm = self.router.arm()
        self.router.transport.send("RefreshFeedback")
        arm.rpc("RefreshFeedback")
        fb, self.frame_id = BaseCyclic_pb2.Feedback(), self.frame_id + 1
        fb.frame_id = self.frame_id
        b = fb.base
        b.tool_pose_x, b.tool_pose_y, b.tool_pose_z, b.tool_pose_theta_x, b.tool_pose_theta_y, \
            b.tool_pose_theta_z = arm.pose()  # metres, degrees
        b.tool_twist_linear_x, b.tool_twist_linear_y, b.tool_twist_linear_z = arm.v
        b.tool_twist_angular_x, b.tool_twist_angular_y, b.tool_twist_angular_z = arm.w
        b.active_state, b.fault_bank_a = arm.active_state, 1 if arm.fault else 0
        for _ in range(7):
            fb.actuators.add()
        if arm.has_gripper:
            fb.interconnect.gripper_feedback.motor.add(motor_id=1, position=arm.grip)  # %, 0 = open
        return fb
