"""Control messages: what goes inside HELLO, REQUEST, RESPONSE, ERROR and EVENT frames.

Bencode has integers, byte strings, lists and dictionaries only, so values are
mapped once, here, for both ends: text is UTF-8, booleans are 0/1, None is left
out of dictionaries, floats are not sent (counters are integers, times are in
microseconds). Byte strings come back as ``str`` unless the key names binary
data (:data:`BINARY_KEYS`).
"""

from __future__ import annotations

from typing import Any

from pieced.storage.errors import PiecedError, ProtocolError, error_from_code

from .frames import PROTOCOL_VERSION, FrameType, encode_control

# Keys whose values are raw bytes, never text.
BINARY_KEYS = frozenset({"ih", "after", "metainfo", "have", "expected", "digest", "aliases", "data"})

def to_wire(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return {str(k).encode(): to_wire(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    if isinstance(value, float):
        raise TypeError("floats do not go on the wire: send integer microseconds")
    raise TypeError(f"cannot send {type(value).__name__} on the wire")


def wire_bencode(value: Any) -> bytes:
    """``bencode(to_wire(value))`` in one pass, without the intermediate copy: a status
    reply lists every file of a torrent (100,000 entries for some), and building it twice
    in Python held the GIL for long enough to slow every other client down. Into one
    buffer, not a list of pieces: 15 small objects a file entry took 2 KB each (213 MB
    for the 8.6 MB reply of a torrent of 100,000 files)."""
    out = bytearray()
    _encode(value, out.extend)
    return bytes(out)


def _encode(value: Any, put: Any) -> None:
    t = type(value)
    if t is int:
        put(b"i%de" % value)
    elif t is str:
        b = value.encode()
        put(b"%d:" % len(b))
        put(b)
    elif t is bytes:
        put(b"%d:" % len(value))
        put(value)
    elif t is dict:
        items = sorted((str(k).encode(), v) for k, v in value.items() if v is not None)
        put(b"d")
        for i in range(1, len(items)):
            if items[i][0] == items[i - 1][0]:
                raise ValueError(f"key {items[i][0]!r} twice in one dictionary")
        for k, v in items:
            put(b"%d:" % len(k))
            put(k)
            _encode(v, put)
        put(b"e")
    elif t is list or t is tuple:
        put(b"l")
        for v in value:
            _encode(v, put)
        put(b"e")
    elif isinstance(value, int) and not isinstance(value, float):  # bool, IntEnum
        put(b"i%de" % int(value))
    elif isinstance(value, bytes | bytearray | memoryview):
        _encode(bytes(value), put)
    elif isinstance(value, str):
        _encode(str(value), put)
    elif isinstance(value, dict):
        _encode(dict(value), put)
    elif isinstance(value, list | tuple):
        _encode(list(value), put)
    else:
        to_wire(value)  # raises the TypeError that says why
        raise TypeError(f"cannot send {type(value).__name__} on the wire")


def from_wire(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
            out[name] = from_wire(v, name)
        return out
    if isinstance(value, list):
        return [from_wire(v, key) for v in value]
    if isinstance(value, bytes) and key not in BINARY_KEYS:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def hello(role: str, name: str, **features: Any) -> dict[str, Any]:
    return {"magic": "pieced", "version": PROTOCOL_VERSION, "role": role, "name": name, **features}


def check_hello(body: dict[bytes, Any], role: str) -> dict[str, Any]:
    msg = from_wire(body)
    if msg.get("magic") != "pieced":
        raise ProtocolError("handshake: not a pieced peer")
    if msg.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"handshake: protocol version {msg.get('version')!r} is not supported "
            f"(this side speaks {PROTOCOL_VERSION})"
        )
    if msg.get("role") != role:
        raise ProtocolError(f"handshake: expected a {role}")
    return dict(msg)


#: An ERROR's message is cut to this many characters: it may repeat what a client sent
#: (an unknown op), and an error frame must stay far below the smallest frame limit.
MAX_ERROR_MESSAGE = 1024


def encode_error(rid: int, err: PiecedError) -> bytes:
    message = err.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 1] + "\u2026"
    body: dict[str, Any] = {"code": int(err.code), "message": message}
    if err.errno is not None:
        body["errno"] = err.errno
    return encode_control(FrameType.ERROR, rid, to_wire(body))


def decode_error(body: dict[bytes, Any]) -> PiecedError:
    msg = from_wire(body)
    code = msg.get("code")
    text = msg.get("message", "")
    if not isinstance(code, int) or not isinstance(text, str):
        return ProtocolError("malformed ERROR frame")
    errno = msg.get("errno")
    return error_from_code(code, text, errno if isinstance(errno, int) else None)


def encode_request(rid: int, op: str, args: dict[str, Any]) -> bytes:
    return encode_control(FrameType.REQUEST, rid, to_wire({"op": op, **args}))


def encode_response(rid: int, result: Any) -> bytes:
    return encode_control(FrameType.RESPONSE, rid, wire_bencode({"result": result}))


def encode_event(name: str, fields: dict[str, Any]) -> bytes:
    return encode_control(FrameType.EVENT, 0, wire_bencode({"event": name, **fields}))
