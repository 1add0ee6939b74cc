"""Double of kortex_api.autogen.messages.Common_pb2 (enum ArmState as module ints)."""
from kortex_api._pb import Message

ARMSTATE_UNSPECIFIED, ARMSTATE_BASE_INITIALIZATION, ARMSTATE_IDLE, ARMSTATE_INITIALIZATION = 0, 1, 2, 3
ARMSTATE_IN_FAULT, ARMSTATE_MAINTENANCE, ARMSTATE_SERVOING_LOW_LEVEL, ARMSTATE_SERVOING_READY = 4, 5, 6, 7


class Empty(Message):
    FIELDS = {}
