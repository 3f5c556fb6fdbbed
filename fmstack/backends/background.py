"""A compiled step built in a child process while this one compiles another (`LoggedCompile.prebuild`).

Why: a cold compile is single-threaded Python (Dynamo's trace, AOTAutograd, Inductor's lowering and
code generation) for each step in turn, so on a 2-core machine one core idles while `fmstack
generate` compiles its prefill step and then its decode step. The decode step has no input that the
prefill step produces, only shapes, so a child process compiles it at the same time and saves it
whole to the compile cache (`fmstack.backends.precompile`); the parent loads that entry (well under
a second) when it reaches its first decode step, instead of compiling it after the prefill step
(docs/compile.md, "Cold compile", has the measured times).

The child gets the step's recipe (a picklable call that builds the same `LoggedCompile`) and its
arguments on stdin. Compiling needs only the arguments' structure (shapes, strides, dtypes, devices,
which tensors are inference tensors or parameters, the modules around them), not their values, so
every tensor travels as an empty one of the same layout: the message is small whatever the model's
size. The child runs under the parent's thread count and grad / inference mode, which the saved
guards check. It writes nothing but the entry (and Inductor's kernels) to the cache; its log goes to
a file the parent reads back when it failed. Any failure only means the parent compiles the step
itself, as without a child.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend

from fmstack.backends.precompile import DIM_MARKS

log = logging.getLogger(__name__)

CHILD = "from fmstack.backends.background import child_main; child_main()"


def _empty(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: str, inference: bool,
           parameter: bool, requires_grad: bool, marks: dict[str, set[int]]) -> Tensor:
    """An uninitialised tensor of the layout a parent's tensor had (rebuilt in the child), with its
    dimension marks (`mark_dynamic`, ...: they decide which sizes the graph keeps symbolic)."""
    with torch.inference_mode(inference):
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if parameter:
        t = nn.Parameter(t, requires_grad=requires_grad)
    elif requires_grad:
        t.requires_grad_(True)
    for attr, dims in marks.items():
        setattr(t, attr, set(dims))
    if marks:
        t._has_dynamo_dim_marking = True
    return t


def _sdp_backend(name: str) -> SDPBackend:
    return getattr(SDPBackend, name)


class _LayoutPickler(pickle.Pickler):
    """Pickles every tensor as its layout only (`_empty` rebuilds it), SDPA backends by name (a C enum
    pickle cannot find by its own name), everything else as usual."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Tensor) and type(obj) in (Tensor, nn.Parameter):
            marks = {attr: set(getattr(obj, attr)) for attr in DIM_MARKS if hasattr(obj, attr)}
            return _empty, (tuple(obj.shape), tuple(obj.stride()), obj.dtype, str(obj.device), obj.is_inference(),
                            isinstance(obj, nn.Parameter), obj.requires_grad, marks)
        if isinstance(obj, SDPBackend):
            return _sdp_backend, (obj.name,)
        return NotImplemented


def message(recipe: Callable[[], Any], args: tuple) -> bytes:
    """What the child reads: the recipe, the arguments' layouts and the process state the guards check."""
    buf = io.BytesIO()
    state = {"threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(),
             "inference": torch.is_inference_mode_enabled(), "dtype": torch.get_default_dtype()}
    _LayoutPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((recipe, args, state))
    return buf.getvalue()


class Child:
    """A running child compile: `wait()` -> whether it succeeded (its log tail is logged if not)."""

    def __init__(self, what: str, recipe: Callable[[], Any], args: tuple):
        self.what = what
        data = message(recipe, args)
        self.log_file = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.close()
        except OSError:  # the child died at once: wait() reports it
            pass

    def wait(self) -> bool:
        code = self.proc.wait()
        if code != 0:
            self.log_file.seek(0)
            tail = self.log_file.read().decode(errors="replace")[-2000:]
            log.warning("the background compile of %s failed (exit %d): compiling it here\n%s", self.what, code, tail)
        self.log_file.close()
        return code == 0


def child_main() -> None:
    """The child: read the message, build the step as the parent would, save it whole, exit."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipe, args, state = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["dtype"])
    with torch.inference_mode(state["inference"]), torch.set_grad_enabled(state["grad"]):
        step = recipe()
        if not step.save_whole(*args):
            sys.exit(3)  # it cannot be saved whole: the parent compiles it (and warns once)

