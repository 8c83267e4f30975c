"""A training pod's main process: torchrun, exiting with the status of the rank that ended the run.

torchrun exits 1 whenever a rank fails, whatever that rank's own exit status was; the Job's podFailurePolicy
needs the status ``samforge train`` chose (:mod:`services.trainer.worker`: 2 bad input, 3 rejected by the
publishing guard — a retry cannot change them, so they fail the Job at once). So the pod runs

    python -m services.trainer.pod_entry <torchrun options> --no-python samforge train ...

which is torchrun itself, run in this process (its agent handles the kubelet's SIGTERM as usual), and on a
failure exits with :func:`pod_exit_status` of the ranks' exit statuses that torchrun reports (its
``ChildFailedError``): the rank that failed on its own decides, not the ranks torchrun then stopped. Anything
else that ends torchrun (a rendezvous that never forms, the kubelet's SIGTERM) exits 1: retried.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence

from .worker import EXIT_CODES, WorkerStatus

log = logging.getLogger("samforge.trainer")

EXIT_STOPPED = EXIT_CODES[WorkerStatus.STOPPED]
EXIT_FAILED = EXIT_CODES[WorkerStatus.FAILED]


def pod_exit_status(failures: Mapping[int, int]) -> int:
    """The pod's exit status from ``{global rank: exit status}`` of the ranks that failed (a negative status:
    killed by that signal).

    Once one rank fails, torchrun sends SIGTERM to the others: they die of it or stop on it (status 4), so
    those statuses are reactions, not causes. The lowest rank that exited with another status > 0 decides
    (rank 0 when it is among them: it is the one that evaluates, so 3 only ever comes from it); when every
    failed rank was stopped or killed, the run crashed: 1."""
    for rank in sorted(failures):
        status = failures[rank]
        if status > 0 and status != EXIT_STOPPED:
            return status
    return EXIT_FAILED


def run_torchrun(args: Sequence[str]) -> int:
    """torchrun with ``args`` in this process; its exit status as :func:`pod_exit_status` says."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(args))
    except ChildFailedError as exc:
        statuses = {int(rank): int(failure.exitcode) for rank, failure in exc.failures.items()}
        status = pod_exit_status(statuses)
        log.error("training ranks failed %s: the pod exits %d", statuses, status)
        return status
    except Exception:  # torchrun has logged it (rendezvous, the kubelet's SIGTERM as SignalException)
        log.exception("torchrun ended without its ranks' statuses: the pod exits %d", EXIT_FAILED)
        return EXIT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
