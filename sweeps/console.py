"""The ``collapse-sweep`` command: one entry point for every command line of the project.

    collapse-sweep run dip_sbd --smoke                  # a sweep (the same as python sweeps/run.py)
    collapse-sweep train exp2_dipvae_sbd --epochs 5     # one experiment through the trainable
    collapse-sweep evaluate results/dip_sbd/RUN/trials/trial-0003   # what a trained code carries
    collapse-sweep data check /data/BraTS2021           # the data tools: check, prepare, phantom
    collapse-sweep cluster cluster.yaml                 # a Ray cluster file, checked offline
    collapse-sweep demo                                 # collapse against a likelihood in the right units

Each subcommand takes the options of the module it runs (``collapse-sweep run --help``).
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module whose main() runs it, what it does)
COMMANDS = {
    "run": ("sweeps.run", "run or resume a sweep"),
    "train": ("trainables.single_run", "train one experiment through the sweep's trainable"),
    "evaluate": ("vae.evaluate", "score a trained run by what its code carries (evaluation.json)"),
    "data": ("vae.data.__main__", "check, prepare or generate data (check | prepare | phantom)"),
    "cluster": ("trainables.cluster", "check Ray cluster-launcher files offline"),
    "demo": ("vae.demo", "the audited collapse against a likelihood in the right units"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: collapse-sweep COMMAND [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, *rest = argv
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"collapse-sweep {name}") or 0


if __name__ == "__main__":
    sys.exit(main())
