"""Test double of Kinova's kortex_api 2.6.0 (the real wheel is not on PyPI). Only the tests put tests/fakes on
sys.path. It reproduces the module tree, class and method names, protobuf-like messages (typed fields,
auto-created nested messages, .add() on repeated fields, enum ints) and the units of the real API (metres,
DEGREES, gripper feedback in %), backed by a kinematic Gen3 in _robot.py. No network: transports only look
the arm up in an in-process registry keyed by IP address."""
