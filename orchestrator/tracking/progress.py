"""The progress a person watches: a bar on a terminal, a line every few steps in a log."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

# A log gets a line about this often (in steps) however often steps are logged.
LINE_EVERY = 10


class Progress:
    """Updated on logged steps (every ``log_every``); in a log, a line on the logged steps that
    are multiples of LINE_EVERY rounded up to a multiple of ``log_every``, and on the last."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool = True) -> None:
        self.enabled, self.total = enabled, total
        self.every = log_every * -(-LINE_EVERY // log_every)  # a multiple of log_every
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(
                total=total, initial=start, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)  # called on logged steps only
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        elif step % self.every == 0 or step == self.total:
            print(
                f"step {step:>6}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BarSafeHandler(logging.Handler):
    """Log lines printed above a live progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)
