"""A reload under load: a second version loaded and the first unloaded while clients encode.

    python bench/reload.py [--model artifacts/default] [--clients 32] [--duration 20]
                           [--load-at 5] [--unload-at 12] [--cycles 5]

Starts ``vqtok serve`` (a subprocess on loopback, VQTOK_DEVICE=cpu, one process, the admin API on with
VQTOK_ADMIN_KEY) on ``--model`` (version A). Version B is a temporary copy of that bundle whose
manifest.json gains one field (``"revision": 2``): the same graphs, a second manifest, so a second
sha256 and a second version id, served under the same name. Then:

1. **Under load.** ``--clients`` closed-loop clients each send one 64x64 PNG per ``/v1/encode`` request
   (no ``?model=``: the default name, i.e. its newest ready version) for ``--duration`` seconds; at
   ``--load-at`` s ``POST /admin/models`` loads B under the same name, at ``--unload-at`` s (or 1 s
   after the load answered, if later) ``DELETE /admin/models/name@A`` unloads A. Every answer's
   status, version ids (top level and per item) and start/end times are recorded, and the server's
   RSS (/proc/PID/status VmRSS) every 0.25 s.
   An answer is *consistent* when its version was loaded at some moment while it ran: A's answers
   started before A's unload answered, B's ended after B's load was asked for. Stricter counts are
   reported beside it: A answers that started after the load had answered (the name should then mean
   B), A answers that started after the unload was asked for, B answers that ended before the load
   had answered.
2. **Quiet.** ``--cycles`` times, with no load: RSS settled; load the original bundle again (a version
   unloaded before); 32 encodes on it (8 at a time, so its sessions run batches); unload it; RSS
   settled 2 s later. Each cycle's after/before ratio, and the last cycle's after against the first
   cycle's before (nothing piles up over cycles).

Writes bench/results/reload.json. The load generator is raw asyncio streams (the request bytes are
built once, as in bench/serve_load.py) and shares the cores with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_load import encode_request, png, smooth_images, start_server
from service.bundle import Bundle

ADMIN_KEY = "reload-bench-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
VERSION = re.compile(rb'"version":"([0-9a-f]+)"')
RSS_PERIOD_S = 0.25
SETTLE_S = 2.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


class RssSampler(threading.Thread):
    """(seconds since ``t0``, RSS in MB) every RSS_PERIOD_S, in its own thread (the event loop may be busy)."""

    def __init__(self, pid: int, t0: float):
        super().__init__(daemon=True)
        self.pid, self.t0 = pid, t0
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append((time.perf_counter() - self.t0, rss_kb(self.pid) / 1024))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._halt.wait(RSS_PERIOD_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def window(self, lo: float, hi: float) -> list[float]:
        return [mb for t, mb in self.samples if lo <= t <= hi]


def make_second_version(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose manifest gains ``"revision": 2``: same graphs, another manifest sha256."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["revision"] = 2
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.lower() == b"content-length")
    return status, await reader.readexactly(length)


async def clients(port: int, requests: list[bytes], n: int, stop_at: float, t0: float, answers: list) -> None:
    """``n`` closed-loop keep-alive clients; ``answers`` gets (start, end, status, versions or error)."""

    async def client(i: int) -> None:
        k = i
        reader = writer = None
        while time.perf_counter() < stop_at:
            start = time.perf_counter() - t0
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(requests[k % len(requests)])
                k += n
                status, body = await read_answer(reader)
                answers.append((start, time.perf_counter() - t0, status,
                                sorted({v.decode() for v in VERSION.findall(body)}) if status == 200 else body[:300].decode(errors="replace")))
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                answers.append((start, time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}"))
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(n)))


async def under_load(args, port: int, pid: int, requests: list[bytes], a: dict, b_dir: Path) -> dict:
    answers: list = []
    t0 = time.perf_counter()
    sampler = RssSampler(pid, t0)
    sampler.start()
    events: dict = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as admin:
        load = asyncio.create_task(clients(port, requests, args.clients, t0 + args.duration, t0, answers))
        await asyncio.sleep(max(0.0, t0 + args.load_at - time.perf_counter()))
        events["load_start"] = time.perf_counter() - t0
        r = await admin.post("/admin/models", json={"path": str(b_dir), "name": a["name"]}, headers=ADMIN)
        events["load_end"] = time.perf_counter() - t0
        if r.status_code != 201:
            raise SystemExit(f"loading B failed: {r.status_code} {r.text}")
        b = r.json()
        events["load_answer"] = b
        unload_at = max(args.unload_at, events["load_end"] + 1.0)
        await asyncio.sleep(max(0.0, t0 + unload_at - time.perf_counter()))
        events["unload_start"] = time.perf_counter() - t0
        r = await admin.delete(f"/admin/models/{a['ref']}", headers=ADMIN)
        events["unload_end"] = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"unloading A failed: {r.status_code} {r.text}")
        events["unload_answer"] = r.json()
        await load
        events["clients_end"] = time.perf_counter() - t0
    await asyncio.sleep(SETTLE_S + 1.0)  # the RSS once the load has gone
    sampler.stop()
    return summarize(args, answers, events, sampler, a, b)


def summarize(args, answers: list, ev: dict, sampler: RssSampler, a: dict, b: dict) -> dict:
    av, bv = a["version"], b["version"]
    failures = [x for x in answers if x[2] != 200]
    ok = [x for x in answers if x[2] == 200]
    per_version: dict[str, dict] = {}
    mixed = 0
    for start, end, _, versions in ok:
        if len(versions) != 1:
            mixed += 1  # top-level and per-item ids disagree, or none
        for v in versions:
            row = per_version.setdefault(v, {"answers": 0, "first_start_s": start, "last_start_s": start,
                                             "first_end_s": end, "last_end_s": end})
            row["answers"] += 1
            row["first_start_s"], row["last_start_s"] = min(row["first_start_s"], start), max(row["last_start_s"], start)
            row["first_end_s"], row["last_end_s"] = min(row["first_end_s"], end), max(row["last_end_s"], end)

    def loaded_while_running(v: str, start: float, end: float) -> bool:
        if v == av:
            return start < ev["unload_end"]
        if v == bv:
            return end > ev["load_start"]
        return False

    inconsistent = [x for x in ok if len(x[3]) != 1 or not loaded_while_running(x[3][0], x[0], x[1])]
    a_rows = [x for x in ok if x[3] == [av]]
    b_rows = [x for x in ok if x[3] == [bv]]
    before = sampler.window(ev["load_start"] - 1.5, ev["load_start"])
    both = sampler.window(ev["load_end"], ev["unload_end"])
    loading = sampler.window(ev["load_start"], ev["unload_end"])
    after = sampler.window(ev["unload_end"] + SETTLE_S, ev["unload_end"] + SETTLE_S + 2.0)
    idle = sampler.window(ev["clients_end"] + SETTLE_S, ev["clients_end"] + SETTLE_S + 1.0)
    rss_before, rss_after = statistics.median(before), statistics.median(after)
    seconds = int(ev["clients_end"]) + 1
    timeline = {v: [0] * seconds for v in (av, bv)}
    for start, end, _, versions in ok:
        for v in versions:
            if v in timeline and int(end) < seconds:
                timeline[v][int(end)] += 1
    bounds = [("before_load", 0.0, ev["load_start"]), ("loading_b", ev["load_start"], ev["load_end"]),
              ("both_loaded", ev["load_end"], ev["unload_start"]), ("unloading_a", ev["unload_start"], ev["unload_end"]),
              ("after_unload", ev["unload_end"], ev["clients_end"])]
    phases = {}
    for phase, lo, hi in bounds:  # by start time
        lat = sorted(1000 * (e - s) for s, e, st, _ in ok if lo <= s < hi)
        phases[phase] = {"from_s": lo, "to_s": hi, "answers": len(lat),
                         "throughput_rps": len(lat) / (hi - lo) if hi > lo else None,
                         "p50_ms": lat[len(lat) // 2] if lat else None,
                         "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
                         "max_ms": lat[-1] if lat else None}
    return {
        "clients": args.clients, "duration_s": args.duration, "phases_by_request_start": phases,
        "events_s": {k: round(v, 3) for k, v in ev.items() if isinstance(v, float)},
        "load_s": ev["load_end"] - ev["load_start"], "unload_s": ev["unload_end"] - ev["unload_start"],
        "version_a": a["ref"], "version_b": b["ref"],
        "requests": len(answers), "ok": len(ok), "failed": len(failures),
        "failures": [{"start_s": s, "end_s": e, "status": st, "detail": d} for s, e, st, d in failures[:20]],
        "throughput_rps": len(ok) / ev["clients_end"],
        "per_version": per_version,
        "answers_per_second_by_end": timeline,
        "answers_with_mixed_or_missing_ids": mixed,
        "every_answer_version_loaded_at_its_time": not inconsistent,
        "inconsistent_answers": len(inconsistent),
        "strict": {
            "a_answers_started_after_load_answered": sum(1 for x in a_rows if x[0] > ev["load_end"]),
            "a_answers_started_after_unload_asked": sum(1 for x in a_rows if x[0] > ev["unload_start"]),
            "a_answers_ended_after_unload_answered": sum(1 for x in a_rows if x[1] > ev["unload_end"]),
            "b_answers_ended_before_load_answered": sum(1 for x in b_rows if x[1] < ev["load_end"]),
        },
        "rss_mb": {
            "before_load": rss_before, "before_load_window_s": [ev["load_start"] - 1.5, ev["load_start"]],
            "peak_both_loaded": max(both) if both else None,
            "peak_load_to_unload": max(loading) if loading else None,
            "after_unload": rss_after, "after_unload_window_s": [ev["unload_end"] + SETTLE_S, ev["unload_end"] + SETTLE_S + 2.0],
            "after_over_before": rss_after / rss_before,
            "idle_after_load": statistics.median(idle) if idle else None,
            "samples": [(round(t, 2), round(mb, 1)) for t, mb in sampler.samples],
        },
    }


async def quiet_cycles(args, port: int, pid: int, model_dir: Path, name: str, requests: list[bytes]) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as admin:
        for i in range(args.cycles):
            await asyncio.sleep(SETTLE_S)
            before = rss_kb(pid) / 1024
            t = time.perf_counter()
            r = await admin.post("/admin/models", json={"path": str(model_dir), "name": name}, headers=ADMIN)
            load_s = time.perf_counter() - t
            if r.status_code != 201:
                raise SystemExit(f"cycle {i}: load failed: {r.status_code} {r.text}")
            ref = r.json()["ref"]
            # 32 encodes on the new version, 8 at a time: its sessions run, its arenas fill.
            for _ in range(4):
                rs = await asyncio.gather(*(admin.post(f"/v1/encode?model={ref}", content=q.split(b"\r\n\r\n", 1)[1],
                                                       headers={"Content-Type": "multipart/form-data; boundary=vqtokbenchboundary"})
                                            for q in requests[:8]))
                bad = [x.status_code for x in rs if x.status_code != 200 or x.json()["version"] != ref.split("@")[1]]
                if bad:
                    raise SystemExit(f"cycle {i}: encodes on {ref} answered {bad}")
            loaded = rss_kb(pid) / 1024
            t = time.perf_counter()
            r = await admin.delete(f"/admin/models/{ref}", headers=ADMIN)
            unload_s = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"cycle {i}: unload failed: {r.status_code} {r.text}")
            await asyncio.sleep(SETTLE_S)
            after = rss_kb(pid) / 1024
            row = {"cycle": i + 1, "version": ref, "rss_before_mb": before, "rss_loaded_mb": loaded,
                   "rss_after_mb": after, "after_over_before": after / before, "load_s": load_s, "unload_s": unload_s}
            print(f"  quiet cycle {i + 1}: RSS {before:.0f} -> loaded {loaded:.0f} -> after unload {after:.0f} MB "
                  f"({after / before:.3f}), load {load_s:.2f} s, unload {unload_s:.2f} s", flush=True)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--load-at", type=float, default=5.0)
    p.add_argument("--unload-at", type=float, default=12.0)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reload.json")
    args = p.parse_args(argv)
    model = args.model.resolve()
    bundle = Bundle.load(model)
    blobs = [png(im) for im in smooth_images(64, bundle.image_size)]
    tmp = Path(tempfile.mkdtemp(prefix="vqtok-reload-"))
    b_dir = make_second_version(model, tmp / "second-version")
    env = {"VQTOK_DEVICE": "cpu", "VQTOK_ADMIN_KEY": ADMIN_KEY, "VQTOK_API_KEYS": "", "VQTOK_WORKERS": "1",
           "VQTOK_QUEUE_LIMIT": str(max(512, 4 * args.clients))}
    load_avg = os.getloadavg()
    proc, port = start_server(model, env)
    try:
        if children(proc.pid):
            raise SystemExit("the server has child processes: RSS of its pid would not be the whole server")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
        a = models[0]
        requests = [encode_request(blob, port) for blob in blobs]
        print(f"serving {a['ref']} (pid {proc.pid}); second version from {b_dir.name}: "
              f"{Bundle.load(b_dir).version_id()}", flush=True)
        loaded = asyncio.run(under_load(args, port, proc.pid, requests, a, b_dir))
        print(f"under load: {loaded['requests']} requests, {loaded['failed']} failed, "
              f"{ {v: r['answers'] for v, r in loaded['per_version'].items()} }, consistent "
              f"{loaded['every_answer_version_loaded_at_its_time']}; load {loaded['load_s']:.2f} s, unload "
              f"{loaded['unload_s']:.2f} s; RSS {loaded['rss_mb']['before_load']:.0f} -> peak "
              f"{loaded['rss_mb']['peak_both_loaded']:.0f} -> {loaded['rss_mb']['after_unload']:.0f} MB "
              f"({loaded['rss_mb']['after_over_before']:.3f})", flush=True)
        cycles = asyncio.run(quiet_cycles(args, port, proc.pid, model, a["name"], requests))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], check=False, capture_output=True, text=True).stdout.strip()

    under, quiet_max = loaded["rss_mb"]["after_over_before"], max(c["after_over_before"] for c in cycles)
    result = {
        "what": "reload under load, then quiet load/unload cycles (bench/reload.py)",
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_service_files": git("status", "--porcelain", "--", "service").splitlines(),
        "verdict": {"failed_requests": loaded["failed"],
                    "every_answer_version_loaded_at_its_time": loaded["every_answer_version_loaded_at_its_time"],
                    "rss_within_10_percent_under_load": abs(under - 1) <= 0.10,
                    "rss_within_10_percent_every_quiet_cycle": all(abs(c["after_over_before"] - 1) <= 0.10
                                                                  for c in cycles),
                    "rss_after_over_before_under_load": under, "rss_after_over_before_quiet_max": quiet_max},
        "second_version": "a temporary copy of the bundle whose manifest.json gains \"revision\": 2: the same "
                          "graphs, a second manifest (so another sha256 and version id), served under the same name",
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else model.name, "image_size": bundle.image_size, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_avg,
        "shared_machine": "other work (a training run on one core, other sessions' jobs) shared the machine",
        "server_env": {k: v for k, v in env.items() if k != "VQTOK_ADMIN_KEY"},
        "under_load": loaded,
        "quiet_cycles": cycles,
        "quiet_summary": {
            "max_after_over_before": max(c["after_over_before"] for c in cycles),
            "last_after_over_first_before": cycles[-1]["rss_after_mb"] / cycles[0]["rss_before_mb"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
