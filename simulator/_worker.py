"""The entry point of a group worker process: ``python -m simulator._worker FD``.

A module of its own so that the worker's classes pickle under ``simulator.parallel`` (run as
``-m simulator.parallel`` they would belong to ``__main__``).
"""

import sys

from simulator.parallel import serve_fd

if __name__ == "__main__":
    serve_fd(int(sys.argv[1]))
