"""Protobuf wire format, just enough to write a message piece by piece (modelfile's one-file save streams a model's
weights one initializer at a time): protobuf writes a message's fields in field-number order, each a key, a
length for messages and bytes, then the payload."""
from __future__ import annotations

_MORE = 1 << 7        # varint byte: more bytes follow
_LOW7 = _MORE - 1     # varint byte: its 7 payload bits


def varint(n: int) -> bytes:
    """`n` as a base-128 varint."""
    out = bytearray()
    while True:
        b = n & _LOW7
        n >>= 7
        if n:
            out.append(b | _MORE)
        else:
            out.append(b)
            return bytes(out)


def key(field: int) -> bytes:
    """The key of length-delimited field `field`."""
    return varint(field << 3 | 2)  # wire type 2: length-delimited


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint starting at `buf[i]`: (its value, the index after it)."""
    n, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & _LOW7) << shift
        shift += 7
        if not b & _MORE:
            return n, i


def split_at(buf: bytes, field: int) -> tuple[bytes, bytes]:
    """A serialized message without `field`, split where that field would go: (fields before it, fields after)."""
    i = 0
    while i < len(buf):
        start = i
        k, i = read_varint(buf, i)
        if k >> 3 > field:
            return buf[:start], buf[start:]
        wire = k & 7
        if wire == 0:
            _, i = read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = read_varint(buf, i)
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return buf, b""


def copy_without(msg, name: str):
    """A copy of protobuf message `msg` without its field `name` (which is not copied at all)."""
    out = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name == name:
            continue
        if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:  # protobuf >= 5.29 / older
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out
