"""The progress a person watches: a bar on a terminal, a line every few steps in a log."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, start: int, every: int, enabled: bool = True) -> None:
        self.enabled, self.every, self.total = enabled, every, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(
                total=total, initial=start, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
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
