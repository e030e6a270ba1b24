"""py-spy profile of ``vqtok serve`` under closed-loop encode load, summarised per thread.

    python bench/profile_server.py [--model artifacts/default] [--concurrency 32] [--duration 8]

Starts a server (default settings), records it with py-spy while the serve_load client runs, and
prints each thread's share of samples and the functions with the most inclusive samples on the
event-loop thread. Needs py-spy (pip install py-spy) and permission to ptrace the child.
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load


def summarise(raw: Path, top: int) -> None:
    threads, main = Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        threads[frames[0]] += int(count)
        if "MainThread" in frames[0]:
            for frame in set(frames[1:]):
                main[frame] += int(count)
    total = sum(threads.values())
    for name, n in threads.most_common():
        print(f"{n / total:6.1%}  {name}")
    print("\nevent loop (MainThread), inclusive samples:")
    for frame, n in main.most_common(top):
        print(f"{n:6d}  {frame}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=serve_load.ROOT / "artifacts" / "default")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    proc, port = serve_load.start_server(args.model, {"VQTOK_DEVICE": "cpu"})
    size = serve_load.Bundle.load(args.model).image_size
    requests = [serve_load.encode_request(serve_load.png(im), port) for im in serve_load.smooth_images(16, size)]
    raw = Path(tempfile.mkdtemp()) / "profile.txt"
    spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-d", str(int(args.duration)), "-r", "200",
                            "--threads", "-f", "raw", "-o", str(raw)])
    try:
        print(asyncio.run(serve_load.closed_loop(port, requests, args.concurrency, args.duration, 0.5)))
        spy.wait()
    finally:
        proc.terminate()
        proc.wait()
    summarise(raw, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
