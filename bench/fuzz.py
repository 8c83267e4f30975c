"""Fuzz the local stack with the reliability suite's strategies and count status codes per RPC.

    python bench/fuzz.py                      # 10,000 requests over the RPCs -> bench/results/fuzz-<date>.json
    python bench/fuzz.py --requests 2000 --seed 1

Starts its own stack (``services.stack.start_stack``: encoder, decoder, trainer on the tiny model, bearer-token
auth, the limits of ``tests.reliability.harness.LIMITS``), creates tenant acme's objects the strategies refer to
(``own_objects``), then for each RPC of ``tests.reliability.strategies.TARGETS`` sends ``requests / len(TARGETS)``
drawn requests (hypothesis, generation only, ``--seed`` fixed). Every ``HEALTH_EVERY`` requests and at the end
each service must answer SERVING. The result records counts by RPC and status code, the requests that got
INTERNAL or UNKNOWN (the property the CI test checks on a bounded sample), the rate and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bench, tests, sam_core and services before any installed copy

from bench.speedparts.common import cpu_model_and_isa  # noqa: E402

HEALTH_EVERY = 100
BROKEN = ("INTERNAL", "UNKNOWN")


def fuzz_rpc(clients: Any, addresses: dict[str, str], rpc: str, count: int, seed: int) -> dict[str, Any]:
    """Send ``count`` drawn requests to ``rpc``; returns {"codes": {code: n}, "broken": [...], "seconds": s}."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.reliability.harness import SERVING, call, health
    from tests.reliability.strategies import TARGETS

    strategy, service = TARGETS[rpc]
    method = clients.method(rpc)
    codes: Counter[str] = Counter()
    broken: list[dict[str, str]] = []

    @hypothesis_seed(seed)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(request=strategy)
    def send(request: Any) -> None:
        outcome = call(method, request, timeout=60)
        codes[outcome.code.name] += 1
        if outcome.code.name in BROKEN and len(broken) < 20:
            broken.append({"details": outcome.details, "request": repr(request)[:2000]})
        if sum(codes.values()) % HEALTH_EVERY == 0 and health(addresses[service]) != SERVING:
            raise RuntimeError(f"{service} is not SERVING after {sum(codes.values())} {rpc} requests")

    start = time.perf_counter()
    send()
    return {"codes": dict(sorted(codes.items())), "broken": broken, "seconds": round(time.perf_counter() - start, 1)}


def run(requests: int, seed: int, var: Path) -> dict[str, Any]:
    from sam_core.modeling.registry import load_model
    from services.stack import start_stack
    from tests.reliability.harness import SERVING, Clients, health, own_objects, prepare
    from tests.reliability.strategies import TARGETS

    env = prepare(var)
    stack = start_stack(var, model="tiny", extra_env=env)
    try:
        with Clients(stack.addresses) as clients:
            own_objects(var, clients, load_model("tiny"), var / "owned")
            per_rpc = max(1, requests // len(TARGETS))
            by_rpc = {}
            for rpc in TARGETS:
                by_rpc[rpc] = fuzz_rpc(clients, stack.addresses, rpc, per_rpc, seed)
                print(json.dumps({rpc: by_rpc[rpc]["codes"], "seconds": by_rpc[rpc]["seconds"]}), flush=True)
        serving = {name: health(address) == SERVING for name, address in stack.addresses.items()}
    finally:
        exit_codes = stack.stop()
    total: Counter[str] = Counter()
    for result in by_rpc.values():
        total.update(result["codes"])
    seconds = sum(result["seconds"] for result in by_rpc.values())
    sent = sum(total.values())
    return {"requests": sent, "seed": seed, "by_rpc": by_rpc, "by_code": dict(sorted(total.items())),
            "broken": sum(total[code] for code in BROKEN), "serving_at_end": serving, "exit_codes": exit_codes,
            "seconds": round(seconds, 1), "requests_per_s": round(sent / max(seconds, 1e-9), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000, help="total, split evenly over the RPCs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    import platform

    with tempfile.TemporaryDirectory(prefix="samforge-fuzz-") as var:
        result = run(args.requests, args.seed, Path(var))
    machine = {"cpu": platform.processor() or platform.machine(), **cpu_model_and_isa(), "model": "tiny"}
    result = {"machine": machine, "date": datetime.date.today().isoformat(), **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fuzz-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("requests", "by_code", "broken", "serving_at_end", "requests_per_s")}))
    print(f"wrote {path}")
    return 1 if result["broken"] or not all(result["serving_at_end"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
