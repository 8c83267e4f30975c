"""``samforge data check DATA [--model M] [--json F]``: data diagnostics before training.

Prints :meth:`sam_core.data.diagnostics.DataReport.summary` (instance sizes at the model's input scale,
unresolvable instances, duplicates, excluded masks, recommended flags) and writes the JSON report to ``--json``.
A missing path or an unreadable layout is an error (exit 2); findings are not (exit 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_data_args(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("data", help="data set tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    check = dsub.add_parser("check", help="diagnose a data set for a model: sizes at input scale, specks, advice")
    check.add_argument("data", help="folder (images/ + masks/ or masks_instances/), COCO .json, or npz folder")
    check.add_argument("--model", default="litemedsam", help="model whose input scale to judge sizes at")
    check.add_argument("--min-area", type=int, default=0, help="drop instances smaller than this (pixels) first")
    check.add_argument("--json", help="also write the full report (every unresolvable instance) to this file")
    check.add_argument("--max-listed", type=int, default=20, help="unresolvable instances listed in the summary")
    check.set_defaults(func=cmd_data_check)


def cmd_data_check(args: argparse.Namespace) -> int:
    from sam_core.data.dataset import load_dataset
    from sam_core.data.diagnostics import diagnose
    from sam_core.errors import InvalidInput
    from sam_core.files import atomic_write_text
    from sam_core.modeling.registry import SPECS

    if args.model not in SPECS:
        raise InvalidInput(f"unknown model {args.model!r}; known: {', '.join(sorted(SPECS))}", field="model")
    report = diagnose(load_dataset(args.data, min_area=args.min_area), SPECS[args.model])
    print(report.summary(max_listed=args.max_listed))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report.to_json(), indent=1, allow_nan=False))
    return 0
