"""A logical CUDA device on the CPU: device-placement bugs caught without a GPU (issue 30, item 2).

``with LogicalCuda():`` makes ``cuda`` (and ``cuda:N``, N below ``devices``) a device that
computes on the CPU with real values but keeps its own identity: a tensor moved there
(``.to("cuda")``, ``.cuda()``, ``Module.to``, a factory's ``device=``) reports ``device ==
cuda:N``, ``is_cuda``, refuses ``.numpy()``, and any op that mixes it with a CPU tensor raises,
as CUDA does: ``Expected all tensors to be on the same device``. ``torch.cuda`` answers as a
GPU would (``is_available``, ``device_count``, ``synchronize``, ``mem_get_info`` with a chosen
free memory, ``Event``, the per-device random generators, ``max_memory_allocated``), pinned
memory is a no-op copy that stays on the CPU, and a CUDA generator (``torch.Generator(device=
"cuda")``) is its own stream of random numbers, which a CPU op refuses (and vice versa).

How, and why this way (measured on torch 2.13 CPU):

* A ``__torch_dispatch__`` wrapper subclass whose device is ``cuda`` (FakeTensor's approach, with
  real data inside) aborts the process at the first backward: autograd asks for the CUDA device
  guard, which a CPU build lacks (``PyTorch is not linked with support for cuda devices``).
  ``FakeTensorMode`` has no values, so data-dependent checks stop it (issue 30).
* So: a :class:`~torch.overrides.TorchFunctionMode` sees every torch call (functions, tensor
  methods, attribute reads such as ``.device``) and a tensor's logical device is its class
  (:class:`LogicalTensor`, :class:`LogicalParameter`, plain CPU storage) plus an ``_ldev``
  attribute. Autograd and every kernel stay plain CPU; outputs take their inputs' device (or a
  factory's ``device=``); ``param.data = t`` switches the parameter's class, so ``Module.to``
  keeps parameter identity as on a GPU.
* CUDA's exceptions are mirrored: a 0-dim CPU tensor may meet a CUDA tensor (TensorIterator's CPU
  scalars), indexing a CUDA tensor with CPU indices is allowed, ``copy_`` / ``to`` cross devices.

Limits (a bug of these kinds is not caught): checks stop inside a backward pass (the mode is
off while autograd runs, as gradients come back untagged); a composite torch call (``F.*``,
``nn.init.*``) is checked on its arguments only; the random streams of a logical device differ
from a real GPU's (same seed, other numbers); memory is not accounted (``max_memory_allocated``
is 0), but a move to the device or a ``device=`` factory there of more than ``max_alloc`` bytes
raises ``torch.OutOfMemoryError`` (an op's output never does). A 0-dim CPU parameter of a GPU
model is legal here as on CUDA: tests check where a model's tensors live themselves.

Measured: the tiny digits ``run`` (rtn, adaround, qdrop, hdrq, ttaq, gptq at W3A3, noise rounding)
on the logical GPU gives the same rows as on the CPU, bit for bit (a logical device's generator
draws the CPU's stream for the same seed), for about 22% more CPU time (13.0 s against 10.7 s;
439,000 torch calls seen).
"""
from __future__ import annotations

import contextlib
import copy
import time
from types import SimpleNamespace
from unittest import mock

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_DISABLED = torch._C._disabled_torch_function_impl
_CPU = torch.device("cpu")
MISMATCH = "Expected all tensors to be on the same device"


class LogicalTensor(torch.Tensor):
    """A CPU tensor that :class:`LogicalCuda` reports on the device ``_ldev``."""

    __torch_function__ = _DISABLED


class LogicalParameter(nn.Parameter):
    """An ``nn.Parameter`` on a logical device (``Module.to`` switches a parameter's class to it)."""

    __torch_function__ = _DISABLED


_LOGICAL = {torch.Tensor: LogicalTensor, nn.Parameter: LogicalParameter}
_PLAIN = {v: k for k, v in _LOGICAL.items()}
_RANDOM = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "normal_",
    "bernoulli", "bernoulli_", "multinomial", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "poisson", "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "native_dropout", "rrelu", "rrelu_", "gumbel_softmax", "trunc_normal_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_"})


