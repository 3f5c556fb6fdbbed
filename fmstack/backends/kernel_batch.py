"""The C++ kernels of one Inductor graph built as a few translation units instead of one each.

With the Python wrapper (what a graph with compile regions gets, `backends/inductor.py`) Inductor
builds every CPU kernel as a library of its own: one g++ run per kernel, each loading the 150 MB
precompiled header of Inductor's vector library and compiling Python bindings. For the default
model's prefill + decode graphs that was 16 runs, 12-14 CPU s; the same 16 kernels as one
translation unit took 1.9 s and as two 1.6 + 1.4 s (2-core Xeon, g++ 12, docs/compile.md "Cold
compile: where the time goes").

So while a wrapper module is loaded, its `async_compile.cpp_pybinding(argtypes, source)` calls are
collected (`AsyncCompile.cpp_pybinding`, patched here) and built when the module waits for them
(`AsyncCompile.wait`) or one of them is first used: the kernels, each in a namespace of its own, as
one library per compile worker with fmstack's own Python bindings (one function per kernel), through
Inductor's code cache (same flags, same vector ISA, same precompiled header, the library found by its
source hash next time: a warm process that loads the same wrapper builds nothing). The kernel code is
Inductor's, unchanged. A kernel this does not recognise (not exactly one `extern "C" void kernel(`, an
argument type it does not convert) is built as Inductor builds it, and so is every kernel of a library
that fails to build (one warning). `FMSTACK_BATCH_KERNELS=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from fmstack.backends.gate import symbol, warn_once

log = logging.getLogger(__name__)

ENV_SWITCH = "FMSTACK_BATCH_KERNELS"
_ENTRY = re.compile(r'extern\s+"C"\s+void\s+kernel\s*\(')
_INTEGER = {"int64_t", "long", "int", "int32_t", "uint64_t", "unsigned long"}
_FLOAT = {"float", "double"}
_installed: dict[str, Any] = {}
_lock = threading.Lock()

_BINDINGS = """
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdint>
#include <cstdlib>
namespace fmstack_bind {
static void* (*tensor_data)(PyObject*) = nullptr;
template <typename T> inline T arg(PyObject* a) { return static_cast<T>(tensor_data(a)); }
template <> inline int64_t arg<int64_t>(PyObject* a) { return static_cast<int64_t>(PyLong_AsLongLong(a)); }
template <> inline double arg<double>(PyObject* a) { return PyFloat_AsDouble(a); }
template <> inline bool arg<bool>(PyObject* a) { return PyObject_IsTrue(a) == 1; }
inline bool arity(PyObject* args, Py_ssize_t n, const char* name) {
  if (PyTuple_CheckExact(args) && PyTuple_GET_SIZE(args) == n) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments", name, n);
  return false;
}
}  // namespace fmstack_bind
"""

_INIT = """
static PyMethodDef fmstack_methods[] = {
%s
  {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef fmstack_module = {PyModuleDef_HEAD_INIT, "kernel", nullptr, -1, fmstack_methods};
PyMODINIT_FUNC PyInit_kernel(void) {
  const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
  char* end = nullptr;
  uintptr_t value = address ? std::strtoull(address, &end, 10) : 0;
  if (value == 0) {
    PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR not set");
    return nullptr;
  }
  fmstack_bind::tensor_data = reinterpret_cast<void* (*)(PyObject*)>(value);
  return PyModule_Create(&fmstack_module);
}
"""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def converter(argtype: str) -> str | None:
    """The C++ type `fmstack_bind::arg<T>` converts a Python argument of Inductor's `argtype` to; None
    for a type it does not handle."""
    base = argtype.replace("const ", "").strip()
    if base.endswith("*"):
        return base
    if base in _INTEGER:
        return "int64_t"
    if base in _FLOAT:
        return "double"
    return "bool" if base == "bool" else None


def batchable(argtypes: list[str], source: str) -> bool:
    return len(_ENTRY.findall(source)) == 1 and all(converter(a) is not None for a in argtypes)


def _binding(index: int, argtypes: list[str]) -> str:
    """The Python-callable `kernel<index>` that converts its arguments and calls `k<index>::kernel`."""
    lines = [f"static PyObject* call{index}(PyObject*, PyObject* args) {{",
             f'  if (!fmstack_bind::arity(args, {len(argtypes)}, "kernel{index}")) return nullptr;']
    for n, argtype in enumerate(argtypes):
        lines.append(f"  auto a{n} = fmstack_bind::arg<{converter(argtype)}>(PyTuple_GET_ITEM(args, {n}));")
    lines.append("  if (PyErr_Occurred()) return nullptr;")
    call = ", ".join(f"static_cast<{a.strip()}>(a{n})" for n, a in enumerate(argtypes))
    lines += [f"  k{index}::kernel({call});", "  Py_RETURN_NONE;", "}"]
    return "\n".join(lines)


def merged_source(kernels: list[tuple[list[str], str]]) -> str:
    """One translation unit for `kernels` ((argtypes, source) pairs that are `batchable`): their
    includes once, each kernel in namespace `k<i>` (its entry no longer `extern "C"`), a binding
    `kernel<i>` per kernel and the module init Inductor's loader imports (`PyInit_kernel`)."""
    includes: list[str] = []
    bodies = []
    for index, (_, source) in enumerate(kernels):
        lines = []
        for line in source.splitlines():
            if line.lstrip().startswith("#include"):
                if line.strip() not in includes:
                    includes.append(line.strip())
            else:
                lines.append(line)
        body = _ENTRY.sub("void kernel(", "\n".join(lines), count=1)
        bodies.append(f"namespace k{index} {{\n{body}\n}}  // namespace k{index}\n")
    methods = "\n".join(f'  {{"kernel{i}", call{i}, METH_VARARGS, nullptr}},' for i in range(len(kernels)))
    bindings = "\n".join(_binding(i, argtypes) for i, (argtypes, _) in enumerate(kernels))
    return "\n".join(includes) + "\n" + "".join(bodies) + _BINDINGS + bindings + _INIT % methods


class KernelBatch:
    """The kernels one wrapper module asked for so far (`add`), built together on `flush`."""

    def __init__(self, submit: Callable | None, workers: int):
        self.submit, self.workers = submit, max(1, workers)
        self.pending: list[tuple[list[str], str]] = []
        self.results: list[Callable[[], Any]] = []

    def add(self, argtypes: list[str], source: str) -> Any:
        index = len(self.pending)
        self.pending.append((list(argtypes), source))
        return _installed["codecache"].LambdaFuture(lambda: self.result(index))

    def result(self, index: int) -> Any:
        if len(self.results) < len(self.pending):
            self.flush()
        return self.results[index]()

    def flush(self) -> None:
        """Start building what is pending: the batchable kernels as up to `workers` libraries (split in
        order, by source size), the others each as Inductor builds them."""
        start = len(self.results)
        todo = list(range(start, len(self.pending)))
        self.results.extend([None] * len(todo))  # type: ignore[list-item]
        merged = [i for i in todo if batchable(*self.pending[i])]
        for i in todo:
            if i not in merged:
                self.results[i] = self._single(i)
        for chunk in _chunks(merged, [len(self.pending[i][1]) for i in merged], self.workers):
            self._library(chunk)

    def _single(self, index: int) -> Callable[[], Any]:
        argtypes, source = self.pending[index]
        return _installed["codecache"].CppPythonBindingsCodeCache.load_pybinding_async(
            argtypes, source, submit_fn=self.submit)

    def _library(self, chunk: list[int]) -> None:
        cache = _installed["codecache"].CppPythonBindingsCodeCache
        load = cache.load_async(merged_source([self.pending[i] for i in chunk]), "cpu", submit_fn=self.submit)
        for position, index in enumerate(chunk):
            self.results[index] = self._from_library(load, position, index)

    def _from_library(self, load: Callable[[], Any], position: int, index: int) -> Callable[[], Any]:
        def get() -> Any:
            try:
                return getattr(load(), f"kernel{position}")
            except Exception as e:  # noqa: BLE001 - the kernel is then built as Inductor builds it
                warn_once("kernel batch", f"building Inductor's kernels together failed ({type(e).__name__}: "
                                          f"{str(e)[:300]}): building them one by one")
                return self._single(index)()
        return get


def _chunks(items: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """`items` in order, cut into at most `parts` runs of about equal total `sizes`."""
    if not items:
        return []
    parts = min(parts, len(items))
    target, out, run, acc = sum(sizes) / parts, [], [], 0
    for item, size in zip(items, sizes):
        run.append(item)
        acc += size
        if acc >= target * (len(out) + 1) and len(out) < parts - 1:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return out


def install() -> bool:
    """Batch the C++ kernels of every wrapper module loaded from now on in this process (once;
    False where it is off, or this torch lacks what it patches)."""
    if not enabled():
        return False
    with _lock:
        if _installed:
            return True
        module, codecache = symbol("inductor.async_compile"), symbol("inductor.codecache")
        cls = getattr(module, "AsyncCompile", None)
        needed = (getattr(cls, "cpp_pybinding", None), getattr(cls, "wait", None),
                  getattr(module, "get_compile_threads", None), getattr(codecache, "LambdaFuture", None),
                  getattr(getattr(codecache, "CppPythonBindingsCodeCache", None), "load_async", None))
        if cls is None or any(n is None for n in needed):
            warn_once("kernel batch symbols", "this torch's Inductor lacks what kernel batching patches: "
                                              "kernels are built one by one")
            return False
        _installed.update(cpp_pybinding=cls.cpp_pybinding, wait=cls.wait, codecache=codecache)
        original_cpp, original_wait = cls.cpp_pybinding, cls.wait
        threads = module.get_compile_threads

        def cpp_pybinding(self: Any, argtypes: list[str], source_code: str) -> Any:
            if threads() <= 1 or not enabled():
                return original_cpp(self, argtypes, source_code)
            batch = self.__dict__.get("_fmstack_batch")
            if batch is None:
                batch = self.__dict__["_fmstack_batch"] = KernelBatch(self.submit, threads())
            return batch.add(argtypes, source_code)

        def wait(self: Any, scope: dict[str, Any]) -> None:
            batch = self.__dict__.get("_fmstack_batch")
            if batch is not None:
                batch.flush()
            return original_wait(self, scope)

        cls.cpp_pybinding, cls.wait = cpp_pybinding, wait
        return True
