"""Double of kortex_api.TCPTransport: 'connects' to a FakeGen3 registered in kortex_api._robot.ARMS."""
from kortex_api import _robot


class TCPTransport:
    PORT = 10000

    def __init__(self):
        self.arm, self.address = None, None

    def connect(self, ip, port):
        if ip not in _robot.ARMS or port != self.PORT:
            raise ConnectionRefusedError(f"{type(self).__name__}: cannot connect to {ip}:{port}")
        self.arm, self.address = _robot.ARMS[ip], (ip, port)

    def disconnect(self):
        self.arm = None
