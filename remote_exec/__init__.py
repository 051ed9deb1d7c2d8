"""remote-exec: run methods of ordinary Python objects somewhere else.

The core (this package) is I/O-free: frames, codecs, the registry, the wire
protocol, the error tree and the executor interface. The executors live in
``remote_exec.client`` and the server in ``remote_exec.server``; the public
names are re-exported here.
"""

from __future__ import annotations

from .exceptions import RemoteException as RemoteException
from .registry import InstanceRegistry as InstanceRegistry, register_coder as register_coder

__all__ = ["InstanceRegistry", "RemoteException", "register_coder"]
