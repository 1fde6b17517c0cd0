"""PNG plots of the analysis (matplotlib, Agg backend, atomic writes)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

from ..io import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: str | os.PathLike, title: str, rect: tuple = (0, 0, 1, 1)) -> Path:
    """Title (if any), tight layout within ``rect``, then the PNG at ``path``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=rect)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_paths(paths: Mapping[str, dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss and accuracy along the linear path, one line per model family (from ``linear_path``)."""
    plt = _pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, p in paths.items():
        ax_l.plot(p["lambda"], p["loss"], marker="o", ms=3, label=f"{name} (barrier {p['loss_barrier']:.3f})")
        ax_a.plot(p["lambda"], [100 * a for a in p["accuracy"]], marker="o", ms=3, label=name)
    ax_l.set(xlabel="λ", ylabel="cross-entropy", title="loss along θ_λ")
    ax_a.set(xlabel="λ", ylabel="accuracy (%)", title="accuracy along θ_λ")
    ax_l.legend(fontsize=7)
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
    return _finish(fig, path, title)


def plot_surfaces(surfaces: Mapping[str, dict], path: str | os.PathLike, title: str = "") -> Path:
    """One contour panel per model family (from ``loss_surface``), shared logarithmic colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    names = list(surfaces)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False)
    vmax = max(float(np.max(s["loss"])) for s in surfaces.values())
    vmin = min(float(np.min(s["loss"])) for s in surfaces.values())
    levels = np.geomspace(max(vmin, 1e-6), vmax, 15)
    for ax, name in zip(axes[0], names):
        s = surfaces[name]
        cs = ax.contourf(s["beta"], s["alpha"], np.array(s["loss"]), levels=levels, cmap="viridis", norm=LogNorm(levels[0], levels[-1]))
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
    fig.colorbar(cs, ax=axes[0].tolist(), shrink=0.8, label="cross-entropy (log scale)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_stream_errors(rows: list[Mapping], path: str | os.PathLike, title: str = "", smooth: int = 3) -> Path:
    """Error along a test-time stream (``mergeq tta`` rows): one panel per stream and bit width, one line
    per method (moving average over ``smooth`` batches); full-precision rows (bits ``FP32``) are drawn
    dashed in every panel of their stream; dotted lines mark where a new domain starts."""
    import numpy as np

    plt = _pyplot()
    streams = list(dict.fromkeys(r["stream"] for r in rows))
    bits = list(dict.fromkeys(r["bits"] for r in rows if r["bits"] != "FP32")) or ["FP32"]
    fig, axes = plt.subplots(len(streams), len(bits), figsize=(5.2 * len(bits), 3.2 * len(streams)),
                             squeeze=False, sharey=True)
    for i, s in enumerate(streams):
        for j, b in enumerate(bits):
            ax = axes[i, j]
            for r in rows:
                if r["stream"] != s or r["bits"] not in (b, "FP32"):
                    continue
                e = 100 * np.asarray(r["batch_error"], dtype=float)
                k = max(1, min(smooth, len(e)))
                e = np.convolve(e, np.ones(k) / k, mode="valid")
                ax.plot(np.arange(len(e)) + (k - 1) / 2, e, lw=1.2, ls="--" if r["bits"] == "FP32" else "-",
                        label=f"{r['method']} ({100 * r['mean_error']:.1f})")
            ref = next((r for r in rows if r["stream"] == s), None)
            if ref is not None:
                dom = ref["batch_domain"]
                starts = [t for t in range(len(dom)) if t == 0 or dom[t] != dom[t - 1]]
                for t in starts[1:]:
                    ax.axvline(t - 0.5, color="grey", lw=0.5, ls=":")
                ax.set_xticks(starts)
                ax.set_xticklabels([dom[t][:8] for t in starts], rotation=90, fontsize=6)
            ax.set_title(f"{s} stream, {b}", fontsize=9)
            ax.set_ylabel("error (%)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6, loc="upper left")
    return _finish(fig, path, title)


def plot_hmean_vs_bits(panels: Mapping[str, Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Merged hmean (%) against bit width: one panel per entry of ``panels`` (``{"lines": {method:
    {bits: (mean, std)}}, "fp": hmean or None}``), one line per method with the std as error bars,
    the full-precision merge as a dashed horizontal line. Bit widths are categories, in the order met."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        bits = list(dict.fromkeys(b for line in panel["lines"].values() for b in line))
        for method, line in panel["lines"].items():
            xs = [bits.index(b) for b in line]
            ax.errorbar(xs, [100 * m for m, _ in line.values()], yerr=[100 * s for _, s in line.values()],
                        marker="o", ms=4, capsize=3, label=method)
        if panel.get("fp") is not None:
            ax.axhline(100 * panel["fp"], color="black", ls="--", lw=1, label=f"FP merge ({100 * panel['fp']:.1f})")
        ax.set_xticks(range(len(bits)))
        ax.set_xticklabels(bits)
        ax.set(xlabel="bits", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("merged hmean (%)")
    return _finish(fig, path, title)


def plot_merged_vs_experts(panels: Mapping[str, Mapping[str, tuple[Mapping, Mapping]]], domains: list[str],
                           path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy (%) per target domain: one panel per bit width (``panels``: ``{bits: {method:
    (experts, merged)}}``, each a ``{domain: accuracy}`` fraction mapping), one bar per method for
    the merged model on that domain and a black diamond on it for the method's expert on its own
    domain, so the gap between them is what merging cost."""
    import numpy as np

    plt = _pyplot()
    per_panel = 1.0 + 0.45 * len(domains) * max(2, max(map(len, panels.values())))
    fig, axes = plt.subplots(1, len(panels), figsize=(per_panel * len(panels), 4.2), squeeze=False, sharey=True)
    methods = list(dict.fromkeys(m for p in panels.values() for m in p))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    x = np.arange(len(domains))
    for ax, (bits, panel) in zip(axes[0], panels.items()):
        width = 0.8 / len(panel)
        for i, (method, (experts, merged)) in enumerate(panel.items()):
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(pos, [100 * merged[d] for d in domains], width * 0.9, color=colours[method], label=method)
            ax.plot(pos, [100 * experts[d] for d in domains], "D", color="black", ms=4,
                    label="expert on its own domain" if i == 0 else None)
        ax.set_xticks(x)
        ax.set_xticklabels(domains, rotation=30 if len(domains) > 4 else 0, fontsize=8)
        ax.set(xlabel="target domain", title=bits, ylim=(0, 105))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("accuracy (%)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               title="bars: the merged model on each domain, per method", title_fontsize=8)
    return _finish(fig, path, title, rect=(0, 0.16, 1, 1))  # room for the legend below the panels


def _err(iv: Mapping) -> tuple[float, float]:
    """Lower and upper error-bar lengths of an interval (zero without one)."""
    if iv["low"] is None:
        return 0.0, 0.0
    return iv["mean"] - iv["low"], iv["high"] - iv["mean"]


def plot_compare(res: Mapping, path: str | os.PathLike, title: str = "") -> Path:
    """``mergeq compare``'s picture: left, each method's merged hmean (%) per bit pair with its 95%
    interval; right, each pair's paired difference (points) with its interval, against 0."""
    plt = _pyplot()
    bits = list(res["bits"])
    methods = list(res["bits"][bits[0]]["methods"])
    pairs = [f"{p['a']} − {p['b']}" for p in res["bits"][bits[0]]["pairs"]]
    fig, (ax_m, ax_d) = plt.subplots(1, 2, figsize=(10, 3.2 + 0.25 * len(pairs) * len(bits)),
                                     gridspec_kw={"width_ratios": [1, 1.2]})
    width = 0.7 / len(methods)
    for k, m in enumerate(methods):
        ivs = [res["bits"][b]["methods"][m] for b in bits]
        xs = [i - 0.35 + width * (k + 0.5) for i in range(len(bits))]
        ax_m.errorbar(xs, [iv["mean"] for iv in ivs], yerr=list(zip(*map(_err, ivs))), fmt="o", capsize=4, label=m)
    ax_m.set_xticks(range(len(bits)))
    ax_m.set_xticklabels(bits)
    ax_m.set_xlim(-0.5, len(bits) - 0.5)
    ax_m.set(xlabel="bits", ylabel="merged hmean (%)", title=f"per method, mean and 95% interval over {res['unit']}s")
    ax_m.legend(fontsize=7)
    rows = [(b, i) for b in bits for i in range(len(pairs))]
    for j, b in enumerate(bits):
        ps = res["bits"][b]["pairs"]
        ys = [len(rows) - 1 - rows.index((b, i)) for i in range(len(ps))]
        ax_d.errorbar([p["mean"] for p in ps], ys, xerr=list(zip(*map(_err, ps))), fmt="s", capsize=4,
                      color=f"C{j}", label=b)
    ax_d.axvline(0, color="black", lw=1, ls="--")
    ax_d.set_yticks(range(len(rows)))
    ax_d.set_yticklabels([f"{pairs[i]} ({b})" for b, i in reversed(rows)], fontsize=8)
    ax_d.set(xlabel="paired difference a − b (points of merged hmean)", title="paired differences, 95% interval")
    ax_d.legend(fontsize=7, title="bits", title_fontsize=7)
    for ax in (ax_m, ax_d):
        ax.grid(alpha=0.3)
    return _finish(fig, path, title)
