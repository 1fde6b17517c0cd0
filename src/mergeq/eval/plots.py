"""PNG plots of the analysis (matplotlib, Agg backend, atomic writes)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path


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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


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
