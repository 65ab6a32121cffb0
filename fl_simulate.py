"""fedsock simulation: many virtual clients on the server's own round engine (python fl_simulate.py --help).

It lives in fedsock/simulate.py; this file lets a checkout run it as `python fl_simulate.py`.
"""

import sys

from fedsock.simulate import cli

if __name__ == "__main__":
    sys.exit(cli())
