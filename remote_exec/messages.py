"""The messages of the wire protocol, as frozen values.

Each message is encoded as one array ``[kind, stream_id, *fields]`` (the body
of one frame, see ``framing.py`` and ``codecs.py``). ``stream_id`` names the call
or generator stream the message belongs to; ``0`` is the connection itself.

====  ===========  =========  ==========================================================
kind  message      direction  fields after ``stream_id``
====  ===========  =========  ==========================================================
1     Call         c -> s     target, method, args (list), kwargs (map), stream (bool),
                              credit (int), meta (map)
2     Result       s -> c     value
3     Failure      s -> c     type name, message, traceback text
4     StreamItems  s -> c     items (list, at most the credit granted so far)
5     StreamEnd    s -> c     (none)
6     Credit       c -> s     count (int > 0): the server may send that many more items
7     Cancel       c -> s     (none): cancel the call, or close the stream
8     Close        both       reason (str): the sender is closing the connection
====  ===========  =========  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Call",
    "Cancel",
    "Close",
    "Credit",
    "Failure",
    "Message",
    "Result",
    "StreamEnd",
    "StreamItems",
]


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``target.method(*args, **kwargs)`` (``target`` "" is the server itself).

    ``stream`` asks for a generator stream, with ``credit`` items granted up
    front. ``meta`` carries per-call options (room for deadlines, scopes...).
    """

    stream_id: int
    target: str
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    stream: bool = False
    credit: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """The return value of a call."""

    stream_id: int
    value: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """A call or stream ended with an exception."""

    stream_id: int
    type_name: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class StreamItems:
    """Items of a generator stream, in order; never more than the credit granted.

    ``nbytes``: the size of the frame that carried them, as received (0 when
    made by hand); not part of the message's value (equality ignores it). A
    client counts it against ``Limits.max_stream_bytes``.
    """

    stream_id: int
    items: list[Any]
    nbytes: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """A generator stream finished normally."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Credit:
    """The consumer can take ``count`` more items of the stream."""

    stream_id: int
    count: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel a call (dropped if queued) or close a stream (its ``finally`` runs)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Close:
    """The sender closes the connection; ``reason`` says why."""

    stream_id: int = 0
    reason: str = ""


Message = Call | Result | Failure | StreamItems | StreamEnd | Credit | Cancel | Close

KIND_OF: dict[type, int] = {
    Call: 1,
    Result: 2,
    Failure: 3,
    StreamItems: 4,
    StreamEnd: 5,
    Credit: 6,
    Cancel: 7,
    Close: 8,
}
