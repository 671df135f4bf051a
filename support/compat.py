"""
Compatibility shims for kernels.py, kept out of the files a student reads for the routing.

1. One name, two packages. transformers (5.x) imports Hugging Face's package `kernels` while it loads,
   and again inside from_pretrained (`from kernels import Mode`). In a process started at the repository
   root (a script, pytest, a notebook) this project's kernels.py comes first on sys.path under that name,
   and sys.modules holds one module per name. Renaming kernels.py was ruled out (the brief names it), and
   hiding the repository root while transformers loads misses the later imports. So kernels.py also
   answers for the other package (PEP 562, `hub_getattr`): a public name it does not define,
   `__version__`, and the folder its submodules come from (`__path__`) are Hugging Face's, loaded on first
   use. The two share no public name (tests/test_interop.py checks it), so neither side ever gets the
   other's function. Where transformers imported its package before the repository root was on sys.path,
   `import kernels` gives theirs: router.py refuses it with one line (`require_project_kernels`).
2. Triton 3.6's interpreter (TRITON_INTERPRET=1, on CPU) holds a scalar argument as a 1-element array and
   gives range() its int(): numpy 2.4 refuses that ("only 0-dimensional arrays can be converted to Python
   scalars"), so the ERMoE kernels' `range(0, R, RC)` fails there. Triton 3.7 squeezes the array first
   (triton-lang/triton#9171); `patch_triton_interpreter` makes the same one change to 3.6's interpreter.
   Compiled kernels never run this code: the GPU path is unchanged.
"""

import importlib.machinery
import importlib.util
import os
import sys


def hub_getattr(module):
    """A module __getattr__ (PEP 562) for the module whose globals() are `module`: its missing public names,
    `__version__` and `__path__` from Hugging Face's package of the same name (AttributeError if not installed)."""
    state = {"hub": None}  # Hugging Face's package, once loaded

    def hub_package():
        """Hugging Face's package, loaded from sys.path without this module's folder; None if not installed."""
        if state["hub"] is None:
            here = os.path.dirname(os.path.realpath(module["__file__"]))
            path = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
            spec = importlib.machinery.PathFinder.find_spec(module["__name__"], path)
            if spec is None or spec.submodule_search_locations is None:
                return None
            module["__path__"] = list(spec.submodule_search_locations)  # where `kernels.<sub>` is found
            hub = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(hub)  # its own `from kernels.x import ...` resolve through __path__
            except BaseException:
                del module["__path__"]
                raise
            state["hub"] = hub
        return state["hub"]

    def __getattr__(name):
        if name.startswith("_") and name not in ("__path__", "__version__"):
            raise AttributeError(f"module {module['__name__']!r} has no attribute {name!r}")
        hub = hub_package()
        if hub is None:
            raise AttributeError(f"module {module['__name__']!r} (this project's kernels.py) has no attribute {name!r}")
        return module["__path__"] if name == "__path__" else getattr(hub, name)
    __getattr__.hub_package = hub_package  # (the tests ask it directly)
    return __getattr__


def require_project_kernels(module):
    """ImportError unless `module` (what `import kernels` gave) is this project's kernels.py, not Hugging Face's
    package that transformers imported first under that name."""
    if not hasattr(module, "fused_route"):
        raise ImportError("`import kernels` found Hugging Face's package (transformers imported it before the "
                          "repository root was on sys.path): put the repository root first on sys.path before "
                          "importing transformers")


def patch_triton_interpreter():
    """Triton < 3.7's interpreter: a scalar argument's __index__ squeezes its 1-element array first (item 2)."""
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    interpreter._patch_lang_tensor = patched
