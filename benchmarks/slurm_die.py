"""A job command that dies before reporting a port: writes the time, exits 3.

    python3 slurm_die.py FILE [ignored...]
"""

import sys
import time

with open(sys.argv[1], "w") as f:
    f.write(repr(time.time()))
sys.exit(3)
