"""mserve: serve JAX models over MindSpore Serving's RESTful protocol.

User-facing modules keep MindSpore Serving's names so a servable or start script
ports by changing one import: ``from mserve import register`` in
``servable_config.py`` and ``from mserve import server`` in start scripts.
"""

__version__ = "0.1.0"

import os as _os

# gRPC's C core logs every failed TLS handshake (a plain client on a TLS port, a
# scan) as an INFO line straight to stderr, in its own format, from the server and
# the client alike; mserve reports those failures itself. ERROR keeps the core's real
# errors; a GRPC_VERBOSITY set by the user wins. Set before anything imports grpc.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
