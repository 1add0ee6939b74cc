"""A minimal stand-in for protobuf 3 generated message classes (behaviour the kortex examples rely on)."""

import numbers


class Repeated:
    """Repeated message field: .add(**fields) appends a new element; list-like reads; del x[:] clears."""

    def __init__(self, cls):
        self.cls, self.items = cls, []

    def add(self, **kw):
        self.items.append(self.cls(**kw))
        return self.items[-1]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __delitem__(self, i):
        del self.items[i]

    def __iter__(self):
        return iter(self.items)


def repeated(cls):
    return ("repeated", cls)


class Message:
    """Subclasses set FIELDS = {name: float | int | str | bool | MessageSubclass | repeated(MessageSubclass)}."""
    FIELDS = {}

    def __init__(self, **kw):
        for name, kind in self.FIELDS.items():
            if isinstance(kind, tuple):
                value = Repeated(kind[1])
            elif isinstance(kind, type) and issubclass(kind, Message):
                value = kind()
            else:
                value = kind()  # 0.0, 0, "", False
            object.__setattr__(self, name, value)
        for k, v in kw.items():
            if isinstance(self.FIELDS.get(k), type) and issubclass(self.FIELDS[k], Message):
                object.__setattr__(self, k, v)  # message-typed constructor argument (copied in protobuf)
            else:
                setattr(self, k, v)

    def __setattr__(self, name, value):
        kind = self.FIELDS.get(name)
        if kind is None:
            raise AttributeError(f'Assignment not allowed (no field "{name}" in protocol message object).')
        if isinstance(kind, tuple) or (isinstance(kind, type) and issubclass(kind, Message)):
            raise AttributeError(f'Assignment not allowed to field "{name}" in protocol message object.')
        # protobuf 3.20's type checkers: numbers.Integral for ints (a float raises), numbers.Real for floats
        ok = {int: numbers.Integral, float: numbers.Real, str: str, bool: (bool, numbers.Integral)}[kind]
        if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool) and kind is float):
            raise TypeError(f"{value!r} has type {type(value)}, but expected one of: {ok}")
        object.__setattr__(self, name, kind(value))

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.FIELDS)})"