def _logical_class(cls: type) -> type:
    if cls in _PLAIN:
        return cls
    if cls not in _LOGICAL:
        _LOGICAL[cls] = type(f"Logical{cls.__name__}", (cls,), {"__torch_function__": _DISABLED})
        _PLAIN[_LOGICAL[cls]] = cls
    return _LOGICAL[cls]


def logical_device(t: torch.Tensor) -> torch.device | None:
    """The logical device of ``t`` (None: an ordinary tensor on its real device)."""
    return t.__dict__["_ldev"] if type(t) in _PLAIN else None


def _tag(out, dev: torch.device, inputs: set[int]) -> None:
    """Put every fresh tensor of ``out`` (nested lists/tuples) on the logical device ``dev``, in place."""
    if isinstance(out, torch.Tensor):
        if type(out) not in _PLAIN and id(out) not in inputs:
            out.__class__ = _logical_class(type(out))
            out._ldev = dev
    elif isinstance(out, (list, tuple)):
        for o in out:
            _tag(o, dev, inputs)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    out.append(b)
                elif isinstance(b, (list, tuple)):
                    out.extend(c for c in b if isinstance(c, torch.Tensor))
    return out


def _mismatch(where: str, a: torch.device, b: torch.device) -> RuntimeError:
    return RuntimeError(f"{MISMATCH}, but found at least two devices, {a} and {b}! (logical CUDA harness, "
                        f"in {where})")


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


class _GeneratorMeta(type(torch._C.Generator)):
    def __instancecheck__(cls, obj) -> bool:  # every torch generator is a torch.Generator
        return isinstance(obj, torch._C.Generator)


class LogicalGenerator(torch._C.Generator, metaclass=_GeneratorMeta):
    """``torch.Generator`` while the harness is on: a CPU generator that may say it is CUDA's."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls)
        g._ldev = _ACTIVE[-1].norm(device) if _ACTIVE else None
        return g

    @property
    def device(self) -> torch.device:
        return self._ldev or _CPU


def _generator_device(g) -> torch.device:
    return getattr(g, "_ldev", None) or g.device


class _Event:
    """``torch.cuda.Event``: records the host time (the logical device has no queue)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        if _ACTIVE and _ACTIVE[-1].capturing is not None:
            raise GraphCaptureError("Event.synchronize is not allowed while a CUDA graph is captured")

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return 1000.0 * (end.t - self.t)


class _Stream:
    def __init__(self, device=None, priority: int = 0) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event


class GraphCaptureError(RuntimeError):
    """What a real CUDA graph capture refuses (an op that waits for the device, a copy from the
    host), or a replay that would not repeat what was captured."""


class _Graph:
    """``torch.cuda.CUDAGraph`` on the logical device. Capturing runs the block once on the CPU
    (a real capture runs nothing) and records every torch call it makes, with its non-tensor
    arguments and its tensors' shapes and dtypes; a call that synchronises with the host raises
    :class:`GraphCaptureError`, as capture does. ``replay()`` cannot run recorded kernels here:
    :func:`emulate_replay` re-runs the captured step instead and checks that it makes the same
    calls with the same arguments (a Python value that changed since the capture would be
    frozen in a real graph)."""

    def __init__(self, keep_graph: bool = False) -> None:
        self.trace: list | None = None
        self.ran = False  # the capture ran the step already: the first replay is that step

    def capture_begin(self, *args, **kwargs) -> None:
        harness = _ACTIVE[-1]
        if harness.capturing is not None:
            raise GraphCaptureError("a CUDA graph capture is already under way")
        self.trace, harness.capturing = [], self

    def capture_end(self) -> None:
        _ACTIVE[-1].capturing = None
        self.ran = True

    def replay(self) -> None:
        raise GraphCaptureError("the logical CUDA harness replays a captured step with emulate_replay()")


@contextlib.contextmanager
def _graph_ctx(graph: _Graph, pool=None, stream=None, capture_error_mode: str = "global"):
    graph.capture_begin()
    try:
        yield
    finally:
        graph.capture_end()


