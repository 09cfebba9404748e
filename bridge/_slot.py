"""The node proxy's slot protocol: one shared-memory slot and one Unix socket per caller.

A caller (an actor process's :class:`~bray.bridge.proxy_client.ProxyClient`) and the node
proxy (:mod:`bray.bridge.proxy`) talk like this:

- **Rendezvous.** The proxy of a model listens on a Linux *abstract-namespace* Unix stream
  socket, ``"\\0bray-proxy-<uid>-<digest>"`` (see :func:`proxy_address`). No file exists,
  so a SIGKILLed proxy leaves nothing behind and the next one binds the same name at once;
  and binding is atomic, so of several proxies started together exactly one serves.
- **Peers.** Abstract sockets have no file mode, so each end checks the other's uid with
  ``SO_PEERCRED`` (:func:`check_peer`): a process of another user can neither connect to
  the proxy nor pose as it (one squatting the name is refused by callers, who then go
  straight to TorchServe).
- **Slot.** The caller makes its slot with ``memfd_create`` (no name in ``/dev/shm``, no
  file at all; it disappears with the last process holding it, SIGKILL included) and hands
  the descriptor to the proxy once, over the socket (``SCM_RIGHTS``). Inputs and then the
  outputs of one call are written into it in the :mod:`bray.wire` binary form; either side
  may grow it (``ftruncate``), and says so in its header.
- **Wake-up and liveness.** Each direction of a call is one 32-byte header on the socket:
  the read wakes the other side, and a peer that dies closes its socket, which the other
  side sees at once (EOF), so a dead actor's slot is freed and a dead proxy's callers
  never hang.

One call in flight per connection; a process making concurrent calls holds several.

A caller sends the same structure call after call (one observation, the same dtypes),
and the proxy answers with the same structure: :mod:`bray.wire` keeps the layout of the
last few structures it encoded and decoded, so a call costs copying its arrays, not
writing and parsing the wire header again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import socket
import struct
from typing import Any, Sequence

from bray import wire
from bray.tree import TreeDef
from bray.errors import BrayError, ProxyUnavailableError

__all__ = [
    "HEADER",
    "OP_CALL",
    "OP_HELLO",
    "OP_STATS",
    "ST_ERROR",
    "ST_INLINE",
    "ST_SLOT",
    "Slot",
    "check_peer",
    "error_body",
    "proxy_address",
    "raise_error",
    "read_outputs",
]

#: op or status (u8), 3 pad bytes, samples (u32), step (i64: the caller's newest step in a
#: request, the answering step in a reply), payload bytes (u64), slot size (u64).
HEADER = struct.Struct("<BxxxIqQQ")
OP_HELLO, OP_CALL, OP_STATS = 1, 2, 3
ST_SLOT, ST_INLINE, ST_ERROR = 0, 1, 2
MIN_SLOT_BYTES = 64 * 1024
_UCRED = struct.Struct("3i")


def proxy_address(name: str, version: str, inference_urls: Sequence[str], store: os.PathLike[str] | str) -> str:
    """The abstract socket name of the proxy serving ``name``/``version`` from this store and servers.

    One proxy per user, model, version, set of servers and store: callers that would
    send the same requests share it.
    """
    key = json.dumps([name, version, sorted(u.rstrip("/") for u in inference_urls),
                      os.path.abspath(os.fspath(store))])
    return f"\0bray-proxy-{os.getuid()}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def check_peer(sock: socket.socket) -> int:
    """The peer's pid, after checking it runs as this user.

    Raises:
        ProxyUnavailableError: the peer is another user's process.
    """
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid != os.getuid():
        raise ProxyUnavailableError(
            f"the process at the node proxy's socket (pid {pid}) runs as uid {uid}, not {os.getuid()}: "
            "refusing to exchange observations with it; find and stop it, or use node_proxy=False"
        )
    return pid


class Slot:
    """A caller's shared-memory slot: a memfd mapped by both sides.

    Args:
        fd: the memfd (owned: :meth:`close` closes it).
        size: its current size in bytes.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.mm = mmap.mmap(fd, size)

    @classmethod
    def create(cls, size: int = MIN_SLOT_BYTES) -> "Slot":
        """A new anonymous slot of at least ``size`` bytes."""
        fd = os.memfd_create("bray-slot", os.MFD_CLOEXEC)
        try:
            size = _round_up(size)
            os.ftruncate(fd, size)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def follow(self, size: int) -> None:
        """Map the slot again at ``size`` bytes, after the other side grew it."""
        if size != self.size:
            if size < self.size or os.fstat(self.fd).st_size < size:
                raise ProxyUnavailableError(f"the peer announced a slot of {size} bytes, but it holds "
                                            f"{os.fstat(self.fd).st_size}: protocol error")
            self._remap(size)

    def write(self, obj: Any) -> int:
        """Encode the NestedArray ``obj`` into the slot (growing it when needed); returns its bytes."""
        parts = wire.encode_parts(obj)
        total = sum([len(part) for part in parts])
        if total > self.size:
            size = _round_up(total)
            os.ftruncate(self.fd, size)
            self._remap(size)
        mm, pos = self.mm, 0
        for part in parts:
            end = pos + len(part)
            mm[pos:end] = part
            pos = end
        return total

    def read(self, nbytes: int, *, copy: bool = False) -> Any:
        """The NestedArray at the start of the slot: views into it (valid until the next
        write), or with ``copy`` views into a copy of its bytes (writable, its own)."""
        body = self._body(nbytes)
        return wire.decode(bytearray(body) if copy else body)

    def read_leaves(self, nbytes: int) -> tuple[list[Any], TreeDef]:
        """:meth:`read`'s views as its arrays and their tree definition (:func:`bray.wire.decode_leaves`)."""
        return wire.decode_leaves(self._body(nbytes))

    def _body(self, nbytes: int) -> memoryview:
        if nbytes > self.size:
            raise ProxyUnavailableError(f"the peer announced {nbytes} bytes in a slot of {self.size}: protocol error")
        return memoryview(self.mm)[:nbytes]

    def _remap(self, size: int) -> None:
        # A new mapping rather than mmap.resize: arrays decoded from the old one may still be
        # alive (they keep the old mapping until they go).
        self.mm = mmap.mmap(self.fd, size)
        self.size = size

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # views are still alive; the mapping goes with them
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def read_outputs(slot: Slot, nbytes: int) -> Any:
    """The outputs in ``slot``, copied out (the slot is reused by the next call)."""
    return slot.read(nbytes, copy=True)


def _round_up(n: int) -> int:
    size = MIN_SLOT_BYTES
    while size < n:
        size *= 2
    return size


def error_body(err: BaseException) -> bytes:
    """An error as the proxy sends it: its class (from :mod:`bray.errors`), message, status."""
    name = type(err).__name__ if isinstance(err, BrayError) else "ServerError"
    message = str(err) or type(err).__name__
    if not isinstance(err, BrayError):
        message = f"the node proxy failed: {type(err).__name__}: {message}"
    return json.dumps({"type": name, "message": message, "status": getattr(err, "status", None)}).encode()


def raise_error(body: bytes) -> None:
    """Raise the error the proxy sent, as the same :mod:`bray.errors` class."""
    import bray.errors as errors

    try:
        info = json.loads(body)
        cls = getattr(errors, str(info["type"]), None)
        message, status = str(info["message"]), info.get("status")
    except (ValueError, KeyError, TypeError):
        raise ProxyUnavailableError(f"the node proxy sent an unreadable error: {body[:200]!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, BrayError)):
        cls = errors.ServerError
    raise cls(message, status=status) if status is not None else cls(message)

