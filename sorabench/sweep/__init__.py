"""`sorabench sweep`: an Optuna study whose trials are DiT runs composed from Hydra configs.

- A search space is YAML in `conf/sweep/`: `params` (`{choices: [...]}`, `{low, high, log}`, `{low, high, step}`),
  `seeds`, `fixed` overrides and `objectives` (metric + direction; several make a multi-objective study).
- `mode: grid` runs every combination of the choices x every seed (an ablation is exhaustive, not a search);
  `mode: search` samples with TPE and prunes on `val/loss` with a MedianPruner through optuna-integration's
  Lightning pruning callback.
- Each trial builds its config with Hydra's compose API (`conf/<sweep.command>.yaml` + overrides), trains, evaluates
  and returns the objective(s). The Hydra Optuna sweeper plugin is not used: it pins optuna<3.
- Storage: `sqlite:///<outputs>/optuna.db`, or a PostgreSQL URL so that the same command started on many machines
  works on one study. Heartbeats mark a dead worker's trial failed; `RetryHeartbeatStaleTrialCallback` requeues it.
- A trial's run directory (and so its checkpoint and MLflow run) is named after its grid cell, so a retried trial
  resumes the dead one's checkpoint and continues the same MLflow child run: nothing is duplicated or orphaned.
- Grid cells are queued, not sampled: each worker, at start and under a study-wide lock (a file lock beside a SQLite
  database, a PostgreSQL advisory lock), adds one WAITING trial per cell that has none and one retry per trial that
  failed for a reason outside the model (an interrupt, a full disk, a race) — so rerunning the command resumes what
  was interrupted, and adding seeds or choices to an existing study runs exactly the new cells. Workers pop WAITING
  trials atomically (Optuna's storage), so no cell runs twice. A grid trial's cell is its user attr `cell`, not
  Optuna params: a study's storage fixes a categorical parameter's choices for good, and Optuna's GridSampler
  forgets the finished cells when the grid changes.
- A failure caused by the model (a non-finite loss or objective) is final: rerunning would fail the same way.
- Search: TPE's random state is set from (seed, trial number) before each trial, so workers and restarts propose
  distinct trials and a sweep run by one worker is reproducible.
- `trainer=ddp`: Lightning's launcher reruns this command once per extra rank; rank 0 owns the Optuna trial and
  sends each trial's cell to the other ranks (`DDPFollower`), which never touch the study.

Modules, in the order a sweep uses them:
- `space`: the search space, grid cells and their names, a trial's values and config;
- `study`: the Optuna storage, the study-wide lock, creating and checking a study, queueing cells and reruns;
- `workers`: local worker processes, DDP ranks that follow rank 0, a remembered Ctrl-C;
- `run`: the objective, the trial loop and the sweep's main flow (`run_sweep`);
- `status`: `sorabench sweep status`, one row per cell.
The MLflow side (the study's parent run, its runs-table views, each child's final state) lives in `tracking.py`.
"""
