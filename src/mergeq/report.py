"""Readable Markdown tables from a pipeline's results dict."""
from __future__ import annotations

from typing import Any

from .eval.metrics import harmonic_mean


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    """Per-domain accuracy of each quantized expert (own domain) and of the merged model, plus hmean."""
    targets = results["targets"]
    src = results["source"]
    lines = [
        f"# {results['benchmark']}: quantize each expert, then merge (seed {results['seed']}, "
        f"preset {results.get('preset', '?')})",
        "",
        "Accuracy in %. `expert` = each quantized expert on its own domain; `merged` = the one "
        "merged model on every domain; hmean = harmonic mean over the targets. First and last "
        "layer at 8 bits unless the config says otherwise.",
        "",
        "| model | bits | " + " | ".join(f"{d} expert" for d in targets) + " | "
        + " | ".join(f"{d} merged" for d in targets) + " | merged hmean | s/expert |",
        "|---|---|" + "---:|" * (2 * len(targets) + 2),
    ]
    srow = " | ".join(_pct(src[d]) for d in targets)
    src_hmean = harmonic_mean([src[d] for d in targets])  # ``src`` also holds the source domain
    lines.append(f"| source (no adaptation) | FP32 | {srow} | {srow} | {_pct(src_hmean)} | |")
    fp = results["fp"]
    lines.append(
        "| experts, BN folded, averaged | FP32 | " + " | ".join(_pct(fp["experts"][d]) for d in targets) + " | "
        + " | ".join(_pct(fp["merged"][d]) for d in targets) + f" | {_pct(fp['merged']['hmean'])} | |"
    )
    mix = results.get("fp_bn_mixture")
    if mix:
        lines.append(
            "| experts, BN statistics mixed | FP32 | " + " | ".join("" for _ in targets) + " | "
            + " | ".join(_pct(mix[d]) for d in targets) + f" | {_pct(mix['hmean'])} | |"
        )
    for r in results["rows"]:
        a = r["a_bits"] if r["a_bits"] is not None else 32
        lines.append(
            f"| {r['method']} | W{r['w_bits']}A{a} | " + " | ".join(_pct(r["experts"][d]) for d in targets) + " | "
            + " | ".join(_pct(r["merged"][d]) for d in targets)
            + f" | **{_pct(r['merged']['hmean'])}** | {r.get('seconds_per_expert', r['seconds'] / len(targets)):.1f} |"
        )
    src_name = next(k for k in src if k not in targets and k != "hmean")
    lines += ["", f"Source model on its own test split ({src_name}): {_pct(src[src_name])}%.", ""]
    return "\n".join(lines)
