"""Strict bencode decoding: one canonical encoding per value, or an error saying where.

A .torrent is identified by the SHA-1/SHA-256 of its info dictionary's exact bytes, so
two decoders that read the same bytes differently (a second ``pieces`` key, ``i+10e``
read as 10, keys out of order) let an attacker publish one info hash over two meanings.
This decoder accepts only the canonical form that every encoder writes:

* integers ``i<digits>e``: digits only, no sign but a leading ``-``, no leading zero
  (``i0e`` is zero), no ``-0``, at most ``MAX_INT_DIGITS`` digits;
* strings ``<length>:<bytes>``: the length in digits only, no leading zero;
* dictionary keys are strings in strictly increasing byte order: no duplicates;
* nothing after the top-level value, nesting at most ``max_depth`` deep.

Errors are :class:`BencodeError`, whose message names the path of the offending value
(``info.files[3].path``) and its byte offset. Strings decode to ``bytes``, dictionaries
to ``dict[bytes, ...]``. Encoding is left to ``bencodepy``, whose output is canonical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BencodeError(ValueError):
    pass


#: Digits an integer may have. Far beyond any count or length (a 64-bit one has 19 at
#: most), so a value out of range still reaches the check that names it; a longer one
#: would cost time quadratic in its length to convert.
MAX_INT_DIGITS = 64


# Reads one value at ``pos`` in place of the decoder (see ``decode_spanning``'s ``hooks``).
Hook = Callable[["_Decoder", int, "Path", int], tuple[Any, int]]


def decode(data: bytes, *, max_depth: int = 512, max_values: int | None = None,
           trailing: bool = False) -> Any:
    """The value encoded by ``data``, which must be exactly one canonical value
    (``trailing``: followed by anything, see :func:`decode_spanning`).

    ``max_values`` bounds how many values (strings, integers, lists, dictionaries) it
    may hold: a small body of a million empty lists costs seconds and hundreds of MiB to
    decode, so a reader that expects small messages says so and stops early.
    """
    return decode_spanning(data, None, max_depth=max_depth, max_values=max_values,
                           trailing=trailing)[0]


def decode_spanning(
    data: bytes, key: bytes | None, *, max_depth: int = 512, max_values: int | None = None,
    hooks: dict[bytes, Hook] | None = None, trailing: bool = False,
) -> tuple[Any, tuple[int, int] | None]:
    """:func:`decode`, and where the value of ``key`` in the top-level dictionary lies in
    ``data`` (start, end), or None: a torrent's info hash is over those exact bytes.

    ``hooks``, name -> reader: the value of ``name`` inside the dictionary of ``key``
    (a torrent's ``info.files``, its ``file tree``) is read by ``reader(decoder, pos,
    path, depth)`` instead, which returns (value, end). A reader that knows the usual
    shape of a large value can read it without a Python object per item; for anything else it calls
    ``decoder.value``, so the rules above hold all the same.

    ``trailing``: bytes after the value are left unread (a .torrent file with a newline
    or junk after its dictionary, which libtorrent and Transmission read too: they are
    no part of any value, so no reader can see another torrent in them)."""
    dec = _Decoder(bytes(data), max_depth, max_values, key, hooks)
    value, end = dec.value(0, None, 0)
    if end != len(data) and not trailing:
        raise BencodeError(f"{len(data) - end} bytes of trailing data after the value "
                           f"(offset {end})")
    return value, dec.span


# A value's place, for messages only: (parent place, list index or dict key), built as
# the decoder goes down (a pair per level: cheap), spelled out only when an error is.
Path = tuple["Path", int | bytes] | None


def _where(path: Path) -> str:
    steps: list[str] = []
    while path is not None:
        path, step = path
        steps.append(f"[{step}]" if isinstance(step, int) else f".{_key(step)}")
    steps.reverse()
    if len(steps) > 12:  # a nesting bomb's path: its head and its depth say enough
        steps = [*steps[:8], f"...({len(steps) - 10} more)...", *steps[-2:]]
    return "".join(steps).lstrip(".") or "the top-level value"


def _key(key: bytes) -> str:
    """A key as it reads in a message: text, or hex when it is binary (a pieces root)."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return key.hex()
    return text if text.isprintable() else key.hex()


