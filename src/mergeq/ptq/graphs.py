"""A reconstruction step as one CUDA graph (issue 30, item 3): the step launched with one call.

On a GPU the eager step is launch-bound: a few hundred small kernels per step (fake
quantization forward and backward, QDrop masks, HDRQ's noise, soft rounding, Adam), each paying
Python and dispatch time on the host while the GPU waits. :class:`StepGraphs` records the step
(mini-batch gather, forward, loss, backward, Adam) once per *phase* with ``torch.cuda.graph`` and
then replays it, one launch per step.

What a graphed step needs, and how the loop provides it (:mod:`mergeq.ptq.recon`):

* **No host synchronisation inside**: mini-batch indices are drawn on the device, no branch
  reads a device value, TTAQ's perturbed pass reuses the step's QDrop masks instead of replaying
  the random state (``torch.cuda.get_rng_state`` is illegal while capturing).
* **Static inputs**: the step reads its batch from buffers it fills itself (``UnitBatches``).
* **Scalars that change per step live on the device**: the learning rates (Adam with
  ``capturable=True`` and tensor learning rates) and AdaRound's β are 0-dim device tensors,
  updated in place before each replay (:class:`StepScalars`); in an eager step they stay floats.
* **Phases**: what changes the step's code (AdaRound's regulariser switching on after the
  warm-up, HDRQ's switch from noise to fake quantization) is the hooks' ``phase``; each phase is
  captured once, after ``WARMUP`` eager steps of it on a side stream (as PyTorch's CUDA-graph
  recipe asks), and the previous phase's graph is released.

A random op in a graph draws fresh numbers at every replay (PyTorch registers the device's
generator with the capture). A capture that fails (an op that synchronises, say) logs a
warning and the unit goes on eagerly: the results are the eager loop's.
"""
from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

log = logging.getLogger(__name__)
WARMUP = 3  # eager steps of a phase before it is captured


class StepScalars:
    """The per-step scalars of a unit's step, by name: the value itself in an eager step; when
    ``graphed``, one 0-dim tensor on ``device`` per name, updated in place (a replayed graph
    reads its current value)."""

    def __init__(self, device: torch.device, graphed: bool) -> None:
        self.device, self.graphed = device, graphed
        self._t: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, value: float) -> float | torch.Tensor:
        if not self.graphed:
            return value
        t = self._t.get(name)
        if t is None:
            t = self._t[name] = torch.full((), float(value), device=self.device)
        else:
            t.fill_(float(value))
        return t


class StepGraph:
    """``fn`` (a step returning its loss) captured as one CUDA graph; :meth:`replay` runs it."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device) -> None:
        self.fn, self.graph = fn, torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class StepGraphs:
    """The steps of one unit: eager for the first ``WARMUP`` steps of each phase (on a side
    stream), then replays of that phase's captured graph. ``enabled=False`` runs every step
    eagerly on the current stream."""

    def __init__(self, device: torch.device, enabled: bool, name: str = "") -> None:
        """``name``: the unit's first layer, for the warning."""
        self.device, self.enabled, self.name = device, enabled, name
        self.key: Hashable = object()
        self.graph: StepGraph | None = None
        self.seen = 0
        self.captured = 0  # graphs captured (one per phase)

    def __call__(self, key: Hashable, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return fn()
        if key != self.key:  # a new phase: the old graph goes, its steps run eagerly first
            self.key, self.graph, self.seen = key, None, 0
        if self.graph is not None:
            return self.graph.replay()
        if self.seen < WARMUP:
            self.seen += 1
            return self._side_stream(fn)
        try:
            self.graph = StepGraph(fn, self.device)
        except RuntimeError as e:  # an op that cannot be captured: this unit goes on eagerly
            log.warning("the reconstruction unit with layer %s: its step cannot be captured as a CUDA graph (%s); "
                        "it runs eagerly", self.name or "<model>", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.enabled, self.graph = False, None
            return fn()
        self.captured += 1
        return self.graph.replay()

    def _side_stream(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = fn()
        current.wait_stream(side)
        return out
