"""Double of kortex_api.TCPTransport: 'connects' to a FakeGen3 registered in kortex_api._robot.ARMS.

Two behaviours of the real transport that robot.py must live with are reproduced for the tests:
- send() is not thread-safe (the real one builds each frame in one shared buffer, then sendall): calls that
  overlap in time are recorded in `overlaps` (and on the arm). `wire_s` (real seconds per send, default 0)
  widens the window so a test can provoke them.
- the receive thread calls the router's errorCallback(exception) on a client-side error; if the callback
  raises, the real thread's catch-all skips the end of its frame bookkeeping and never reads again, so every
  later call times out. client_error() injects such an error from a thread; a stuck transport then makes
  every call raise TimeoutError (at once, instead of after timeout_ms).
"""
import threading
import time

from kortex_api import _robot
from kortex_api.Exceptions.KClientException import KClientException

FRAME_DECODING_ERR = 3  # Errors_pb2 code used by the real RouterClient for an undecodable frame


class TCPTransport:
    PORT = 10000

    def __init__(self):
        self.arm, self.address, self.router = None, None, None
        self.wire_s, self.overlaps, self.stuck, self.busy = 0.0, [], False, threading.Lock()

    def connect(self, ip, port):
        if ip not in _robot.ARMS or port != self.PORT:
            raise ConnectionRefusedError(f"{type(self).__name__}: cannot connect to {ip}:{port}")
        self.arm, self.address = _robot.ARMS[ip], (ip, port)

    def disconnect(self):
        self.arm = None

    def send(self, name):
        """One request frame for RPC `name` (called by the client stubs before the arm acts on it)."""
        if self.stuck:
            raise TimeoutError(f"{name}: no response (the transport's receive thread is stuck since an error "
                               f"callback raised)")
        if not self.busy.acquire(blocking=False):  # another thread is inside send: the real frames interleave
            self.overlaps.append(name)
            if self.arm is not None:
                self.arm.overlaps.append(name)
            self.busy.acquire()
        try:
            if self.wire_s:
                time.sleep(self.wire_s)
        finally:
            self.busy.release()

    def client_error(self, message="Couldn't decode message frame"):
        """Deliver a client-side error the way the receive thread does; returns what the callback raised."""
        raised = []

        def receive_thread():
            try:
                self.router.errorCallback(KClientException(FRAME_DECODING_ERR, message))
            except Exception as e:  # the real loop prints it and goes on, stuck mid-frame
                raised.append(e)
                self.stuck = True
        t = threading.Thread(target=receive_thread)
        t.start()
        t.join()
        return raised[0] if raised else None
