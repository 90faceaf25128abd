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
)
from .errors import (
    BootstrapError as BootstrapError,
)
from .errors import (
    CompositeError as CompositeError,
)
from .errors import (
    ConfigError as ConfigError,
)
from .errors import (
    ConnectTimeoutError as ConnectTimeoutError,
)
from .errors import (
    EngineError as EngineError,
)
from .errors import (
    EngineInfo as EngineInfo,
)
from .errors import (
    HostError as HostError,
)
from .errors import (
    HostKeyError as HostKeyError,
)
from .errors import (
    HostUnreachableError as HostUnreachableError,
)
from .errors import (
    NoEnginesError as NoEnginesError,
)
from .errors import (
    ProtocolError as ProtocolError,
)
from .errors import (
    PythonVersionError as PythonVersionError,
)
from .errors import (
    RemoteError as RemoteError,
)
from .errors import (
    SerializationError as SerializationError,
)
from .errors import (
    SshparError as SshparError,
)
from .errors import (
    StartError as StartError,
)
from .errors import (
    TaskAborted as TaskAborted,
)
from .errors import (
    TimeoutError as TimeoutError,
)
from .errors import (
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
