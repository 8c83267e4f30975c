"""The markdown summary of a speed run: ``markdown(results)`` renders ``speed.json``'s structure (the machine
line, then one section per part present, in the order encoder, int8, decoder, e2e, triton, finetune) as the
text written to ``speed.md``. Pure: no I/O, no measurement.
"""

from __future__ import annotations

import json
from typing import Any


def encoder_section(enc: dict[str, Any]) -> list[str]:
    """Table of encoder variants with speedups and the fractions of the fp32 / bf16 matmul peak."""
    lines = ["### Encoder (LiteMedSAM, 256 px)", "",
             "| variant | allocator | batch 1 s/img | batch 4 s/img | speedup b1 | speedup b4 | GFLOP/s b1 "
             "| of fp32/bf16 peak |", "|---|---|---|---|---|---|---|---|"]
    # without native bf16 the bf16 "peak" is an emulation far below fp32: a share of it means nothing
    emulated = enc["peak"]["matmul_peak_bf16_gflops"] < enc["peak"]["matmul_peak_fp32_gflops"]
    for r in enc["rows"]:
        bf16_share = "bf16 emulated" if emulated else f"{r['fraction_of_bf16_peak_batch1']:.0%}"
        fp32_share = f"{r['fraction_of_peak_batch1']:.0%}"
        if emulated and r["variant"].endswith("bf16"):
            fp32_share = f"{r['achieved_gflops_batch1'] / enc['peak']['matmul_peak_fp32_gflops']:.0%}"
        lines.append(f"| {r['label']} | {r['allocator']} | {r['batch1_s_per_image']} | {r['batch4_s_per_image']} "
                     f"| {r['speedup_batch1']}x | {r['speedup_batch4']}x | {r['achieved_gflops_batch1']} "
                     f"| {fp32_share} / {bf16_share} |")
    return lines + ["", f"Peak and FLOPs: {json.dumps(enc['peak'])}",
                    f"bf16 quality: {json.dumps(enc['bf16_quality'])}", ""]


def int8_section(int8: dict[str, Any]) -> list[str]:
    """The int8 figures as one JSON line."""
    return ["### Encoder int8 (ONNX Runtime quantize_dynamic, int8 weights) vs the fp32 ONNX graph", "",
            json.dumps(int8), ""]


def decoder_section(dec: dict[str, Any]) -> list[str]:
    """ms per prompt of every decoder by prompt count, speedups vs the SamPredictor loop in brackets."""
    keys = [k for k in dec["rows"][0] if k.endswith("ms/prompt")]
    lines = ["### Decoder (LiteMedSAM, box prompts on one embedding; ms per prompt, speedup vs the loop)", "",
             "| prompts | " + " | ".join(k.removesuffix(" ms/prompt") for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for r in dec["rows"]:
        cells = []
        for k in keys:
            name = k.removesuffix(" ms/prompt")
            speed = r.get(f"{name} speedup")
            cells.append(f"{r[k]}" + (f" ({speed}x)" if speed else ""))
        lines.append(f"| {r['prompts']} | " + " | ".join(cells) + " |")
    return lines + ["", f"Mask IoU of samforge vs the SamPredictor loop (64 prompts), min: "
                        f"{dec['mask_iou_vs_sampredictor_min']}", ""]


def e2e_section(e2e: dict[str, Any]) -> list[str]:
    """One row per server (the dict-valued entries), then the speedups."""
    lines = ["### End-to-end gRPC (1 image, 100 box prompts; 8 clients x one-box calls)", "",
             "| server | first call s | 100 one by one s (image each call) | 100 one by one s (embedding key) "
             "| 100 in one call s | 8 clients rps | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in e2e.items():
        if isinstance(r, dict):
            load = r["load_8_clients"]
            lines.append(f"| {name} | {r['first_call_s']} | {r['100_one_by_one_s']} "
                         f"| {r['100_one_by_one_by_key_s'] or 'n/a'} | {r['100_in_one_call_s']} "
                         f"| {load['throughput_rps']} | {load['p50_ms']} | {load['p99_ms']} | {load['errors']} |")
    return lines + ["", "Speedups: " + json.dumps({k: v for k, v in e2e.items() if k.startswith("speedup")}), ""]


def triton_section(tri: dict[str, Any]) -> list[str]:
    """One row per encoder path, then the added latency and the throughput ratio."""
    lines = ["### Encoder through Triton vs in-process (LiteMedSAM, same ONNX graph)", "",
             "| path | batch 1 ms/call | batch 4 s/img | 8 single-image callers img/s |", "|---|---|---|---|"]
    for name, r in tri["rows"].items():
        lines.append(f"| {name} | {r['batch1_ms_per_call']} | {r['batch4_s_per_image']} "
                     f"| {r.get('images_per_s_8_callers', 'n/a')} |")
    return lines + ["", "Added latency per call (batch 1, Triton - in-process ORT): "
                        f"{tri['added_ms_per_call_batch1']} ms; throughput ratio with 8 callers: "
                        f"{tri['throughput_ratio_triton_vs_in_process_ort']}x", ""]


def finetune_section(ft: dict[str, Any]) -> list[str]:
    """The fine-tuning figures as one JSON line."""
    return ["### Fine-tuning speed", "", json.dumps(ft), ""]


SECTIONS = (("encoder", encoder_section), ("int8", int8_section), ("decoder", decoder_section),
            ("e2e", e2e_section), ("triton", triton_section), ("finetune", finetune_section))


def markdown(results: dict[str, Any]) -> str:
    """``speed.md``: the machine, then a section for every part with a (non-empty) result."""
    lines = [f"Machine: {results['machine']}", ""]
    for part, section in SECTIONS:
        if results.get(part):
            lines += section(results[part])
    return "\n".join(lines)
