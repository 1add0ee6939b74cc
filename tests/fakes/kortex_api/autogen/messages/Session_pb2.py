"""Double of kortex_api.autogen.messages.Session_pb2."""
from kortex_api._pb import Message


class CreateSessionInfo(Message):
    FIELDS = {"username": str, "password": str, "session_inactivity_timeout": int,
              "connection_inactivity_timeout": int}  # timeouts in ms
