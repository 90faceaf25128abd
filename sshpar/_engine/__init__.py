"""The engine daemon: socket server, task loop, namespace, output capture.

Layer: engine. Everything under this package is shipped to remote hosts and imports only the
standard library, cloudpickle and the shipped sshpar modules (errors, _wire, _serialize,
_markers).
"""
