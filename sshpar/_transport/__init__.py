"""Ways of reaching a host: the Transport seam and its backends.

Layer: transport. The only package that imports SSH libraries.
"""

from .base import CommandResult, ForwardingRefused, PushReader, Transport, make_transport

__all__ = ["CommandResult", "ForwardingRefused", "PushReader", "Transport", "make_transport"]
