"""sshpar: the IPython.parallel direct interface for any machine you can ssh into.

>>> import sshpar as p
>>> rc = p.Client(hosts="hosts.yaml")
>>> e0 = rc[0]; e0.block = True
>>> e0.apply(pow, 2, 10)
1024
"""

from ._markers import Reference as Reference
from ._markers import depend as depend
from ._markers import require as require
from .asyncresult import AsyncResult as AsyncResult
from .client import Client as Client
from .config import ClusterSpec as ClusterSpec
from .config import HostSpec as HostSpec
from .config import load_hosts as load_hosts
from .errors import (
    AuthenticationError as AuthenticationError,
    BootstrapError as BootstrapError,
    CompositeError as CompositeError,
    ConfigError as ConfigError,
    ConnectTimeoutError as ConnectTimeoutError,
    EngineError as EngineError,
    EngineInfo as EngineInfo,
    HostError as HostError,
    HostKeyError as HostKeyError,
    HostUnreachableError as HostUnreachableError,
    NoEnginesError as NoEnginesError,
    ProtocolError as ProtocolError,
    PythonVersionError as PythonVersionError,
    RemoteError as RemoteError,
    SerializationError as SerializationError,
    SshparError as SshparError,
    StartError as StartError,
    TaskAborted as TaskAborted,
    TimeoutError as TimeoutError,
    UnmetDependencyError as UnmetDependencyError,
)
from .view import DirectView as DirectView

__version__ = "0.1.0"

__all__ = [
    "AsyncResult", "AuthenticationError", "BootstrapError", "Client", "ClusterSpec",
    "CompositeError", "ConfigError", "ConnectTimeoutError", "DirectView", "EngineError",
    "EngineInfo", "HostError", "HostKeyError", "HostSpec", "HostUnreachableError",
    "NoEnginesError", "ProtocolError", "PythonVersionError", "Reference", "RemoteError",
    "SerializationError", "SshparError", "StartError", "TaskAborted", "TimeoutError",
    "UnmetDependencyError", "depend", "load_hosts", "require",
]
