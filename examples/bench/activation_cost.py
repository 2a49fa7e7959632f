"""What the installed plugin costs a Python process that never imports TRL (a benchmark: prints figures).

    python examples/bench/activation_cost.py

Reads `python -X importtime -c pass` (the plugin's own import lines) and times `python -c pass` with the plugin
active and with QLORA_PLUGIN_DISABLE=1, alternating, 20 rounds each.
"""

import os
import statistics
import subprocess
import sys
import time


def importtime_us() -> int:
    """Cumulative microseconds of the plugin's start-up imports in one `python -X importtime -c pass`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    cumulative = [int(line.split("|")[1]) for line in proc.stderr.splitlines() if "qlora_plugin" in line]
    return max(cumulative, default=0)


def wall_ms(disabled: bool) -> float:
    env = {**os.environ, "QLORA_PLUGIN_DISABLE": "1" if disabled else ""}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; assert 'trl' not in sys.modules"], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def main():
    runs = [importtime_us() for _ in range(15)]
    print(f"plugin start-up imports (-X importtime, cumulative): median {statistics.median(runs) / 1000:.2f} ms, "
          f"max {max(runs) / 1000:.2f} ms over {len(runs)} runs")
    on, off = [], []
    for _ in range(20):
        on.append(wall_ms(False))
        off.append(wall_ms(True))
    print(f"python -c pass, plugin active  : median {statistics.median(on):.1f} ms")
    print(f"python -c pass, plugin disabled: median {statistics.median(off):.1f} ms")
    print(f"difference (medians)           : {statistics.median(on) - statistics.median(off):+.1f} ms")


if __name__ == "__main__":
    main()
