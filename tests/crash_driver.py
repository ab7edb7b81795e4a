"""Run the CLI and SIGKILL the process at the N-th step that touches the disk: `crash_driver.py N ARGS...`."""

import os
import signal
import sys

from lora_scaffold import journal
from lora_scaffold.cli import main


kill_at = int(sys.argv[1])
steps = []


def checkpoint(step: str) -> None:
    steps.append(step)
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


journal.checkpoint = checkpoint
sys.exit(main(sys.argv[2:]))
