"""The processes of a sweep: local workers on this machine (`workers=k`), the DDP ranks that follow rank 0's trials,
and a Ctrl-C that is remembered even where Python drops its KeyboardInterrupt."""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

from sorabench.config import require
from sorabench.sweep.space import trial_config

console = Console(soft_wrap=True)


def worker_threads(cfg: DictConfig) -> int:
    """Intra-op threads of each local worker: `threads`, or the machine's cores shared out among `workers`."""
    workers = int(cfg.workers)
    require(workers >= 1, "workers", cfg.workers, "must be >= 1")
    threads = cfg.threads if cfg.threads is not None else max(1, (os.cpu_count() or 1) // workers)
    require(isinstance(threads, int) and threads >= 1, "threads", cfg.threads, "must be null or an int >= 1")
    return threads


def die_with_parent() -> None:
    """A local worker is killed (SIGKILL) when the process that started it dies, however it dies: a SIGKILLed or
    OOM-killed sweep otherwise leaves orphans that keep training and writing into the study. Its trial is then the
    stalled trial a rerun requeues from its last checkpoint, exactly as when the worker itself is killed. Linux
    (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def start_local_workers(cfg: DictConfig, target) -> list:
    """Start `workers - 1` more processes on this machine that work on the same study as this one: each runs
    `target(cfg_yaml)` (a module-level function: a spawned process finds it by its qualified name).

    Why: the small DiTs of a CPU ablation leave most of a core idle in per-op overhead, so k processes with
    cores/k threads each train more clips per second in all than one process with every core
    (benchmarks/RESULTS.md measures it). Each trial still runs alone in one process, from its own seed, so its
    numbers match a trial run by itself up to floating-point reduction order. Workers share the Optuna storage
    (each takes the next free grid cell) and the caches, which `prepare_shared_assets` filled before."""
    import multiprocessing

    import torch

    threads = worker_threads(cfg)
    torch.set_num_threads(threads)
    extra = int(cfg.workers) - 1
    if extra <= 0:
        return []
    child = OmegaConf.to_container(cfg, resolve=True)
    child.update(workers=1, threads=threads, report=False)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools or DB handles
    procs = [ctx.Process(target=target, args=(OmegaConf.to_yaml(child),), name=f"sweep-worker-{i + 1}")
             for i in range(extra)]
    for p in procs:
        p.start()
    console.print(f"{int(cfg.workers)} local workers, {threads} thread(s) each")
    return procs


class DDPFollower:
    """`trainer=ddp` inside a sweep. Lightning's launcher starts ranks 1..N-1 by rerunning this command line, once,
    during rank 0's first `fit`; every later trial's `fit` in rank 0 reuses them. Rank 0 alone owns the Optuna
    trial: before each trial it sends the cell (values, run name) to the other ranks — through the environment the
    launcher copies for the first trial, by a broadcast over the process group for later ones — and a stop at the
    end. The other ranks run `follow`: train exactly the cell they are sent, never touching the study."""

    ENV = "SORABENCH_DDP_TRIAL"

    @classmethod
    def announce(cls, message: dict):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list([message], src=0)
        else:
            os.environ[cls.ENV] = json.dumps(message)  # the launcher copies os.environ into the ranks it starts

    @classmethod
    def stop(cls):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            cls.announce({"stop": True})

    @classmethod
    def receive(cls) -> dict:
        import torch.distributed as dist

        first = os.environ.pop(cls.ENV, None)
        if first is not None:
            return json.loads(first)
        if not dist.is_initialized():
            raise RuntimeError("a DDP rank > 0 of a sweep got no trial from rank 0 (started outside its launcher?)")
        message = [None]
        dist.broadcast_object_list(message, src=0)
        return message[0]

    @classmethod
    def follow(cls, cfg: DictConfig, sweep: dict) -> int:
        from sorabench.training.dit_run import train

        while not (message := cls.receive()).get("stop"):
            tcfg = trial_config(cfg, sweep, message["values"], message["name"])
            with open_dict(tcfg):
                tcfg.trainer.precision = message.get("precision", tcfg.trainer.precision)  # rank 0's, resolved
            try:
                train(tcfg)
            except Exception as e:
                # Exit rather than wait for the next message: rank 0 is inside a collective of this trial's fit,
                # and only a closed peer makes it fail now instead of at the backend's timeout.
                console.print(f"[red]DDP rank {os.environ.get('LOCAL_RANK')}: {message['name']} failed: {e}; this "
                              "rank exits so that rank 0 fails the trial now")
                return 1
        return 0


@contextmanager
def remembered_ctrl_c():
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered (yields `interrupted()`). Python drops an
    exception raised while a __del__ runs (Lightning's Profiler.__del__ during garbage collection, for one), so
    without this a worker could take Ctrl-C, finish its trial and go on to the next one."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield lambda: False  # Ctrl-C is ignored here (or cannot be caught off the main thread): leave it so
        return
    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)  # Python's own handler raises KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)