@contextlib.contextmanager
def replaying(graph: _Graph):
    """Within the block the torch calls must be those ``graph`` captured, in order, with the same
    arguments (:class:`GraphCaptureError` names the first difference); what synchronises raises
    as during the capture."""
    harness = _ACTIVE[-1]
    harness.replay_of, harness.replay_at = graph, 0
    try:
        yield
        if harness.replay_at != len(graph.trace):
            raise GraphCaptureError(f"the replayed step made {harness.replay_at} torch calls, the captured one "
                                    f"{len(graph.trace)}")
    finally:
        harness.replay_of = None


def emulate_replay(step_graph):
    """``mergeq.ptq.graphs.StepGraph.replay`` on the logical device: the first replay is the step
    the capture ran; later ones run the step again under :func:`replaying`."""
    graph = step_graph.graph
    if graph.ran:
        graph.ran = False
        return step_graph.out
    with replaying(graph):
        return step_graph.fn()


def _parse_to(rest: list, kwargs: dict) -> tuple:
    """(device, dtype, memory_format) of ``Tensor.to``'s arguments after the tensor (an int device
    is a CUDA ordinal, as torch reads it)."""
    rest, kw = list(rest), {k: v for k, v in kwargs.items() if k != "copy"}
    if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool):
        rest[0] = torch.device("cuda", rest[0])
    if isinstance(kw.get("device"), int) and not isinstance(kw["device"], bool):
        kw["device"] = torch.device("cuda", kw["device"])
    device, dtype, _, memory_format = torch._C._nn._parse_to(*rest, **kw)
    return device, dtype, memory_format