class _Decoder:
    __slots__ = ("budget", "data", "hooks", "max_depth", "n", "span", "want")

    def __init__(self, data: bytes, max_depth: int, max_values: int | None,
                 want: bytes | None = None, hooks: dict[bytes, Hook] | None = None) -> None:
        self.data = data
        self.n = len(data)
        self.max_depth = max_depth
        self.budget = max_values if max_values is not None else -1
        self.want = want  # a top-level key whose value's span is recorded
        self.span: tuple[int, int] | None = None
        self.hooks = hooks if want is not None else None

    def fail(self, path: Path, pos: int, why: str) -> BencodeError:
        return BencodeError(f"{_where(path)}: {why} (offset {pos})")

    def value(self, pos: int, path: Path, depth: int) -> tuple[Any, int]:
        data = self.data
        if pos >= self.n:
            raise self.fail(path, pos, "truncated: a value was expected")
        if self.budget >= 0:
            if self.budget == 0:
                raise self.fail(path, pos, "too many values")
            self.budget -= 1
        c = data[pos]
        if c == 0x69:  # i
            end = data.find(b"e", pos + 1)
            body = data[pos + 1 : end] if end > 0 else b""
            if body.isdigit() and (body[0] != 0x30 or end - pos == 2) and end - pos <= MAX_INT_DIGITS:
                return int(body), end + 1  # the usual, a non-negative canonical integer
            return self.integer(pos, path)  # negatives, long ones, and errors named
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
                c = data[pos]
                if c == 0x65:  # e
                    return out, pos + 1
                if 0x30 <= c <= 0x39 and self.budget < 0:  # a string: the usual item
                    item, pos = self.string(pos, (path, len(out)))
                else:
                    item, pos = self.value(pos, (path, len(out)), depth + 1)
                out.append(item)
        if c == 0x64:  # d
            d: dict[bytes, Any] = {}
            last = b""
            first = True
            top = depth == 0 and self.want is not None
            pos += 1
            while True:
                if pos >= self.n:
                    raise self.fail(path, pos, "truncated dictionary")
                c = data[pos]
                if c == 0x65:
                    return d, pos + 1
                if not 0x30 <= c <= 0x39:
                    raise self.fail(path, pos, "a dictionary key must be a string")
                # the key, inline (as string() would read it): keys are half the values
                colon = data.find(b":", pos, pos + 21)
                digits = data[pos:colon] if colon > 0 else b""
                if not digits.isdigit() or (c == 0x30 and colon - pos > 1):
                    key, kpos = self.string(pos, path)  # raises, naming the problem
                kpos = colon + 1 + int(digits)
                if kpos > self.n:
                    raise self.fail(path, pos, "truncated string")
                key = data[colon + 1 : kpos]
                if not first and key <= last:
                    why = "duplicate key" if key == last else "keys out of order"
                    raise self.fail((path, key), pos, why)
                first = False
                last = key
                if (depth == 1 and self.hooks is not None and key in self.hooks
                        and path == (None, self.want)):
                    d[key], pos = self.hooks[key](self, kpos, (path, key), depth + 1)
                    continue
                d[key], pos = self.value(kpos, (path, key), depth + 1)
                if top and key == self.want:
                    self.span = (kpos, pos)
        raise self.fail(path, pos, f"unexpected byte {chr(c)!r}")

    def integer(self, pos: int, path: Path) -> tuple[int, int]:
        data = self.data
        end = data.find(b"e", pos + 1)
        if end < 0:
            raise self.fail(path, pos, "truncated integer")
        body = data[pos + 1 : end]
        digits = body[1:] if body[:1] == b"-" else body
        if (not digits.isdigit()
                or (digits[0] == 0x30 and (len(digits) > 1 or body[:1] == b"-"))):
            raise self.fail(path, pos, f"integer {body[:24]!r} is not canonical")
        if len(digits) > MAX_INT_DIGITS:
            raise self.fail(path, pos, f"integer of {len(digits)} digits: at most "
                            f"{MAX_INT_DIGITS} are read")
        return int(body), end + 1

    def string(self, pos: int, path: Path) -> tuple[bytes, int]:
        data = self.data
        colon = data.find(b":", pos, pos + 21)
        if colon < 0:
            raise self.fail(path, pos, "string length without ':'")
        digits = data[pos:colon]
        # bytes.isdigit is ASCII digits only; an empty length fails it too
        if not digits.isdigit() or (digits[0] == 0x30 and colon - pos > 1):
            raise self.fail(path, pos, f"string length {digits!r} is not canonical")
        end = colon + 1 + int(digits)
        if end > self.n:
            raise self.fail(path, pos, "truncated string")
        return data[colon + 1 : end], end


__all__ = ["BencodeError", "decode", "decode_spanning"]
