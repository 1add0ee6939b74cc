"""Double of kortex_api.RouterClient."""


class RouterClientSendOptions:
    def __init__(self):
        self.andForget, self.delay_ms, self.timeout_ms = False, 0, 10000


class RouterClient:
    def __init__(self, transport, errorCallback=None):
        self.transport, self.errorCallback = transport, errorCallback

    @staticmethod
    def basicErrorCallback(exception):
        print("Error from router:", exception)

    def arm(self):
        if self.transport.arm is None:
            raise ConnectionError("router: transport is not connected")
        return self.transport.arm
