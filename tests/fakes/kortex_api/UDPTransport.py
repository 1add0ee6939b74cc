"""Double of kortex_api.UDPTransport (port 10001, cyclic feedback)."""
from kortex_api.TCPTransport import TCPTransport


class UDPTransport(TCPTransport):
    PORT = 10001
