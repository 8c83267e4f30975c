"""Recovery times after kill -9 of each service under load; writes bench/results/fault_recovery-<date>.json.

    python bench/fault_recovery.py [--repeats 3]

Starts the reliability suite's stack (tiny model, auth on, the decoder's embedding cache off so every Segment
reaches the encoder) and runs the scenarios of ``tests/reliability/faults.py`` (the same ones
``tests/reliability/test_faults.py`` asserts on): encoder killed under Segment load, decoder killed under Segment
load, trainer killed mid-job. Recorded per kill: seconds from the kill to SERVING again (the new process's
start-up, model load included) and to the first successful request that started after the kill; for the encoder
also the slowest UNAVAILABLE answer while it was down; for the trainer, kill to the job's SUCCEEDED.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's bench, tests, sam_core and services before any installed copy

from bench.speedparts.common import cpu_model_and_isa  # noqa: E402


def segment_kill(services: Any, specs: Any, label: str) -> dict[str, float]:
    import grpc

    from tests.reliability.faults import SegmentLoad, kill_and_restart, segment_request
    from tests.reliability.harness import AS_A, Clients

    with Clients({name: s.address for name, s in services.items()}) as clients:
        key = clients.decoder.Segment(segment_request(), metadata=AS_A, timeout=60).embedding_key
    with SegmentLoad(services["decoder"].address, segment_request(key)) as load:
        load.first_ok_after(0.0)
        times = kill_and_restart(services, label, specs)
        first = load.first_ok_after(times["killed_at"])
    failed = [t.end - t.start for t in load.outcomes
              if t.start > times["killed_at"] and t.code == grpc.StatusCode.UNAVAILABLE]
    return {"kill_to_serving_s": times["kill_to_serving_s"],
            "kill_to_first_ok_s": round(first.end - times["killed_at"], 2),
            "slowest_unavailable_s": round(max(failed, default=0.0), 3), "unavailable_answers": len(failed)}


def trainer_kill(services: Any, specs: Any, attempt: int) -> dict[str, float]:
    from tests.reliability.faults import train_through_a_kill

    result = train_through_a_kill(services, specs, name=f"resumed-{attempt}")
    return {"kill_to_serving_s": result["kill_to_serving_s"],
            "kill_to_succeeded_s": round(time.monotonic() - result["killed_at"], 2),
            "killed_at_step": result["killed_at_step"], "resumed_from_step": result["resumed_from_step"],
            "state": int(result["final"].state)}


def run(repeats: int, root: Path) -> dict[str, list[dict[str, float]]]:
    from services.common.net import free_port
    from tests.conftest import write_blob_dataset
    from tests.integration.conftest import started
    from tests.reliability.harness import prepare, stack_specs

    env = {**prepare(root), "SAMFORGE_DECODER_CACHE_BYTES": "0"}
    write_blob_dataset(root / "data" / "acme" / "blobs")
    specs = stack_specs(root, env, free_port())
    runs: dict[str, list[dict[str, float]]] = {"encoder": [], "decoder": [], "trainer": []}
    with started(specs) as services:
        for attempt in range(repeats):
            for label in ("encoder", "decoder"):
                runs[label].append(segment_kill(services, specs, label))
                print(json.dumps({label: runs[label][-1]}), flush=True)
            runs["trainer"].append(trainer_kill(services, specs, attempt))
            print(json.dumps({"trainer": runs["trainer"][-1]}), flush=True)
    return runs


def summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median of each number over the repeats."""
    return {label: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for label, rows in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="samforge-faults-") as root:
        runs = run(args.repeats, Path(root))
    result = {"machine": {"cpu": platform.processor() or platform.machine(), **cpu_model_and_isa(), "model": "tiny",
                          "threads_per_service": 1},
              "date": datetime.date.today().isoformat(), "median": summary(runs), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fault_recovery-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["median"], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
