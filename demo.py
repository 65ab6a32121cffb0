"""The demo launcher (python demo.py --help): a server and its clients, started for you.

It lives in fedsock/demo.py; this file lets a checkout run it as `python demo.py`.
"""

import sys

from fedsock.demo import main

if __name__ == "__main__":
    sys.exit(main())
