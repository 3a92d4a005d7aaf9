"""What `ldm-bench` shows a person while it runs: the plan (the denoising steps each configuration will
take), a progress bar per configuration (steps done, it/s, ETA), one estimate of the whole run's wall time
once a timed step has been measured, and the table of results at the end. All of it goes to stderr;
stdout carries only the JSON rows."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def say(msg: str) -> None:
    """One line on stderr that does not tear a progress bar that is being drawn."""
    tqdm.write(msg, file=sys.stderr)


def config_steps(steps: int, warmup: int, repeat: int, control: bool = False, cached: bool = False) -> int:
    """Denoising steps one configuration takes: --warmup runs of min(steps, 2), --repeat runs of `steps`,
    and the same again with a ControlNet, and again with the step cache."""
    plain = warmup * min(steps, 2) + repeat * steps
    return plain * (1 + control + cached)


def print_plan(configs, steps: int, warmup: int, repeat: int, control: bool, skipped, cached: bool = False) -> int:
    """The skipped backends with their reasons, then one line per configuration; returns the total steps."""
    for note in skipped:
        say(note)
    each = config_steps(steps, warmup, repeat, control, cached)
    again = " and ".join(w for w, on in (("the ControlNet", control), ("the step cache", cached)) if on)
    times = 1 + control + cached
    for backend, dtype in configs:
        say(f"plan: {backend} {dtype}: {warmup} warm-up x {min(steps, 2)} + {repeat} timed x {steps} steps"
            f"{f' (x{times} with {again})' if again else ''} = {each} steps")
    total = each * len(configs)
    say(f"plan: {len(configs)} configuration{'s' * (len(configs) != 1)} x {each} = {total} denoising steps")
    return total


class StepProgress:
    """Progress over the whole run: `bar(label, total)` opens one configuration's bar; `step()` (the
    Pipeline's progress_callback) advances it; the first timed step of the run gives one wall-time estimate."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.done = 0
        self.estimated = False
        self._bar = None
        self._timed = False
        self._last = None

    def bar(self, label: str, total: int):
        self.close()
        self._bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                                    "[{elapsed}<{remaining}, {rate_fmt}]")
        return self._bar

    def run_started(self, timed: bool) -> None:
        self._timed, self._last = timed, time.perf_counter()

    def step(self, done: int = 0, total: int = 0) -> None:
        now = time.perf_counter()
        if self._timed and not self.estimated and done >= min(2, total):
            # steps >= 2: the second step alone (the first also holds the text encoder); else the run so far
            self._estimate(now - self._last)
        self._last = now
        self.advance(1)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def run_ended(self, seconds_per_step: float) -> None:
        """For runs without per-step callbacks (CUDA-graph loops): the estimate from the whole run."""
        if self._timed and not self.estimated:
            self._estimate(seconds_per_step)

    def _estimate(self, step_s: float) -> None:
        self.estimated = True
        left = (self.total - self.done - 1) * step_s
        say(f"estimate: {step_s:.3g} s per step here, about {_duration(left)} for the {self.total - self.done - 1} "
            "steps left (other backends and dtypes run at their own rate; graph backends export and compile first)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


TABLE_COLUMNS = ("backend", "dtype", "unet_step_s", "it_per_s", "end_to_end_s", "vae_decode_s", "peak_mem_mb",
                 "roofline_pct", "psnr_db", "control_cost_x", "cache_end_to_end_s", "cache_speedup_x",
                 "cache_psnr_db", "cpu", "isa", "int8_gemm_gflops", "cache_interval")


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table of TABLE_COLUMNS (the optional ones only where present)."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
