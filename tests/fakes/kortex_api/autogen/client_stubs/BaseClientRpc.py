"""Double of kortex_api.autogen.client_stubs.BaseClientRpc.BaseClient (the methods robot.py and the Kinova
high-level examples use)."""
from kortex_api.Exceptions.KServerException import KServerException
from kortex_api.autogen.messages import Base_pb2


class BaseClient:
    def __init__(self, router):
        self.router = router

    def _arm(self, name, msg=None, moving=False):
        arm = self.router.arm()
        self.router.transport.send(name)
        arm.rpc(name, msg, moving)
        return arm

    def SendTwistCommand(self, twistcommand, deviceId=0, options=None):
        if not isinstance(twistcommand, Base_pb2.TwistCommand):
            raise TypeError(f"SendTwistCommand expects Base_pb2.TwistCommand, got {type(twistcommand)}")
        arm = self._arm("SendTwistCommand", twistcommand, moving=True)
        arm.twist(twistcommand)

    def Stop(self, deviceId=0, options=None):
        arm = self._arm("Stop")
        arm.v[:], arm.w[:] = 0.0, 0.0

    def ApplyEmergencyStop(self, deviceId=0, options=None):
        arm = self._arm("ApplyEmergencyStop")
        arm.v[:], arm.w[:], arm.fault = 0.0, 0.0, True

    def ClearFaults(self, deviceId=0, options=None):
        self._arm("ClearFaults").fault = False

    def SendGripperCommand(self, grippercommand, deviceId=0, options=None):
        arm = self._arm("SendGripperCommand", grippercommand, moving=True)
        if grippercommand.mode != Base_pb2.GRIPPER_POSITION or len(grippercommand.gripper.finger) != 1:
            raise KServerException(1, 2, "this double supports GRIPPER_POSITION with one finger")
        value = grippercommand.gripper.finger[0].value
        if not 0.0 <= value <= 1.0:
            raise KServerException(1, 2, f"gripper position {value} outside [0, 1]")
        arm.grip_target = 100.0 * value  # relative position 0 open .. 1 closed -> %

    def GetMeasuredGripperMovement(self, gripperrequest, deviceId=0, options=None):
        arm = self._arm("GetMeasuredGripperMovement", gripperrequest)
        g = Base_pb2.Gripper()
        g.finger.add(finger_identifier=1, value=arm.grip / 100.0)
        return g

    def GetMeasuredCartesianPose(self, deviceId=0, options=None):
        x, y, z, tx, ty, tz = self._arm("GetMeasuredCartesianPose").pose()
        return Base_pb2.Pose(x=x, y=y, z=z, theta_x=tx, theta_y=ty, theta_z=tz)

    def SetServoingMode(self, servoingmodeinformation, deviceId=0, options=None):
        self._arm("SetServoingMode", servoingmodeinformation).servoing = servoingmodeinformation.servoing_mode

    def GetServoingMode(self, deviceId=0, options=None):
        return Base_pb2.ServoingModeInformation(servoing_mode=self._arm("GetServoingMode").servoing)

    def GetArmState(self, deviceId=0, options=None):
        return Base_pb2.ArmStateInformation(active_state=self._arm("GetArmState").active_state)
