"""The example servables bundled with mserve (``mserve start`` serves them by default).

Each folder is a servable directory entry: ``servable_config.py`` plus numbered
version folders with the model files. This package only exists so the folders ship
inside the installed ``mserve`` package.
"""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent
