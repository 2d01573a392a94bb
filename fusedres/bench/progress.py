"""Progress for long runs: a tqdm bar when tqdm is installed, plain lines on stderr otherwise."""
from __future__ import annotations

import sys
import time


class _Lines:
    def __init__(self, total: int, desc: str, stream):
        self.total, self.desc, self.stream, self.n = total, desc, stream, 0
        self.start = time.monotonic()

    def set_description(self, text: str) -> None:
        print(f"[fusedres-bench] {self.desc} {self.n + 1}/{self.total}: {text}", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        print(f"[fusedres-bench] {self.desc}: {self.n}/{self.total} done in {time.monotonic() - self.start:.0f} s",
              file=self.stream, flush=True)


class _Tqdm:
    def __init__(self, bar):
        self.bar = bar

    def set_description(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, stream=None, use_tqdm: bool = True):
    """An object with set_description(text), update(n) and close()."""
    stream = stream or sys.stderr
    if use_tqdm:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return _Tqdm(tqdm(total=total, desc=desc, file=stream, dynamic_ncols=True))
    return _Lines(total, desc, stream)