def _signature(func, args, kwargs) -> tuple:
    """A torch call as a graph sees it: the op, its non-tensor arguments, its tensors' shapes and dtypes."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), a.dtype)
        if isinstance(a, (list, tuple)):
            return tuple(arg(b) for b in a)
        if isinstance(a, dict):
            return tuple((k, arg(v)) for k, v in a.items())
        if isinstance(a, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size, slice)):
            return a
        return type(a).__name__  # modules, generators, functions: compared by kind only
    return (_name(func), arg(args), arg(kwargs))


# torch calls that wait for the device (or read its values on the host): refused by a capture
_SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "nonzero",
          "masked_select", "unique", "unique_consecutive", "argwhere", "equal", "allclose", "is_nonzero", "numpy",
          "__array__"}


_ACTIVE: list["LogicalCuda"] = []


class LogicalCuda(TorchFunctionMode):
    """The harness (module docstring): ``devices`` logical GPUs; ``mem_get_info`` reports ``free``
    of ``total`` bytes; one allocation above ``max_alloc`` bytes raises ``torch.OutOfMemoryError``.
    ``calls`` counts the torch calls seen, ``logical_calls`` those that computed on a logical device."""

    def __init__(self, devices: int = 1, free: int = 60 << 30, total: int = 80 << 30,
                 max_alloc: int | None = None) -> None:
        super().__init__()
        self.n, self.free, self.total, self.max_alloc = devices, free, total, max_alloc
        self.devs = [torch.device("cuda", i) for i in range(devices)]
        self.current = 0
        self.generators: list[LogicalGenerator] = []
        self.calls = self.logical_calls = 0
        self.capturing: _Graph | None = None  # a CUDA graph capture under way
        self.replay_of: _Graph | None = None  # a captured step being replayed (emulate_replay)
        self.replay_at = 0
        self._stack = contextlib.ExitStack()

    # --- devices ------------------------------------------------------------------------------
    def norm(self, d) -> torch.device | None:
        """``d`` as a logical device (``cuda:i``), or None for a real one (cpu, meta)."""
        if d is None:
            return None
        if isinstance(d, int) and not isinstance(d, bool):
            d = torch.device("cuda", d)
        d = torch.device(d)
        if d.type != "cuda":
            return None
        i = self.current if d.index is None else d.index
        if i >= self.n:
            raise RuntimeError(f"CUDA error: invalid device ordinal (cuda:{i}; the logical CUDA harness has "
                               f"{self.n} device(s))")
        return self.devs[i]

    def _index(self, device=None) -> int:
        d = self.norm("cuda" if device is None else device)
        if d is None:
            raise ValueError(f"Expected a cuda device, but got: {device}")
        return d.index

    def _common(self, where, tensors) -> torch.device | None:
        """The logical device the tensors share (None: none is logical); a mix raises, except for
        0-dim CPU tensors (CUDA's CPU scalars)."""
        dev = other = None
        for t in tensors:
            if type(t) in _PLAIN:
                d = t.__dict__["_ldev"]
                if dev is None:
                    dev = d
                elif d is not dev and d != dev:
                    raise _mismatch(_name(where), dev, d)
            elif other is None and (t.dim() != 0 or t.device.type != "cpu"):
                other = t.device
        if dev is not None and other is not None:
            raise _mismatch(_name(where), dev, other)
        return dev

    def _check_alloc(self, t: torch.Tensor, dev: torch.device) -> None:
        nbytes = t.numel() * t.element_size()
        if self.max_alloc is not None and nbytes > self.max_alloc:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {nbytes / 2**20:.2f} MiB. GPU {dev.index} has a total "
                f"capacity of {self.total / 2**30:.2f} GiB of which {self.free / 2**20:.2f} MiB is free.")

    # --- the mode -----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        name = getattr(func, "__name__", "")
        if name == "__get__" or name == "__set__":
            return self._attribute(func, name == "__get__", func.__self__.__name__, args)
        if self.capturing is not None or self.replay_of is not None:
            self._graph_call(func, name, args, kwargs)
        special = _SPECIAL.get(func)
        if special is not None:
            return special(self, func, args, kwargs)
        tensors = _tensors(args, kwargs)
        dev = self._common(func, tensors)
        explicit = pinned = False
        if kwargs:
            explicit, pinned = kwargs.get("device") is not None, kwargs.get("pin_memory") is True
        if explicit:
            target = self.norm(kwargs["device"])
            if target is not None:
                kwargs = {**kwargs, "device": "cpu"}
            dev = target
        if pinned:
            if dev is not None:
                raise RuntimeError("pin_memory: only dense CPU tensors can be pinned (logical CUDA harness)")
            kwargs = {**kwargs, "pin_memory": False}
        if name in _RANDOM:
            out = self._random(func, args, kwargs, dev)
        else:
            out = func(*args, **kwargs)
        if pinned and isinstance(out, torch.Tensor):
            out._lpinned = True
        if dev is not None:
            self.logical_calls += 1
            _tag(out, dev, {id(t) for t in tensors})
            if explicit and isinstance(out, torch.Tensor):
                self._check_alloc(out, dev)
        return out

    def _graph_call(self, func, name: str, args, kwargs) -> None:
        """A torch call inside a capture (recorded) or a replay (compared with the record); one that
        a capture refuses raises :class:`GraphCaptureError`."""
        what = _name(func)
        tensors = _tensors(args, kwargs)
        if name in _SYNCS and any(logical_device(t) is not None for t in tensors):
            raise GraphCaptureError(f"{what} reads a device value on the host: not allowed while a CUDA graph "
                                    "is captured (operation not permitted when stream is capturing)")
        if name == "repeat_interleave" and "output_size" not in kwargs:
            raise GraphCaptureError(f"{what} without output_size has a data-dependent size: it synchronises")
        if name == "__getitem__" and any(t.dtype == torch.bool for t in _tensors((args[1],), {})):
            raise GraphCaptureError(f"{what} with a boolean mask has a data-dependent size: it synchronises")
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        host = x is not None and logical_device(x) is None and x.dim() > 0
        if (name in ("to", "cuda") and host and self._target(name, args, kwargs) is not None) or (
                name == "copy_" and logical_device(x) is not None and logical_device(args[1]) is None
                and args[1].dim() > 0) or (
                name in ("tensor", "as_tensor") and self.norm(kwargs.get("device")) is not None):
            raise GraphCaptureError(f"{what} copies host data to the device: a pageable copy is not allowed while a "
                                    "CUDA graph is captured")
        sig = _signature(func, args, kwargs)
        if self.capturing is not None:
            self.capturing.trace.append(sig)
            return
        graph, k = self.replay_of, self.replay_at
        self.replay_at += 1
        if k >= len(graph.trace) or graph.trace[k] != sig:
            want = graph.trace[k] if k < len(graph.trace) else "nothing (the captured step had ended)"
            raise GraphCaptureError(f"replay differs from the capture at torch call {k}: captured {want}, now {sig}; "
                                    "a real graph would replay the captured call")

    def _target(self, name: str, args, kwargs) -> torch.device | None:
        """The logical device ``x.to(...)`` / ``x.cuda(...)`` moves to (None: a real device, or no move)."""
        rest = list(args[1:])
        if name == "cuda":
            return self.norm(rest[0] if rest else kwargs.get("device", "cuda"))
        if rest and isinstance(rest[0], torch.Tensor):
            return logical_device(rest[0])
        device = _parse_to(rest, kwargs)[0]
        return None if device is None else self.norm(device)

    def _attribute(self, func, get: bool, attr: str, args):
        x = args[0]
        dev = logical_device(x)
        if get:
            if attr == "device":
                return dev or func(*args)
            if attr == "is_cuda":
                return dev is not None or func(*args)
            if attr == "is_cpu":
                return dev is None and func(*args)
            out = func(*args)
            if dev is not None and isinstance(out, torch.Tensor):
                _tag(out, dev, {id(x)})
            return out
        value = args[1]
        if attr == "grad" and value is not None:
            self._common(f"Tensor.{attr} = ...", [x, value])
        out = func(*args)
        if attr == "data":  # Module.to sets param.data: the parameter itself moves (its identity kept)
            vdev = logical_device(value)
            if vdev is not None:
                x.__class__ = _logical_class(type(x))
                x._ldev = vdev
            elif dev is not None:
                x.__class__ = _PLAIN[type(x)]
                del x._ldev
        return out

    def _random(self, func, args, kwargs, dev):
        """A random op: a given generator must be on the output's device; without one, a logical
        device draws from its own generator (swapped in for the CPU's default one)."""
        g = kwargs.get("generator")
        if g is not None:
            gdev, odev = _generator_device(g), dev or _CPU
            if gdev.type != odev.type:
                raise RuntimeError(f"Expected a '{odev.type}' device type for generator but found '{gdev.type}' "
                                   f"(logical CUDA harness, in {_name(func)})")
            return func(*args, **kwargs)
        if dev is None:
            return func(*args, **kwargs)
        cpu, gen = torch.default_generator, self.generators[dev.index]
        saved = cpu.get_state()
        cpu.set_state(gen.get_state())
        try:
            return func(*args, **kwargs)
        finally:
            gen.set_state(cpu.get_state())
            cpu.set_state(saved)

    # --- tensor methods with device semantics -------------------------------------------------
    def _move(self, x: torch.Tensor, target: torch.device | None, dtype=None, copy_: bool = False,
              memory_format=None) -> torch.Tensor:
        src = logical_device(x)
        kw = {"memory_format": memory_format} if memory_format is not None else {}
        if target == src and not copy_:
            y = torch.Tensor.to(x, dtype=dtype or x.dtype, **kw)
            if src is not None:
                _tag(y, src, {id(x)})
            return y
        y = torch.Tensor.to(x, dtype=dtype or x.dtype, copy=True, **kw)
        if target is not None:
            _tag(y, target, set())
            self._check_alloc(y, target)
        return y

    def _to(self, func, args, kwargs):
        x, rest = args[0], list(args[1:])
        if rest and isinstance(rest[0], torch.Tensor):
            other = rest.pop(0)
            target, dtype = logical_device(other), other.dtype
            if other.device.type != "cpu" and target is None:
                return func(*args, **kwargs)
            return self._move(x, target, dtype, kwargs.get("copy", False), kwargs.get("memory_format"))
        device, dtype, memory_format = _parse_to(rest, kwargs)
        copy_ = kwargs.get("copy", False)
        if device is not None and device.type not in ("cpu", "cuda"):
            return func(*args, **kwargs)  # meta and friends: the real op
        target = logical_device(x) if device is None else self.norm(device)
        return self._move(x, target, dtype, copy_, memory_format)

    def _cuda(self, func, args, kwargs):
        device = args[1] if len(args) > 1 else kwargs.get("device")
        return self._move(args[0], self.norm("cuda" if device is None else device),
                          memory_format=kwargs.get("memory_format"))

    def _cpu(self, func, args, kwargs):
        x = args[0]
        return func(*args, **kwargs) if logical_device(x) is None else self._move(x, None, copy_=True)

    def _numpy(self, func, args, kwargs):
        dev = logical_device(args[0])
        if dev is not None:
            raise TypeError(f"can't convert {dev} device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        return func(*args, **kwargs)

    def _pin_memory(self, func, args, kwargs):
        x = args[0]
        if logical_device(x) is not None:
            raise RuntimeError(f"cannot pin a tensor on {logical_device(x)}: only dense CPU tensors can be pinned")
        y = x.clone()
        y._lpinned = True
        return y

    def _is_pinned(self, func, args, kwargs):
        return logical_device(args[0]) is None and bool(args[0].__dict__.get("_lpinned", False))

    def _get_device(self, func, args, kwargs):
        dev = logical_device(args[0])
        return func(*args, **kwargs) if dev is None else dev.index

    def _copy(self, func, args, kwargs):
        """Calls that may take tensors of two devices (``copy_``) and return no tensor on a new one."""
        return func(*args, **kwargs)

    def _new_tensor(self, func, args, kwargs):
        return self._factory_of(func, args, kwargs, logical_device(args[0]))

    def _factory_of(self, func, args, kwargs, dev):
        if kwargs.get("device") is not None:
            dev = self.norm(kwargs["device"])
            kwargs = {**kwargs, "device": "cpu"} if dev is not None else kwargs
        out = func(*args, **kwargs)
        if dev is not None:
            _tag(out, dev, {id(a) for a in args})
        return out

    def _index_tensors(self, where: str, x: torch.Tensor, index) -> list[torch.Tensor]:
        idx = _tensors(index if isinstance(index, tuple) else (index,), {})
        dev = logical_device(x)
        for t in idx:
            d = logical_device(t)
            if d is not None and d != dev:
                raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor "
                                   f"({dev or x.device}); got {d} (logical CUDA harness, in {where})")
        return idx

    def _getitem(self, func, args, kwargs):
        x = args[0]
        self._index_tensors("Tensor.__getitem__", x, args[1])
        out = func(*args, **kwargs)
        dev = logical_device(x)
        if dev is not None:
            _tag(out, dev, {id(x)})
        return out

    def _setitem(self, func, args, kwargs):
        x, index, value = args
        if self._index_tensors("Tensor.__setitem__", x, index) and isinstance(value, torch.Tensor):
            self._common("Tensor.__setitem__ (advanced indexing)", [x, value])  # index_put_
        return func(*args, **kwargs)

    def _deepcopy(self, func, args, kwargs):
        x, memo = args[0], args[1]
        if logical_device(x) is None or not x.is_leaf:
            return func(*args, **kwargs)
        if id(x) in memo:
            return memo[id(x)]
        with torch.no_grad():
            y = torch.Tensor.clone(x)
        y.requires_grad_(x.requires_grad)
        if x.grad is not None:
            y.grad = self._deepcopy(func, (x.grad, memo), {})
        y.__dict__.update(copy.deepcopy(x.__dict__, memo))
        y.__class__ = type(x)
        memo[id(x)] = y
        return y

    # --- torch.cuda ---------------------------------------------------------------------------
    def _get_rng_state(self, device="cuda"):
        self._no_capture("torch.cuda.get_rng_state")
        return self.generators[self._index(device)].get_state()

    def _set_rng_state(self, state, device="cuda"):
        self._no_capture("torch.cuda.set_rng_state")
        self.generators[self._index(device)].set_state(state)

    def _no_capture(self, what: str) -> None:
        if self.capturing is not None or self.replay_of is not None:
            raise GraphCaptureError(f"{what} is not allowed while a CUDA graph is captured")

    def _set_device(self, device) -> None:
        self.current = self._index(device)

    @contextlib.contextmanager
    def _device_ctx(self, device):
        before, self.current = self.current, self._index(device) if device is not None else self.current
        try:
            yield
        finally:
            self.current = before

    def _cuda_patches(self) -> dict:
        def seed_all(seed: int) -> None:
            for g in self.generators:
                g.manual_seed(seed)

        props = lambda device=None: SimpleNamespace(  # noqa: E731
            name="logical CUDA (CPU)", total_memory=self.total, multi_processor_count=1, major=9, minor=0)
        return {
            "is_available": lambda: True, "is_initialized": lambda: True, "init": lambda: None,
            "device_count": lambda: self.n, "current_device": lambda: self.current, "set_device": self._set_device,
            "device": self._device_ctx,
            "synchronize": lambda device=None: self._no_capture("torch.cuda.synchronize") or self._index(device) and None,
            "get_device_name": lambda device=None: "logical CUDA (CPU)", "get_device_properties": props,
            "get_device_capability": lambda device=None: (9, 0), "is_bf16_supported": lambda *a, **k: True,
            "mem_get_info": lambda device=None: (self.free, self.total),
            "max_memory_allocated": lambda device=None: 0, "memory_allocated": lambda device=None: 0,
            "max_memory_reserved": lambda device=None: 0, "memory_reserved": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: None, "empty_cache": lambda: None,
            "manual_seed": lambda seed: self.generators[self.current].manual_seed(seed) and None,
            "manual_seed_all": seed_all, "seed": lambda: self.generators[self.current].seed() and None,
            "seed_all": lambda: [g.seed() for g in self.generators] and None,
            "initial_seed": lambda: self.generators[self.current].initial_seed(),
            "get_rng_state": self._get_rng_state, "set_rng_state": self._set_rng_state,
            "get_rng_state_all": lambda: [g.get_state() for g in self.generators],
            "set_rng_state_all": lambda states: [g.set_state(s) for g, s in zip(self.generators, states)] and None,
            "default_generators": tuple(self.generators), "Event": _Event, "Stream": _Stream,
            "current_stream": lambda device=None: _Stream(), "default_stream": lambda device=None: _Stream(),
            "stream": lambda s=None: contextlib.nullcontext(), "CUDAGraph": _Graph, "graph": _graph_ctx,
            "is_current_stream_capturing": lambda: self.capturing is not None,
        }

    def __enter__(self):
        _ACTIVE.append(self)
        stack = self._stack.__enter__()
        stack.callback(_ACTIVE.pop)
        stack.enter_context(mock.patch.object(torch, "Generator", LogicalGenerator))
        self.generators = [LogicalGenerator(d) for d in self.devs]
        for g in self.generators:
            g.manual_seed(torch.initial_seed())
        for attr, value in self._cuda_patches().items():
            stack.enter_context(mock.patch.object(torch.cuda, attr, value, create=True))
        from mergeq.ptq.graphs import StepGraph

        stack.enter_context(mock.patch.object(StepGraph, "replay", emulate_replay))
        import torch.optim.optimizer as optimizer

        stack.enter_context(mock.patch.object(optimizer, "_foreach_supported_types",
                                              [*optimizer._foreach_supported_types, *_PLAIN]))
        super().__enter__()
        stack.callback(super().__exit__, None, None, None)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)


_T = torch.Tensor
_SPECIAL = {
    _T.to: LogicalCuda._to, _T.cuda: LogicalCuda._cuda, _T.cpu: LogicalCuda._cpu, _T.numpy: LogicalCuda._numpy,
    _T.__array__: LogicalCuda._numpy, _T.pin_memory: LogicalCuda._pin_memory, _T.is_pinned: LogicalCuda._is_pinned,
    _T.get_device: LogicalCuda._get_device, _T.copy_: LogicalCuda._copy, _T.new_tensor: LogicalCuda._new_tensor,
    _T.__getitem__: LogicalCuda._getitem, _T.__setitem__: LogicalCuda._setitem, _T.__deepcopy__: LogicalCuda._deepcopy,
    torch._has_compatible_shallow_copy_type: LogicalCuda._copy,
}
