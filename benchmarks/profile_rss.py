"""Where a command's memory peaks: run ``l4export`` in this process with a thread that samples the resident set
every 20 ms and, at each new peak (50 MB above the last recorded), keeps the main thread's Python stack.

    python benchmarks/profile_rss.py [--out FILE.json] -- convert CKPT -o OUT --format onnx --quant mixed:3.0 ...

Prints the recorded peaks (RSS, seconds, innermost frames) and writes them as JSON. Profiling aid, not a benchmark:
the sampler's own cost is small but the run is not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--step-mb", type=float, default=50.0)
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    main_id = threading.get_ident()
    peaks: list[dict] = []
    done = threading.Event()
    t0 = time.time()

    def sample() -> None:
        top = 0
        while not done.wait(0.02):
            rss = _rss()
            if rss > top + a.step_mb * 1e6:
                top = rss
                frame = sys._current_frames().get(main_id)
                stack = traceback.format_stack(frame)[-8:] if frame else []
                peaks.append({"rss_gb": round(rss / 1e9, 3), "t_s": round(time.time() - t0, 1),
                              "stack": [s.strip().replace("\n", " | ") for s in stack]})

    threading.Thread(target=sample, daemon=True).start()
    from l4export.cli import main as cli

    try:
        cli.main(args=args, standalone_mode=False)
    finally:
        done.set()
        for p in peaks[-6:]:
            print(f"{p['rss_gb']:.3f} GB at {p['t_s']} s")
            for s in p["stack"][-5:]:
                print("    " + s[:200])
        if a.out:
            with open(a.out, "w") as f:
                json.dump(peaks, f, indent=1)


if __name__ == "__main__":
    main()
