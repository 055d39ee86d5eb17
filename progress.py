"""Progress within an epoch: tqdm's bar in a terminal, and a plain line every PLAIN_EVERY seconds in a log.

With output redirected (nohup, a CI log, `> train.log`), tqdm's bar is off, since a bar redrawn with `\\r` makes a
log unreadable, and a busy machine can then print nothing for a minute between two epoch rows, which looks like a
hang. So when stdout or stderr is not a terminal, stdout gets a line such as

    epoch 3/8: step 120/430, loss 0.0931, acc 97.11%, 14 s

at a steady pace. It starts with a word, never a digit, so that a reader of the log (or a test) can tell the epoch
rows, which start with the epoch number, from it.
"""

import sys
import time

from tqdm import tqdm

PLAIN_EVERY = 15.0  # seconds between two plain lines within an epoch


class Progress:
    """tqdm's bar (on stderr, when it is a terminal), and plain lines on stdout when either is not a terminal.

    Used like tqdm: update() after each step, set_postfix(name=text) for the figures, close() at the end."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.total, self.step, self.desc, self.postfix = total, initial, desc, {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, disable=None if enabled else True)
        self.plain = enabled and not (sys.stdout.isatty() and sys.stderr.isatty())
        self.start = self.last = time.monotonic()

    def update(self) -> None:
        self.bar.update()
        self.step += 1
        now = time.monotonic()
        if self.plain and now - self.last >= PLAIN_EVERY:
            self.last = now
            figures = "".join(f", {name} {value}" for name, value in self.postfix.items())
            print(f"{self.desc}: step {self.step}/{self.total}{figures}, {now - self.start:.0f} s", flush=True)

    def set_postfix(self, **figures: str) -> None:
        self.postfix = figures
        self.bar.set_postfix(figures)

    def close(self) -> None:
        self.bar.close()
