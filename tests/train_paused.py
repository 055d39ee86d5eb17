"""train.py that pauses after optimiser step $PAUSE_AFTER_STEP until a signal arrives (a helper, not a test).

Rank 0 prints "paused after step N" and every process waits there. A test that signals or kills the run
after that line knows the run is still going, and at which step, however slow the machine is. The
signal then goes to train.py's own handler as usual. A process group that torchrun restarted does
not pause again.

    PAUSE_AFTER_STEP=75 python tests/train_paused.py --epochs 3 ...                  # as train.py
    PAUSE_AFTER_STEP=75 torchrun --nproc-per-node 2 tests/train_paused.py ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.optim.optimizer import register_optimizer_step_post_hook

import config
import distributed
import train

PAUSE_AFTER_STEP = int(os.environ["PAUSE_AFTER_STEP"])
steps = 0

# Python's C-level handler writes a byte here for every signal that arrives, on whichever thread it lands,
# so the pause cannot miss a signal that came before it began to wait.
woken, wake = os.pipe()
os.set_blocking(wake, False)
signal.set_wakeup_fd(wake)


def pause(optimizer, args, kwargs) -> None:
    global steps
    steps += 1
    if steps == PAUSE_AFTER_STEP and not distributed.restarts():  # the group's count: torchrun's is per machine
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"paused after step {steps}", flush=True)
        os.read(woken, 1)  # until a signal; train.py's handler runs as soon as Python runs again


register_optimizer_step_post_hook(pause)
config.exit_script(train.main())
