"""A Ray Serve replica SIGKILLed under load: ``levit serve --ray --replicas 2`` (a local Ray, one CPU a
replica), C clients for ``--duration`` s (and on, until the lost replica's successor has answered or
60 s have passed since the kill), and at ``--kill-at`` s one replica's process killed. Prints
the requests answered and failed, the failed share against the target (at most 1%), and how long
after the kill a replica that was not serving before answered a request (the lost one's successor;
target: within 60 s).

    python benchmarks/serve_ray_kill.py                       # LeViT-128S, 64 clients, 40 s, the kill at 10 s
    python benchmarks/serve_ray_kill.py --clients 8 --duration 15 --kill-at 3   # a short check of the script

The replica that answered a request is in its ``X-Levit-Replica`` header (``host:pid``); the victim
is the first of the two in sorted order. The load generator (asyncio + aiohttp, as
benchmarks/serve_load.py) shares the 2 cores with the server and its Ray processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import HOST, _machine, free_port, photo_jpegs


def start(ckpt: Path, log: Path) -> tuple:
    """``levit serve --ray --replicas 2`` in a process group of its own, once ``/ready`` answers 200."""
    import subprocess

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "levit", "serve", "--checkpoint", str(ckpt), "--host", HOST, "--port", str(port)]
    cmd += ["--ray", "--replicas", "2", "--replica-cpus", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    url, t0 = f"http://{HOST}:{port}", time.perf_counter()
    while time.perf_counter() < t0 + 300:
        if proc.poll() is not None:
            raise SystemExit(f"levit serve --ray exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"levit serve --ray was not ready after 300 s:\n{log.read_text()[-3000:]}")


BACK_WITHIN_S = 60.0  # the target: the lost replica's successor answers within this many seconds


async def load_with_a_kill(url: str, jpegs: list[bytes], clients: int, duration: float, kill_at: float) -> dict:
    """``clients`` clients for ``duration`` s, and on until a new replica has answered or
    :data:`BACK_WITHIN_S` s have passed since the kill (a slower machine starts the successor later
    than a short run lasts); at ``kill_at`` s the first replica (sorted) is SIGKILLed."""
    import aiohttp

    out = {"ok": 0, "failed": 0, "errors": {}, "before": set(), "victim": None, "kill_t": None, "back_s": None}
    t0 = time.perf_counter()
    end = t0 + duration

    def going() -> bool:
        now = time.perf_counter()
        if now < end or out["kill_t"] is None:
            return True
        return out["back_s"] is None and now < out["kill_t"] + BACK_WITHIN_S

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def client(i: int) -> None:
            while going():
                try:
                    async with session.post(url + "/v1/classify", data=jpegs[i % len(jpegs)]) as r:
                        await r.read()
                        status, replica = r.status, r.headers.get("x-levit-replica")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    status, replica = type(e).__name__, None
                i += clients
                if status != 200:
                    out["failed"] += 1
                    out["errors"][status] = out["errors"].get(status, 0) + 1
                    continue
                out["ok"] += 1
                if out["kill_t"] is None:
                    out["before"].add(replica)
                elif replica not in out["before"] and out["back_s"] is None:
                    out["back_s"] = time.perf_counter() - out["kill_t"]

        async def kill() -> None:
            await asyncio.sleep(kill_at)
            victim = sorted(out["before"])[0]
            out["victim"] = victim
            os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
            out["kill_t"] = time.perf_counter()

        await asyncio.gather(kill(), *(client(i) for i in range(clients)))
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="levit_128s", help="variant (random weights)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of load")
    ap.add_argument("--kill-at", type=float, default=10.0, help="seconds into the load when a replica is killed")
    args = ap.parse_args(argv)
    import levit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers (test support)
    from helpers import randomize_weights

    jpegs = photo_jpegs(32)
    with tempfile.TemporaryDirectory(prefix="levit-ray-kill-") as d:
        ckpt = Path(d) / f"{args.model}.safetensors"
        levit.save(randomize_weights(levit.create_model(args.model), seed=0), ckpt)
        proc, url, startup = start(ckpt, Path(d) / "serve.log")
        try:
            res = asyncio.run(load_with_a_kill(url, jpegs, args.clients, args.duration, args.kill_at))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # levit and its local Ray, as a service manager stops them
            try:
                code = proc.wait(timeout=60)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
    total = res["ok"] + res["failed"]
    share = res["failed"] / max(total, 1)
    back = "never" if res["back_s"] is None else f"{res['back_s']:.1f} s"
    print(f"\n$ python benchmarks/serve_ray_kill.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"a replica killed under load, --ray --replicas 2 ({_machine()}; model {args.model}, start-up {startup:.1f} s): "
        f"{args.clients} clients for {res['seconds']:.0f} s (--duration {args.duration:g}, longer until a new replica "
        f"answered or {BACK_WITHIN_S:g} s after the kill), replica {res['victim']} SIGKILLed at {args.kill_at:g} s; "
        f"{total} requests, {res['ok']} answered, {res['failed']} failed ({share:.2%}) {res['errors'] or ''}; "
        f"a new replica answered {back} after the kill; exit {code}"
    )
    ok = share <= 0.01 and res["back_s"] is not None and res["back_s"] <= BACK_WITHIN_S
    print(f"target: at most 1% failed and the replica back within {BACK_WITHIN_S:g} s: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
