"""Start a tensor-parallel run: one process per GPU (or per CPU "device" with gloo).

    python -m executor.parallel.launch --tp 2 -- -m experiments.bench_decode --steps 64
    python -m executor.parallel.launch --tp 2 -- path/to/script.py --flag
    torchrun --nproc-per-node 2 -m executor.parallel.launch -- -m experiments.bench_decode

Rank 0 runs the target (as ``__main__``, with ``sys.argv`` set) with the tensor-parallel group
current, so ``create_engine`` / ``LLM`` in it shard over all ranks without code changes;
ranks 1.. serve it (``worker.serve_worker``) until it returns. Without torchrun's variables
the launcher spawns the ranks itself with ``torch.multiprocessing`` (``spawn``) on
127.0.0.1 and a free port. NVLS / multicast are forced off in every rank's environment
(``state.NO_MULTICAST_ENV``). ``run_tensor_parallel(fn, tp, *args)`` is the same from Python
(tests): rank 0 returns ``fn(*args)`` to the caller.
"""
from __future__ import annotations

import argparse
import os
import pickle
import runpy
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from executor.parallel.state import NO_MULTICAST_ENV


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_target(target: Sequence[str]) -> None:
    """``["-m", "pkg.mod", args...]`` or ``["script.py", args...]`` as ``__main__``."""
    if not target:
        raise SystemExit("launch: nothing to run after --")
    argv = list(target)
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("launch: -m needs a module")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def _rank_main(backend: str | None, threads: int | None, body: Callable[[], Any]) -> Any:
    """Join the group; rank 0 runs ``body`` then releases the workers, the others serve."""
    import torch

    from executor.parallel.state import init_tensor_parallel, set_current_tp_group
    from executor.parallel.worker import serve_worker, stop_workers

    if threads:
        torch.set_num_threads(threads)
    tp = init_tensor_parallel(backend)
    result = None
    if tp.is_driver:
        # On an error rank 0 does not try to release the workers (they may be inside a collective
        # of a half-built engine): the process fails, and the launcher (or torchrun) ends the rest.
        try:
            result = body()
        except SystemExit as e:  # a target's sys.exit(0) is a normal end
            if e.code not in (None, 0):
                raise
        stop_workers(tp)
    else:
        serve_worker(tp)
    set_current_tp_group(None)
    return result


def _hard_exit(code: int = 0) -> None:
    """Leave without tearing the process groups down: a gloo group destroyed (or garbage
    collected at interpreter exit) while a peer is still finishing its last op can hang or
    abort ("terminate called without an active exception"); every rank is done by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawned(index: int, world: int, port: int, backend: str | None, threads: int | None,
             body: Callable[..., Any], args: tuple, result_path: str | None) -> None:
    if os.environ.get("SERVELAB_TP_DEBUG_DUMP"):  # debugging aid: stacks of every rank after N s
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["SERVELAB_TP_DEBUG_DUMP"]), exit=True)
    os.environ.update(NO_MULTICAST_ENV)
    os.environ.update({"RANK": str(index), "WORLD_SIZE": str(world), "LOCAL_RANK": str(index),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    result = _rank_main(backend, threads, lambda: body(*args))
    if index == 0 and result_path is not None:
        with open(result_path, "wb") as f:
            pickle.dump(result, f)
    _hard_exit(0)


def spawn(tp: int, body: Callable[..., Any], args: tuple = (), backend: str | None = None,
          threads: int | None = None, want_result: bool = False) -> Any:
    """Spawn ``tp`` ranks running ``body(*args)`` on rank 0 (``body`` must be picklable:
    a module-level function). Returns rank 0's result when ``want_result``."""
    import torch.multiprocessing as mp

    for key, value in NO_MULTICAST_ENV.items():
        os.environ[key] = value
    port = _free_port()
    result_path = None
    if want_result:
        fd, result_path = tempfile.mkstemp(prefix="tp-result-", suffix=".pkl")
        os.close(fd)
    try:
        mp.start_processes(_spawned, args=(tp, port, backend, threads, body, args, result_path), nprocs=tp,
                           join=True, start_method="spawn")
        if result_path is not None:
            with open(result_path, "rb") as f:
                return pickle.load(f)
        return None
    finally:
        if result_path is not None:
            os.unlink(result_path)


def run_tensor_parallel(fn: Callable[..., Any], tp: int, *args: Any, backend: str | None = None,
                        threads: int | None = None) -> Any:
    """``fn(*args)`` on rank 0 of a fresh ``tp``-rank group (ranks 1.. serve it); returns its
    result. ``fn`` must be importable (module level) and its result picklable."""
    return spawn(tp, fn, args, backend=backend, threads=threads, want_result=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, target = argv[:cut], argv[cut + 1:]
    else:
        own, target = argv, []
    ap = argparse.ArgumentParser(prog="python -m executor.parallel.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=None, help="ranks (default: torchrun's WORLD_SIZE, else 1)")
    ap.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                    help="default: nccl with CUDA, gloo without")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    args = ap.parse_args(own)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun: this process is one rank
        world = int(os.environ["WORLD_SIZE"])
        if args.tp is not None and args.tp != world:
            raise SystemExit(f"launch: --tp {args.tp} but torchrun started {world} ranks")
        os.environ.update(NO_MULTICAST_ENV)
        _rank_main(args.backend, args.threads, lambda: _run_target(target))
        _hard_exit(0)
    tp = args.tp or 1
    if tp < 1:
        raise SystemExit("launch: --tp must be >= 1")
    spawn(tp, _run_target, (target,), backend=args.backend, threads=args.threads)


if __name__ == "__main__":
    main()
