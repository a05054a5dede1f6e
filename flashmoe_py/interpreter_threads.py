"""Concurrent programs under the Triton interpreter (DESIGN §6, §7): the programs of one interpreted launch run as
threads at the same time, as a GPU runs them, instead of one after another.

Why: the fused kernel's programs claim tasks from shared counters and wait on flags that other programs of the
same launch set. Run one after another (the interpreter's own way) a program that waits on a later one never
returns, so without this mode the kernel can only be tested phase by phase, not as the `PHASE=ALL` launch a GPU
runs. With it, the interpreter runs exactly the code a GPU runs, several programs claiming tasks at once.

How (works on Triton 3.6 through 3.9): while the mode is on, `GridExecutor.__call__` of `triton.runtime.interpreter`
is replaced by one that starts a thread per program. The interpreter keeps the program index on one global
builder object; it becomes thread-local. `triton.language` is patched for the interpreter once, when the first
concurrent launch starts, and restored when the last ends, so several launches may run at once (several ranks in
one process, each rank's launch on its own thread). The thread switch interval is lowered so the programs
interleave finely (a spin-wait gives way quickly). A program that raises stops its launch with that error, after
every other program of the launch has finished or been given up on; the error names the program.

Atomics of the interpreter are C++ calls done while holding the GIL, so they are atomic across threads; a
volatile load reads memory as it is. That is the memory model the kernels assume across ranks (processes) too.

    with interpreter_threads.concurrent_programs():
        ...   # every interpreted launch in here runs its programs concurrently

Test support only: nothing in here runs unless a test or a caller turns it on, and it changes nothing compiled.
"""

from __future__ import annotations

import contextlib
import sys
import threading

_lock = threading.RLock()
_state = {"depth": 0, "saved_call": None, "saved_interval": None, "builder_cls": None, "saved_attr": None}
_lang = {"users": 0, "scopes": []}
_local = threading.local()


def _interp():
    from triton.runtime import interpreter

    return interpreter


class ProgramError(RuntimeError):
    """A program of a concurrent interpreted launch raised; the message names the program."""


def _grid_idx_property():
    def get(self):
        return getattr(_local, "grid_idx", None)

    def put(self, value):
        _local.grid_idx = value

    return property(get, put)


def _acquire_lang(fn) -> None:
    """Patch triton.language for the interpreter (first concurrent launch only; later ones share the patch)."""
    with _lock:
        _lang["users"] += 1
        _lang["scopes"].append(_state["saved_patch"](fn))


def _release_lang() -> None:
    with _lock:
        _lang["users"] -= 1
        if _lang["users"] == 0:  # the last launch out restores in reverse order of patching
            for scope in reversed(_lang["scopes"]):
                scope.restore()
            _lang["scopes"].clear()


def _concurrent_call(self, *args_dev, **kwargs):
    """Replacement of GridExecutor.__call__: the interpreter's own steps, with the grid run as threads."""
    import inspect

    interp = _interp()
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    _acquire_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in self.constexprs else interp._implicit_cvt(arg) for name, arg in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        builder = interp.interpreter_builder
        with _lock:  # grid_dim is global: every concurrent launch of this module sees the last one set
            builder.set_grid_dim(*grid)
        errors: list = []

        def program(x, y, z):
            _local.grid_idx = (x, y, z)
            _local.grid_dim = grid
            try:
                self.fn(**args)
            except BaseException as e:  # noqa: BLE001 - reported below, with the program that raised it
                errors.append(((x, y, z), e))

        threads = [threading.Thread(target=program, args=(x, y, z), name=f"triton-program-{x}-{y}-{z}", daemon=True)
                   for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            pid, err = errors[0]
            raise ProgramError(f"program {pid} of {getattr(self.fn, '__name__', 'kernel')} raised {err!r}") from err
    finally:
        _release_lang()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def _install() -> None:
    interp = _interp()
    builder_cls = type(interp.interpreter_builder)
    _state["builder_cls"] = builder_cls
    _state["saved_attr"] = builder_cls.__dict__.get("grid_idx", None)
    _state["saved_dim_attr"] = builder_cls.__dict__.get("grid_dim", None)
    # The instance attributes move to thread-local storage: the property on the class takes precedence over the
    # instance dict only for data descriptors, which a property is.
    inst = interp.interpreter_builder.__dict__
    _state["saved_inst"] = {k: inst.pop(k) for k in ("grid_idx", "grid_dim") if k in inst}
    builder_cls.grid_idx = _grid_idx_property()
    builder_cls.grid_dim = _grid_dim_property(_state["saved_inst"].get("grid_dim"))
    _state["saved_call"] = interp.GridExecutor.__call__
    interp.GridExecutor.__call__ = _concurrent_call
    # The interpreter rewrites a jit function the first time it is called (adding names to its module's globals)
    # and patches triton.language at every device-function call (iterating those globals): two program threads
    # doing both at once raise "dictionary changed size during iteration". One lock serialises the two.
    _state["saved_patch"] = interp._patch_lang
    _state["saved_rewrite"] = interp.InterpretedFunction.rewrite
    interp._patch_lang = _locked(interp._patch_lang)
    interp.InterpretedFunction.rewrite = _locked(interp.InterpretedFunction.rewrite)
    _state["saved_interval"] = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)


def _locked(fn):
    def call(*args, **kwargs):
        with _lock:
            return fn(*args, **kwargs)

    return call


def _grid_dim_property(default):
    shared = {"value": default}

    def get(self):
        return getattr(_local, "grid_dim", None) or shared["value"]

    def put(self, value):
        shared["value"] = value

    return property(get, put)


def _uninstall() -> None:
    interp = _interp()
    builder_cls = _state["builder_cls"]
    for name in ("grid_idx", "grid_dim"):
        if name in builder_cls.__dict__:
            delattr(builder_cls, name)
    interp.interpreter_builder.__dict__.update(_state["saved_inst"])
    interp.GridExecutor.__call__ = _state["saved_call"]
    interp._patch_lang = _state["saved_patch"]
    interp.InterpretedFunction.rewrite = _state["saved_rewrite"]
    sys.setswitchinterval(_state["saved_interval"])


@contextlib.contextmanager
def concurrent_programs():
    """Within this block every Triton-interpreter launch runs its programs as concurrent threads (re-entrant;
    threads started inside share it)."""
    with _lock:
        if _state["depth"] == 0:
            _install()
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                _uninstall()


def active() -> bool:
    """True inside concurrent_programs(): interpreted launches run their programs at the same time."""
    return _state["depth"] > 0


__all__ = ["ProgramError", "active", "concurrent_programs"]
