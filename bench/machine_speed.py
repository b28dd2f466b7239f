"""How fast each core of this VM is right now, measured with a fixed piece of work.

Why: on this VM the same build's relay has needed 200 µs of CPU per event in one minute and
500-850 µs a few minutes later, with every process of the benchmark slowed alike and nothing
in /proc/stat's steal column (the hypervisor does not report it). A phase measured in such a
period compares the relay with the machine, not with the baseline. The probe is independent of
the code under test: a child process pinned to each core runs the same pure-Python work and
reports the CPU time it took (thread CPU time, so waiting for the core does not count; a slower
core, a descheduled vCPU the guest does not see, or a neighbour's cache pressure all do).
"""

from __future__ import annotations

import subprocess
import sys
import time

# The probe child: on each line read, three runs of the same work; prints the fastest in ms
# (one run can be hit by an interrupt; a slow period shows in all three).
_CHILD = """
import sys, time
def work():
    started = time.thread_time()
    total = 0
    for i in range(300_000):
        total += i * i % 7
    table = {i: str(i) for i in range(50_000)}
    return time.thread_time() - started
for line in sys.stdin:
    print(f"{min(work() for _ in range(3)) * 1000:.2f}", flush=True)
"""

# A probe this much slower than the fastest of the run marks the phase as measured in a slow
# period. Quiet probes on this VM stay within a few per cent of each other (min of three);
# in slow periods they took 1.8-2.3x as long, and varied by a quarter from one to the next.
SLOW_FACTOR = 1.15


class MachineSpeed:
    """One probe child per core. The yardstick is the fastest probe of the run so far: a run
    that starts in a slow period learns it when the machine speeds up (the report judges every
    phase against the fastest probe of the whole run)."""

    def __init__(self, cores: list[int]) -> None:
        self.cores = cores
        self.children = {
            core: subprocess.Popen(
                ["taskset", "-c", str(core), sys.executable, "-c", _CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for core in cores
        }
        self.fastest: dict[int, float] = {}
        for _ in range(5):
            self.probe()

    def probe(self) -> dict[int, float]:
        """Milliseconds of CPU the work took on each core now."""
        out = {}
        for core, child in self.children.items():
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("\n")
            child.stdin.flush()
            out[core] = float(child.stdout.readline())
            self.fastest[core] = min(out[core], self.fastest.get(core, out[core]))
        return out

    def slowdown(self, probe: dict[int, float], fastest: dict[int, float] | None = None) -> float:
        """The slowest core's time over the fastest seen (1.0: full speed)."""
        fastest = fastest or self.fastest
        return max(probe[core] / fastest[core] for core in self.cores)

    def worst(self, probes: list[dict[int, float]]) -> float:
        return max((self.slowdown(probe) for probe in probes), default=1.0)

    def rejudge(self, results: list[dict]) -> None:
        """At the end of a run: each result's slowdown against the fastest probe of the run."""
        for result in results:
            result["slowdown"] = self.worst(result.get("probes", []))
            for attempt in result.get("slow_attempts", []):
                attempt["slowdown"] = self.worst(attempt["probes"])

    def check(self) -> dict[int, float]:
        """A probe now. A slow one is taken again a second later and the lesser counts: quiet
        minutes show single probes 1.5x slow (a blip of ~100 ms); slow periods last minutes."""
        probe = self.probe()
        if self.slowdown(probe) > SLOW_FACTOR:
            time.sleep(1)
            again = self.probe()
            if self.slowdown(again) < self.slowdown(probe):
                probe = again
        return probe

    def wait_until_normal(self, limit_s: float) -> float:
        """Probe every 5 s until no core is slow (or `limit_s` passed); the last slowdown. Slow
        periods seen here lasted from a few minutes to over ten (the whole VM at half speed while
        idle: 27-31 ms for the 14 ms of work)."""
        deadline = time.monotonic() + limit_s
        while True:
            factor = self.slowdown(self.check())
            if factor <= SLOW_FACTOR or time.monotonic() >= deadline:
                return factor
            time.sleep(5)

    def describe(self) -> str:
        return ", ".join(f"core {c} {ms:.1f} ms" for c, ms in self.fastest.items())

    def close(self) -> None:
        for child in self.children.values():
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=10)
