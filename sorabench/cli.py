"""`sorabench <command> [hydra overrides...]`: compose the command's config, validate it, run it.

A wrong key or value, or bad input data, is one line on stderr and exit code 2 — no traceback. Heavy imports
(torch, lightning, mlflow) happen only inside the command that needs them, so `--help` is instant.
"""

from __future__ import annotations

import importlib
import sys

from sorabench.config import ConfigError, compose_config
from sorabench.tracking import quiet_libraries

# command -> (config under conf/, "module:function" taking the composed config, one-line description)
COMMANDS = {
    "data": ("data", "sorabench.commands.data:main", "data preview|check: write sample clips, or validate a folder"),
    "train-vae": ("train_vae", "sorabench.commands.train:train_vae", "train the video VAE"),
    "encode": ("encode", "sorabench.commands.train:encode", "cache VAE latents of a dataset"),
    "train": ("train", "sorabench.commands.train:train", "train the DiT on cached latents"),
    "sample": ("sample", "sorabench.commands.train:sample", "sample clips from a DiT checkpoint for a prompt"),
    "train-evaluator": (
        "train_evaluator", "sorabench.commands.train:train_evaluator", "train the attribute classifier for metrics"
    ),
    "evaluate": ("evaluate", "sorabench.commands.evaluate:main", "FVD, FID, KID and text alignment of a checkpoint"),
    "sweep": ("sweep", "sorabench.commands.sweep:main", "run an Optuna study of DiT trials (grid ablation or search)"),
    "report": ("report", "sorabench.commands.report:main", "compare strategies from MLflow runs: tables, tests, plots"),
}
SUBCOMMANDS = {"data": ("preview", "check")}
OPTIONAL_SUBCOMMANDS = {"sweep": ("status",)}  # `sorabench sweep ...` runs a sweep; `sweep status` shows one

USAGE = """usage: sorabench <command> [subcommand] [key=value ...] [--cfg job] [--help]

commands:
{commands}

Overrides use Hydra syntax: data.num_frames=16 conditioning=cross_attention +extra.key=1.
`sorabench <command> --cfg job` prints the resolved config; `sorabench <command> --help` its config groups."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug: reported in one line, exit code 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sorabench.data.folder import DataError
    from sorabench.data.video_io import VideoReadError

    from sorabench.files import DiskFullError  # not bad input, but as actionable: one line naming the file

    return (ConfigError, DataError, VideoReadError, HydraException, OmegaConfBaseException, FileNotFoundError,
            DiskFullError)


def command_help(command: str) -> str:
    from sorabench.config import CONF_DIR

    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    options = {g: sorted(f.stem for f in (CONF_DIR / g).glob("*.yaml")) for g in groups}
    lines = [f"sorabench {command}: {COMMANDS[command][2]}", "", "config groups (pick with group=name):"]
    lines += [f"  {g}: {', '.join(opts)}" for g, opts in options.items() if opts]
    lines.append(f"\nsee the full config with: sorabench {command} --cfg job")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in args or "--help" in args:
        print(command_help(command))
        return 0
    subcommand = None
    if command in SUBCOMMANDS:
        if not args or args[0] not in SUBCOMMANDS[command]:
            print(f"error: sorabench {command} needs one of: {', '.join(SUBCOMMANDS[command])}", file=sys.stderr)
            return 2
        subcommand, args = args[0], args[1:]
    elif args and args[0] in OPTIONAL_SUBCOMMANDS.get(command, ()):
        subcommand, args = args[0], args[1:]
    print_cfg = False
    if "--cfg" in args:
        i = args.index("--cfg")
        print_cfg = True
        args = args[:i] + args[i + 2 :]  # `--cfg job`
    config_name, target, _ = COMMANDS[command]
    errors = user_errors()
    try:
        cfg = compose_config(config_name, args, command=command.replace("-", "_"))
        if print_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(cfg, subcommand) if subcommand else func(cfg)
    except errors as e:
        message = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
