"""The sweep reliability soak (issue #27): one grid run twice on PostgreSQL by two workers, once undisturbed ("calm")
and once through a storm - one worker SIGSTOPped past the grace period and continued, one SIGKILLed and restarted,
one Ctrl-C during a trial's final evaluation and restarted, one injected transient failure - then compared cell by
cell. Not collected by pytest (minutes of real trials); run it by hand:

    .venv/bin/python -m tests.soak [--storage postgresql+psycopg2://postgres@127.0.0.1:5432/test] [--steps 300]

It prints what must hold: every cell COMPLETE exactly once in Optuna, one MLflow child per cell, the parent run
FINISHED only at the end, and each cell's final metrics against the calm run's (max |difference|).
Both studies share one outputs= (one shared VAE, evaluator and caches), each under its own study name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from optuna.trial import TrialState

from tests.conftest import TINY
from tests.test_lease import wait_for
from tests.test_sweep import children, storage_of, trials_of

GRID = ["sweep.params.conditioning.choices=[in_context,cross_attention,adaln_zero]", "sweep.seeds=[0,1]"]
INJECT_ENV = "SORABENCH_SOAK_INJECT"  # "<marker file>:<run name>": that trial's first start fails with an OSError


def sweep_args(outputs: Path, study: str, storage: str, steps: int) -> list[str]:
    trial = [*TINY, f"trainer.max_steps={steps}", "trainer.checkpoint_every_n_steps=20",
             "trainer.log_every_n_steps=20", "metrics.sample_steps=100"]  # an evaluation long enough to interrupt
    return ["sweep", f"outputs={outputs}", f"storage={storage}", f"study={study}", "workers=1", *GRID,
            "report=false", "~sweep.protocol", "heartbeat_interval=1", "grace_period=4",
            f"overrides=[{','.join(json.dumps(o) for o in trial)}]"]


def start(args: list[str], log: Path, inject: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if inject:
        env[INJECT_ENV] = inject
    # SIGINT at its default in the child, so that a Ctrl-C reaches it as it would from a terminal.
    return subprocess.Popen([sys.executable, "-m", "tests.soak", "worker", *args], env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def worker(args: list[str]) -> int:
    """`sorabench <args>`, with the transient failure of INJECT_ENV armed (it fires once across processes)."""
    inject = os.environ.get(INJECT_ENV)
    if inject:
        import sorabench.training.dit_run as dit_run

        marker, name = inject.split(":", 1)
        real_train = dit_run.train

        def train(cfg, *a, **kw):
            if cfg.name == name and not Path(marker).exists():
                Path(marker).touch()
                raise OSError(f"injected transient failure in {name}")
            return real_train(cfg, *a, **kw)

        dit_run.train = train
    from sorabench.cli import main

    return main(args)


def running(study: str, storage: str, proc: subprocess.Popen | None = None):
    return [t for t in trials_of(study, storage) if t.state == TrialState.RUNNING
            and (proc is None or t.user_attrs.get("host", "").endswith(f":{proc.pid}"))]


def run_dir(outputs: Path, trial) -> Path:
    return outputs / "train" / trial.user_attrs["run_name"]


def calm(outputs: Path, study: str, storage: str, steps: int) -> None:
    log = outputs / f"{study}.log"
    w1 = start(sweep_args(outputs, study, storage, steps), log)
    time.sleep(3)  # w1 queues the cells and trains the shared assets; w2 finds them
    w2 = start(sweep_args(outputs, study, storage, steps), log)
    for w in (w1, w2):
        assert w.wait(timeout=3600) == 0, f"calm worker {w.pid} exited {w.returncode}: see {log}"


def storm(outputs: Path, study: str, storage: str, steps: int) -> list[str]:
    log, events = outputs / f"{study}.log", []
    args = sweep_args(outputs, study, storage, steps)
    inject = f"{outputs / study}.injected:{study}/in_context-seed1"
    w1 = start(args, log, inject)
    time.sleep(3)
    w2 = start(args, log, inject)

    # 1. Worker 2 SIGSTOPped mid-trial (after a checkpoint), continued once its cell was taken from it.
    stalled = wait_for(lambda: [t for t in running(study, storage, w2)
                                if (run_dir(outputs, t) / "checkpoints" / "last.ckpt").is_file()], 600,
                       "w2 mid-trial")[0]
    os.kill(w2.pid, signal.SIGSTOP)
    events.append(f"SIGSTOP worker 2 in trial {stalled.number} ({stalled.user_attrs['run_name']})")
    wait_for(lambda: [t for t in running(study, storage) if t.user_attrs.get("cell") == stalled.user_attrs["cell"]
                      and t.number != stalled.number], 900, "the stalled cell to be taken over")
    os.kill(w2.pid, signal.SIGCONT)
    events.append(f"SIGCONT worker 2 after trial {stalled.number}'s cell was retried by another")

    # 2. Worker 1 SIGKILLed mid-trial, restarted.
    killed = wait_for(lambda: [t for t in running(study, storage, w1)
                               if (run_dir(outputs, t) / "checkpoints" / "last.ckpt").is_file()], 600,
                      "w1 mid-trial")[0]
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait()
    events.append(f"SIGKILL worker 1 in trial {killed.number} ({killed.user_attrs['run_name']}); restarted")
    w1 = start(args, log, inject)

    # 3. Ctrl-C while a trial evaluates (its last step's checkpoint written, result.json not yet), restarted.
    def evaluating():
        for w in (w1, w2):
            for t in running(study, storage, w):
                d = run_dir(outputs, t)
                if (d / "checkpoints" / f"best-step={steps}.ckpt").is_file() and not (d / "result.json").exists():
                    return w, t
        return None

    w, t = wait_for(evaluating, 900, "a trial in its final evaluation")
    w.send_signal(signal.SIGINT)
    code = w.wait(timeout=300)
    events.append(f"Ctrl-C worker {1 if w is w1 else 2} during trial {t.number}'s evaluation "
                  f"({t.user_attrs['run_name']}): exit {code}; restarted")
    replacement = start(args, log, inject)
    w1, w2 = (replacement, w2) if w is w1 else (w1, replacement)

    for w in (w1, w2):
        code = w.wait(timeout=3600)
        events.append(f"worker {w.pid} exited {code}")
    injected = Path(f"{outputs / study}.injected").exists()
    events.append(f"injected transient failure fired: {injected}")
    return events


def final_metrics(outputs: Path, study: str) -> tuple[dict, list[str]]:
    client, parents, kids = children(f"sqlite:///{outputs}/mlflow.db", study)
    problems = []
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        problems.append(f"parent runs: {[(p.info.run_id, p.info.status) for p in parents]}")
    names = [k.info.run_name for k in kids]
    if len(set(names)) != len(names):
        problems.append(f"duplicate MLflow children: {sorted(names)}")
    metrics = {k.info.run_name: {m: v for m, v in k.data.metrics.items() if not m.startswith("time/")} for k in kids}
    return metrics, problems


def weight_difference(a: Path, b: Path) -> float:
    """max |a - b| over every tensor of two checkpoints' state_dict (the same cell trained twice)."""
    import torch

    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert sa.keys() == sb.keys(), f"{a} and {b} hold different tensors"
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def cells_complete_once(study: str, storage: str) -> list[str]:
    trials = trials_of(study, storage)
    complete = [t.user_attrs["run_name"] for t in trials if t.state == TrialState.COMPLETE]
    problems = [f"{n} COMPLETE {complete.count(n)} times" for n in set(complete) if complete.count(n) != 1]
    if len(set(complete)) != 6:
        problems.append(f"{len(set(complete))} of 6 cells COMPLETE")
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if left:
        problems.append(f"trials left RUNNING/WAITING: {left}")
    states = {}
    for t in trials:
        states.setdefault(t.user_attrs.get("run_name", "?"), []).append(t.state.name)
    print(f"  {study}: trials per cell: {json.dumps(states, sort_keys=True)}")
    return problems


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["worker"]:
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=os.environ.get("SORABENCH_TEST_POSTGRES",
                                                       "postgresql+psycopg2://postgres@127.0.0.1:5432/test"))
    p.add_argument("--outputs", type=Path, default=Path("/tmp") / f"sorabench-soak-{uuid.uuid4().hex[:6]}")
    p.add_argument("--steps", type=int, default=300, help="training steps per trial (a multiple of 20)")
    a = p.parse_args(argv)
    a.outputs.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    studies = {"calm": f"soak-calm-{tag}", "storm": f"soak-storm-{tag}"}
    print(f"soak: outputs={a.outputs} storage={a.storage} steps={a.steps} studies={studies}", flush=True)
    t0 = time.time()
    calm(a.outputs, studies["calm"], a.storage, a.steps)
    print(f"calm run: {time.time() - t0:.0f} s", flush=True)
    t1 = time.time()
    for event in storm(a.outputs, studies["storm"], a.storage, a.steps):
        print(f"  storm: {event}", flush=True)
    print(f"storm run: {time.time() - t1:.0f} s", flush=True)

    problems = []
    for name, study in studies.items():
        problems += [f"{name}: {p}" for p in cells_complete_once(study, a.storage)]
    (calm_m, p1), (storm_m, p2) = final_metrics(a.outputs, studies["calm"]), final_metrics(a.outputs, studies["storm"])
    problems += [f"calm: {p}" for p in p1] + [f"storm: {p}" for p in p2]
    print("final metrics (eval/*, val/loss, train/loss) and weights (last.ckpt), storm against calm, max |difference|:")
    worst = 0.0
    for cell in sorted(calm_m):  # an MLflow child is named after its cell, e.g. in_context-seed1
        if cell not in storm_m:
            problems.append(f"storm: no MLflow child for {cell}")
            continue
        a_, b_ = calm_m[cell], storm_m[cell]
        diffs = [abs(a_[k] - b_[k]) for k in a_ if k in b_ and math.isfinite(a_[k]) and math.isfinite(b_[k])]
        diff = max(diffs, default=float("nan"))
        worst = max(worst, diff) if math.isfinite(diff) else worst
        weights = weight_difference(*(a.outputs / "train" / studies[k] / cell / "checkpoints" / "last.ckpt"
                                      for k in ("calm", "storm")))
        worst = max(worst, weights)
        print(f"  {cell:24s} {len(diffs):3d} metrics: {diff:.3g}   weights: {weights:.3g}   val/loss "
              f"{a_.get('val/loss', float('nan')):.6f} vs {b_.get('val/loss', float('nan')):.6f}")
    print(f"worst |difference| over every cell, metric and weight: {worst:.3g}")
    for study in studies.values():
        import optuna

        optuna.delete_study(study_name=study, storage=storage_of(a.storage))
    print("PROBLEMS:\n  " + "\n  ".join(problems) if problems else "every check held", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
