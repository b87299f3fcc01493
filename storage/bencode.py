"""Strict bencode decoding: one canonical encoding per value, or an error saying where.

A .torrent is identified by the SHA-1/SHA-256 of its info dictionary's exact bytes, so
two decoders that read the same bytes differently (a second ``pieces`` key, ``i+10e``
read as 10, keys out of order) let an attacker publish one info hash over two meanings.
This decoder accepts only the canonical form that every encoder writes:

* integers ``i<digits>e``: digits only, no sign but a leading ``-``, no leading zero
  (``i0e`` is zero), no ``-0``;
* strings ``<length>:<bytes>``: the length in digits only, no leading zero;
* dictionary keys are strings in strictly increasing byte order: no duplicates;
* nothing after the top-level value, nesting at most ``max_depth`` deep.

Errors are :class:`BencodeError`, whose message names the path of the offending value
(``info.files[3].path``) and its byte offset. Strings decode to ``bytes``, dictionaries
to ``dict[bytes, ...]``. Encoding is left to ``bencodepy``, whose output is canonical.
"""

from __future__ import annotations

from typing import Any


class BencodeError(ValueError):
    pass


_DIGITS = frozenset(b"0123456789")


def decode(data: bytes, *, max_depth: int = 512, max_values: int | None = None) -> Any:
    """The value encoded by ``data``, which must be exactly one canonical value.

    ``max_values`` bounds how many values (strings, integers, lists, dictionaries) it
    may hold: a small body of a million empty lists costs seconds and hundreds of MiB to
    decode, so a reader that expects small messages says so and stops early.
    """
    value, end = _Decoder(bytes(data), max_depth, max_values).value(0, (), 0)
    if end != len(data):
        raise BencodeError(f"{len(data) - end} bytes of trailing data after the value "
                           f"(offset {end})")
    return value


def _where(path: tuple[str, ...]) -> str:
    if len(path) > 12:  # a nesting bomb's path: its head and its depth say enough
        path = (*path[:8], f"...({len(path) - 10} more)...", *path[-2:])
    return "".join(path).lstrip(".") or "the top-level value"


def _key(key: bytes) -> str:
    """A key as it reads in a message: text, or hex when it is binary (a pieces root)."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return key.hex()
    return text if text.isprintable() else key.hex()


class _Decoder:
    __slots__ = ("budget", "data", "max_depth", "n")

    def __init__(self, data: bytes, max_depth: int, max_values: int | None) -> None:
        self.data = data
        self.n = len(data)
        self.max_depth = max_depth
        self.budget = max_values if max_values is not None else -1

    def fail(self, path: tuple[str, ...], pos: int, why: str) -> BencodeError:
        return BencodeError(f"{_where(path)}: {why} (offset {pos})")

    def value(self, pos: int, path: tuple[str, ...], depth: int) -> tuple[Any, int]:
        data = self.data
        if pos >= self.n:
            raise self.fail(path, pos, "truncated: a value was expected")
        if self.budget >= 0:
            if self.budget == 0:
                raise self.fail(path, pos, "too many values")
            self.budget -= 1
        c = data[pos]
        if c == 0x69:  # i
            return self.integer(pos, path)
        if 0x30 <= c <= 0x39:
            return self.string(pos, path)
        if depth >= self.max_depth:
            raise self.fail(path, pos, f"nested more than {self.max_depth} deep")
        if c == 0x6C:  # l
            out: list[Any] = []
            pos += 1
            while True:
                if pos >= self.n:
                    raise self.fail(path, pos, "truncated list")
                if data[pos] == 0x65:  # e
                    return out, pos + 1
                item, pos = self.value(pos, (*path, f"[{len(out)}]"), depth + 1)
                out.append(item)
        if c == 0x64:  # d
            d: dict[bytes, Any] = {}
            last: bytes | None = None
            pos += 1
            while True:
                if pos >= self.n:
                    raise self.fail(path, pos, "truncated dictionary")
                if data[pos] == 0x65:
                    return d, pos + 1
                if not 0x30 <= data[pos] <= 0x39:
                    raise self.fail(path, pos, "a dictionary key must be a string")
                key, kpos = self.string(pos, path)
                name = _key(key)
                if last is not None and key <= last:
                    why = "duplicate key" if key == last else "keys out of order"
                    raise self.fail((*path, f".{name}"), pos, why)
                last = key
                d[key], pos = self.value(kpos, (*path, f".{name}"), depth + 1)
        raise self.fail(path, pos, f"unexpected byte {chr(c)!r}")

    def integer(self, pos: int, path: tuple[str, ...]) -> tuple[int, int]:
        data = self.data
        end = data.find(b"e", pos + 1)
        if end < 0:
            raise self.fail(path, pos, "truncated integer")
        body = data[pos + 1 : end]
        digits = body[1:] if body[:1] == b"-" else body
        if (not digits or not _DIGITS.issuperset(digits)
                or (digits[0] == 0x30 and (len(digits) > 1 or body[:1] == b"-"))):
            raise self.fail(path, pos, f"integer {body[:24]!r} is not canonical")
        return int(body), end + 1

    def string(self, pos: int, path: tuple[str, ...]) -> tuple[bytes, int]:
        data = self.data
        colon = data.find(b":", pos, pos + 21)
        if colon < 0:
            raise self.fail(path, pos, "string length without ':'")
        digits = data[pos:colon]
        if not _DIGITS.issuperset(digits) or (digits[0] == 0x30 and len(digits) > 1):
            raise self.fail(path, pos, f"string length {digits!r} is not canonical")
        end = colon + 1 + int(digits)
        if end > self.n:
            raise self.fail(path, pos, "truncated string")
        return data[colon + 1 : end], end


__all__ = ["BencodeError", "decode"]
