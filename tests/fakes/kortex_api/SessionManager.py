"""Double of kortex_api.SessionManager: checks the credentials against the fake arm's."""
from kortex_api import _robot
from kortex_api.Exceptions.KServerException import KServerException
from kortex_api.autogen.messages import Session_pb2


class SessionManager:
    def __init__(self, router, options=None):
        self.router, self.open = router, False

    def CreateSession(self, info, options=None):
        if not isinstance(info, Session_pb2.CreateSessionInfo):
            raise TypeError(f"CreateSession expects Session_pb2.CreateSessionInfo, got {type(info)}")
        arm = self.router.arm()
        if (info.username, info.password) != (arm.username, arm.password):
            raise KServerException(_robot.ERROR_DEVICE, 0, "session creation refused: invalid credentials")
        arm.sessions += 1
        self.open = True

    def CloseSession(self, options=None):
        if self.open:
            self.router.arm().sessions -= 1
            self.open = False
