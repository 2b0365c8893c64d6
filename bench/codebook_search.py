"""Benchmark: the i-quant codeword search's pruned candidate lists against the full search, on real layers.

The codebook grid (``turboboa/formats/codebook.py``) searches every codeword of a vector, but prices the
single sign flips of the parity rule only for the ``FLIP_CANDIDATES`` best codewords (falling back to every
codeword where that may miss the best under a diagonal metric), and tries the sub-block trial scales with only
the ``FIT_CANDIDATES`` nearest codewords. This script quantizes real layers with GPTQ onto each i-quant type
twice, with those lists as shipped and with every codeword in both, and compares the layer loss
``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` (``H = 2 X X^T / n`` from the calibration inputs of the layer) and
the solve time. Layers: the q, k, v, gate, up and down projections (``--roles``) of chosen blocks of a model whose widths
take 256-column blocks (Qwen2.5-Coder-1.5B by default), inputs from WikiText-2 calibration windows.

Results: ``bench/results/codebook-search.{json,md}`` with each row's provenance (``bench/provenance.py``); a row
is reused only when its settings, data, machine and versions match (``--fresh``: measure again).

    .venv/bin/python bench/codebook_search.py --model qwen2.5-coder-1.5b --blocks 0,1 --nsamples 8 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402

from turboboa.blockwise import quantize_layer  # noqa: E402
from turboboa.config import QuantConfig  # noqa: E402
from turboboa.formats import codebook  # noqa: E402
from turboboa.solvers import LayerProblem  # noqa: E402

ROLES = ("q", "k", "v", "gate", "up", "down")


def layer_inputs(model_spec: str, blocks: list[int], roles: list[str], nsamples: int, seqlen: int,
                 seed: int) -> dict[str, Any]:
    """The float model's layers of ``blocks`` by name: ``(W, H)`` with ``H = 2 X X^T / n`` over the calibration
    tokens, the inputs caught by forward pre-hooks while the first ``max(blocks) + 1`` blocks run."""
    from turboboa.arch import get_adapter
    from turboboa.data import calibration_batch
    from turboboa.models import load_float_model

    fm = load_float_model(model_spec)
    model, adapter = fm.model.eval(), get_adapter(fm.model)
    ids = calibration_batch(fm.tokenizer, "wikitext2", nsamples, seqlen, seed)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for i in blocks:
        block = adapter.blocks(model)[i]
        for role in roles:
            name = f"{i}.{role}"

            def hook(module: Any, args: tuple, name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            hooks.append(adapter.linear(block, role).register_forward_pre_hook(hook))
    last = max(blocks)
    with torch.no_grad():
        for row in ids:
            h = adapter.embed(model, row[None])
            cos, sin = adapter.rotary_cos_sin(model, h.shape[1], h.device)
            for block in adapter.blocks(model)[: last + 1]:
                h = adapter.block_forward(block, h, cos, sin)
    for hk in hooks:
        hk.remove()
    out = {}
    for i in blocks:
        block = adapter.blocks(model)[i]
        for role in roles:
            name = f"{i}.{role}"
            out[name] = (adapter.linear(block, role).weight.detach().float().clone(), 2 * sums[name] / counts[name])
    return out


def relative_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``."""
    E = W - Q
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


def solve(W: torch.Tensor, H: torch.Tensor, fmt: str, full: bool) -> tuple[float, float]:
    """GPTQ onto ``fmt``: the relative loss and the seconds, with the shipped candidate lists or every codeword."""
    saved = codebook.FIT_CANDIDATES, codebook.FLIP_CANDIDATES
    if full:
        codebook.FIT_CANDIDATES = codebook.FLIP_CANDIDATES = 1 << 20
    try:
        t0 = time.perf_counter()
        q = quantize_layer(LayerProblem("layer", W.clone(), H, fmt=fmt), QuantConfig(method="gptq", format=fmt))
        seconds = time.perf_counter() - t0
    finally:
        codebook.FIT_CANDIDATES, codebook.FLIP_CANDIDATES = saved
    return relative_loss(W, q.dequantize().float(), H), seconds


def write_table(doc: dict, path: Path) -> None:
    """The markdown table: per type and layer, both losses, their ratio and times; then the provenance."""
    s = doc["settings"]
    legend = pv.Legend()
    lines = [f"# i-quant codeword search: pruned candidate lists against the full search ({s['model']})", "",
             f"GPTQ onto each type; layers of blocks {s['blocks']}; H from {s['nsamples']} x {s['seqlen']} "
             f"WikiText-2 calibration tokens (seed {s['seed']}). Loss = tr((W - Q) H (W - Q)^T) / tr(W H W^T); "
             "pruned: the shipped lists (flips priced for the best 16 codewords, trial scales with the nearest "
             "8), full: every codeword in both.", "",
             "| type | layer | loss pruned | loss full | pruned / full - 1 | seconds pruned | seconds full | provenance |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"].values():
        lines.append(f"| {r['format']} | {r['layer']} | {r['loss_pruned']:.6f} | {r['loss_full']:.6f} | "
                     f"{r['loss_pruned'] / r['loss_full'] - 1:+.3%} | {r['seconds_pruned']:.1f} | "
                     f"{r['seconds_full']:.1f} | {legend.cell(r)} |")
    lines += ["", *legend.section()]
    pv.write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--blocks", default="0,1")
    ap.add_argument("--formats", default="iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq1_s")
    ap.add_argument("--roles", default=",".join(ROLES), help="the layers of each block, by role")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=pv.RESULTS)
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    blocks = [int(b) for b in a.blocks.split(",")]
    roles = a.roles.split(",")
    settings = {"model": a.model, "blocks": blocks, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                "method": "gptq", "fit_candidates": codebook.FIT_CANDIDATES,
                "flip_candidates": codebook.FLIP_CANDIDATES}
    data = {"calibration": pv.calibration_data(a.nsamples, a.seqlen)}
    out_json = a.out / "codebook-search.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {}
    if doc.get("settings") != pv.normalized(settings):
        doc = {"settings": settings, "rows": {}}
    todo = [(f, name) for f in a.formats.split(",") for name in (f"{i}.{r}" for i in blocks for r in roles)
            if not ctx.reuse(f"{f} {name}", doc["rows"].get(f"{f} {name}"), {**settings, "format": f}, data)]
    layers = layer_inputs(a.model, blocks, roles, a.nsamples, a.seqlen, a.seed) if todo else {}
    for fmt, name in todo:
        meter = pv.RowMeter()
        W, H = layers[name]
        loss_pruned, sec_pruned = solve(W, H, fmt, full=False)
        loss_full, sec_full = solve(W, H, fmt, full=True)
        doc["rows"][f"{fmt} {name}"] = {
            "format": fmt, "layer": name, "loss_pruned": loss_pruned, "loss_full": loss_full,
            "seconds_pruned": sec_pruned, "seconds_full": sec_full,
            "provenance": ctx.record({**settings, "format": fmt}, data, meter.result())}
        print(f"{fmt} {name}: pruned {loss_pruned:.6f} ({sec_pruned:.1f} s), full {loss_full:.6f} "
              f"({sec_full:.1f} s)", flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        pv.write_json_atomic(out_json, doc)
        write_table(doc, a.out / "codebook-search.md")


if __name__ == "__main__":
    main()
