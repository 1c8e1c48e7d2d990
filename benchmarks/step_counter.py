"""Counting what one engine step costs the host: Triton launches, host->device transfers, syncs.

``StepCounter`` wraps the launch points and the torch entry points while it is active (no timing
anywhere); ``measure_execute`` counts one ``ModelRunner.execute`` call, and separately the part
inside ``model.forward``. Used by benchmarks/step_counts.py and tests/test_step_counts.py.

* ``launches``: Triton kernel launches (``JITFunction.run``, or the interpreter's
  ``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``), by kernel;
* ``h2d``: calls that move host data to the device on a GPU: ``torch.tensor/as_tensor(...,
  device=...)``, ``Tensor.to(<device>)``, ``Tensor.cuda()``, ``Tensor.copy_(<host tensor>)``.
  On a CPU-only machine the call is counted all the same: it names the device as its target;
* ``host_tensors``: tensors made from Python data on the host (``torch.tensor`` without a device);
* ``syncs``: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool/int/float(tensor)``,
  ``torch.cuda.synchronize()``: each waits for the device on a GPU;
* ``torch_ops``: aten ops dispatched (each is a kernel launch on a GPU), from a TorchDispatchMode.

Work done inside a Triton launch (the interpreter copies its arguments) is not counted. With
``run_kernels=False`` launches are counted but not executed: nothing counted depends on results.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class Counts:
    launches: Counter = field(default_factory=Counter)
    h2d: int = 0
    host_tensors: int = 0
    syncs: int = 0
    torch_ops: int = 0

    @property
    def num_launches(self) -> int:
        return sum(self.launches.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "launches": dict(self.launches), "num_launches": self.num_launches}


@dataclass
class StepCounts:
    step: Counts = field(default_factory=Counts)
    forward: Counts = field(default_factory=Counts)


class StepCounter:
    """Patches the launch and transfer points while active; ``measure(fn)`` counts one call of fn."""

    def __init__(self, runner, run_kernels: bool = True) -> None:
        self.runner = runner
        self.run_kernels = run_kernels
        self._local = threading.local()
        self._active: list[Counts] = []
        self._stack = contextlib.ExitStack()

    # ---- what is counted ----------------------------------------------------------------
    def _counting(self) -> bool:
        return bool(self._active) and not getattr(self._local, "in_launch", False)

    def _add(self, name: str, n: int = 1) -> None:
        if self._counting():
            for c in self._active:
                setattr(c, name, getattr(c, name) + n)

    def _launch(self, kernel_name: str) -> None:
        if self._counting():
            for c in self._active:
                c.launches[kernel_name] += 1

    # ---- patches ------------------------------------------------------------------------
    def __enter__(self) -> StepCounter:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        st = self._stack

        def patch(owner, name, make):
            original = getattr(owner, name)
            setattr(owner, name, make(original))
            st.callback(setattr, owner, name, original)

        for cls in _kernel_classes():
            patch(cls, "run", lambda orig: self._wrap_run(orig))

        def creation(orig):
            def wrapped(*args, **kwargs):
                counter._add("h2d" if kwargs.get("device") is not None else "host_tensors")
                return orig(*args, **kwargs)
            return wrapped

        for name in ("tensor", "as_tensor", "from_numpy"):
            patch(torch, name, creation)

        def to(orig):
            def wrapped(self_, *args, **kwargs):
                if _names_device(args, kwargs):
                    counter._add("h2d")
                return orig(self_, *args, **kwargs)
            return wrapped

        def copy_(orig):
            def wrapped(self_, src, *args, **kwargs):
                if isinstance(src, torch.Tensor) and src.device.type == "cpu":
                    counter._add("h2d")
                return orig(self_, src, *args, **kwargs)
            return wrapped

        def cuda(orig):
            def wrapped(*args, **kwargs):
                counter._add("h2d")
                return orig(*args, **kwargs)
            return wrapped

        def sync(orig):
            def wrapped(*args, **kwargs):
                counter._add("syncs")
                return orig(*args, **kwargs)
            return wrapped

        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "copy_", copy_)
        patch(torch.Tensor, "cuda", cuda)
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            patch(torch.Tensor, name, sync)
        patch(torch.cuda, "synchronize", sync)

        class OpCounter(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter._add("torch_ops")
                return func(*args, **(kwargs or {}))

        st.enter_context(OpCounter())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _wrap_run(self, original):
        counter = self

        def run(kernel, *args, **kwargs):
            counter._launch(getattr(kernel, "__name__", None) or kernel.fn.__name__)
            if not counter.run_kernels:
                return None
            counter._local.in_launch = True
            try:
                return original(kernel, *args, **kwargs)
            finally:
                counter._local.in_launch = False

        return run

    @contextlib.contextmanager
    def counting(self, counts: Counts) -> Iterator[None]:
        self._active.append(counts)
        try:
            yield
        finally:
            self._active.remove(counts)

    def measure_execute(self, out, page_table, rows) -> StepCounts:
        """Count one ``runner.execute(out, ...)``, and separately the model forward inside it."""
        result = StepCounts()
        model = self.runner.model
        forward = model.forward

        def counted_forward(*args, **kwargs):
            with self.counting(result.forward):
                return forward(*args, **kwargs)

        model.forward = counted_forward
        try:
            with self.counting(result.step):
                self.runner.execute(out, page_table, rows)
        finally:
            del model.forward
        return result


def _kernel_classes() -> list[type]:
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


def _names_device(args: tuple, kwargs: dict) -> bool:
    import torch

    if kwargs.get("device") is not None:
        return True
    for a in args:
        if isinstance(a, torch.device | torch.Tensor):
            return True
        if isinstance(a, str):
            with contextlib.suppress(RuntimeError):
                torch.device(a)
                return True
    return False
