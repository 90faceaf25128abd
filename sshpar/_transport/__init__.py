"""Ways of reaching a host: the Transport seam and its backends.

Layer: transport. The only package that imports SSH libraries.
"""

from .base import CommandResult, ForwardingRefused, Transport, make_transport

__all__ = ["CommandResult", "ForwardingRefused", "Transport", "make_transport"]
