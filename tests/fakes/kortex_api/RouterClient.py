"""Double of kortex_api.RouterClient."""
import sys


class RouterClientSendOptions:
    def __init__(self):
        self.andForget, self.delay_ms, self.timeout_ms = False, 0, 10000


class RouterClient:
    def __init__(self, transport, errorCallback=None):
        self.transport, self.errorCallback = transport, errorCallback
        if self.errorCallback is None:  # as in the real one: the default is the bound basic callback
            self.errorCallback = self.basicErrorCallback
        transport.router = self  # the real one registers its frame callback with the transport

    # an INSTANCE method, as in kortex_api 2.6.0 (its @staticmethod is commented out there): passing
    # RouterClient.basicErrorCallback unbound makes errorCallback(exception) a TypeError
    def basicErrorCallback(self, kException):
        print(f"[{type(self).__name__}] {kException}", file=sys.stderr)

    def arm(self):
        if self.transport.arm is None:
            raise ConnectionError("router: transport is not connected")
        return self.transport.arm
