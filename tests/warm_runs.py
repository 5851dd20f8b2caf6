"""Script runs for the kill tests, each in a process of its own forked from a server that has
already imported torch, transformers, datasets and the package (multiprocessing's forkserver with
preloaded modules): a run pays for its work, not for seconds of imports, and is still a separate
process that a fault or a timer kills with SIGKILL.

A fault is armed in the run before the script starts: at the INDEX-th call of KIND the process
kills itself, after the call (or, for `weights-truncated`, after cutting the file it just wrote in
half, as a kill during the write leaves it).
"""

import multiprocessing
import os
import pathlib
import runpy
import signal
import sys
import tempfile

PRELOAD = ["torch", "transformers", "datasets", "safetensors.torch", "modeling_performer", "peft", "sklearn.metrics"]
# Fixed before the server starts: huggingface_hub reads the offline switches when imported, and the
# hash seed of every run is the server's.
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
_context = None


def _server():
    global _context
    if _context is None:
        os.environ.update(ENVIRONMENT)
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([m for m in PRELOAD if _importable(m)])
    return _context


def _importable(module):
    import importlib.util

    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _rebind(original, replacement):
    """Points every loaded module's name for `original` at `replacement`: modules imported in the
    server hold their own references (`from safetensors.torch import save_file`)."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                namespace[name] = replacement


def _arm(kind, index):
    calls = [0]

    def due():
        calls[0] += 1
        return calls[0] == index

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "torch.save":  # optimizer, scheduler, RNG states, training args, working states
        import torch

        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            original_save(obj, f, *args, **kwargs)
            if due():
                die()
        _rebind(original_save, save)
    elif kind == "weights-truncated":
        import safetensors.torch as st

        original_save_file = st.save_file

        def save_file(tensors, filename, *args, **kwargs):
            original_save_file(tensors, filename, *args, **kwargs)
            if due():
                with open(filename, "r+b") as handle:
                    handle.truncate(os.path.getsize(filename) // 2)
                die()
        _rebind(original_save_file, save_file)
    elif kind == "os.replace":  # checksum rewrites and the final folder's moves
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            original_replace(src, dst, *args, **kwargs)
            if due():
                die()
        _rebind(original_replace, replace)
    elif kind is not None:
        raise ValueError(f"unknown fault {kind!r}")


def _run(script_args, fault, log):
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if fault is not None:
        _arm(*fault)
    sys.argv = list(script_args)
    sys.path.insert(0, os.path.dirname(script_args[0]))  # as `python script.py` would
    code = 0
    try:
        runpy.run_path(script_args[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _nothing():
    pass


def warm():
    """Starts the server (its imports take seconds) so that the next run's time is the run's own."""
    process = _server().Process(target=_nothing)
    process.start()
    process.join()


def run(script_args, fault=None, kill_after=None, timeout=600):
    """Runs `python SCRIPT ARGS...` (script_args[0] is the script) in a warm process; with fault
    (KIND, INDEX) armed, or killed after kill_after seconds. -> (exit code, -9 when killed; output)."""
    with tempfile.TemporaryDirectory() as folder:
        log = str(pathlib.Path(folder) / "output.txt")
        process = _server().Process(target=_run, args=([str(a) for a in script_args], fault, log))
        process.start()
        process.join(kill_after if kill_after is not None else timeout)
        if process.is_alive():
            if kill_after is None:
                process.kill()
                process.join()
                raise TimeoutError(f"{script_args[0]} ran longer than {timeout} s")
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        return process.exitcode, pathlib.Path(log).read_text()
