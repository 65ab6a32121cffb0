"""fedsock's support modules: one module per concern.

The files users run stand at the top of the project (fl_server.py, fl_client.py and
the protocol and helper modules they name); everything they use lives here, so an
installed fedsock adds one package to site-packages, not a dozen generic names.
"""

from pathlib import Path

# MNIST (and the other datasets fedsock ships) travel inside the package, so an
# installed wheel finds them as well as a checkout does.
DATA_DIR = Path(__file__).resolve().parent / "data"
