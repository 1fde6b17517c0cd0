"""Scratch check: does the digits benchmark + source training + SHOT give mergeable experts?

For each seed: train the source model, measure it on source test and every target
test split, adapt one SHOT expert per target, measure each expert on its own target,
then merge the experts two ways and report the merged model's per-target accuracy
and harmonic mean:
  * ``fold``: fold every BN into its conv (bias = beta - gamma*mu/sigma), average all weights;
  * ``bnmix``: average unfolded parameters, BN running stats as a mixture
    (mean of means; var = mean(var + mean^2) - merged_mean^2).

    PYTHONPATH=src python benchmarks/adaptation_check.py --preset quick --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
from torch import nn

from mergeq.adapt import shot, train_source
from mergeq.experiments import presets
from mergeq.data import digits
from mergeq.models import build_model


@torch.no_grad()
def accuracy(model: nn.Module, ds, bs: int = 500) -> float:
    model.eval()
    x, y = ds.tensors
    correct = sum((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item() for i in range(0, len(x), bs))
    return correct / len(x)


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold each BN into the conv before it, in place of an identity-like BN (eval-exact)."""
    model = copy.deepcopy(model).eval()
    mods = dict(model.named_modules())
    prev = None
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            conv = mods[prev]
            scale = m.weight / torch.sqrt(m.running_var + m.eps)
            with torch.no_grad():
                conv.weight.mul_(scale[:, None, None, None])
                m.bias.copy_(m.bias - scale * m.running_mean)
                m.weight.fill_(1.0)
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
        elif isinstance(m, nn.Conv2d):
            prev = name
    return model


@torch.no_grad()
def average(models: list[nn.Module], bn_mixture: bool) -> nn.Module:
    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    out = merged.state_dict()
    for k, v in out.items():
        if not v.is_floating_point():
            continue
        out[k] = torch.stack([sd[k] for sd in sds]).mean(0)
        if bn_mixture and k.endswith("running_var"):
            mk = k[: -len("running_var")] + "running_mean"
            ex2 = torch.stack([sd[k] + sd[mk] ** 2 for sd in sds]).mean(0)
            out[k] = ex2 - torch.stack([sd[mk] for sd in sds]).mean(0) ** 2
    merged.load_state_dict(out)
    return merged


def hmean(xs) -> float:
    xs = list(xs)
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def run(preset: str, seed: int, targets, overrides: dict) -> dict:
    arch, kw = presets.MODEL["name"], presets.MODEL["kwargs"]
    src_cfg, shot_cfg = presets.adapt(preset)
    src_cfg = dataclasses.replace(src_cfg, **overrides.get("source", {}))
    shot_cfg = dataclasses.replace(shot_cfg, **overrides.get("shot", {}))
    t0 = time.perf_counter()
    bench = digits.load_digits_benchmark(seed, targets)
    t_data = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = build_model(arch, bench.num_classes, **kw)
    t0 = time.perf_counter()
    source = train_source(model, bench.source.train, src_cfg, seed)
    t_src = time.perf_counter() - t0
    res = {"seed": seed, "source_test": accuracy(source, bench.source.test)}
    experts, t_shot = {}, 0.0
    for name, dom in bench.targets.items():
        res[f"src@{name}"] = accuracy(source, dom.test)
        t0 = time.perf_counter()
        experts[name] = shot(source, dom.train, shot_cfg, seed)
        t_shot += time.perf_counter() - t0
        res[f"exp@{name}"] = accuracy(experts[name], dom.test)
    for tag, merged in (("fold", average([fold_bn(e) for e in experts.values()], False)),
                        ("bnmix", average(list(experts.values()), True))):
        accs = {n: accuracy(merged, d.test) for n, d in bench.targets.items()}
        res.update({f"{tag}@{n}": a for n, a in accs.items()})
        res[f"{tag}_hmean"] = hmean(accs.values())
    res.update(t_data=t_data, t_source=t_src, t_shot=t_shot, t_total=t_src + t_shot)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick", choices=sorted(presets.PRESET_NAMES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", nargs="+", default=None)
    ap.add_argument("--source", default="{}", help="JSON overrides of SourceConfig fields")
    ap.add_argument("--shot", default="{}", help="JSON overrides of ShotConfig fields")
    ap.add_argument("--const", default="{}", help="JSON overrides of mergeq.data.digits constants")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for k, v in json.loads(args.const).items():
        setattr(digits, k, v)
    digits._photos.cache_clear()
    over = {"source": json.loads(args.source), "shot": json.loads(args.shot)}
    rows = [run(args.preset, s, args.targets, over) for s in args.seeds]
    keys = list(rows[0])
    for k in keys:
        vals = [r[k] for r in rows]
        fmt = (lambda v: f"{v:7.3f}") if isinstance(vals[0], float) else (lambda v: f"{v:7d}")
        print(f"{k:18s}" + "".join(fmt(v) for v in vals))


if __name__ == "__main__":
    main()
