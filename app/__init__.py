"""mserve: serve JAX models over MindSpore Serving's RESTful protocol.

User-facing modules keep MindSpore Serving's names so a servable or start script
ports by changing one import: ``from mserve import register`` in
``servable_config.py`` and ``from mserve import server`` in start scripts.
"""

__version__ = "0.1.0"
