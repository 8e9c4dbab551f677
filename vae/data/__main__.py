"""Check BraTS-style NIfTI data, prepare a preprocessed cache, or write a phantom data set.

``python -m vae.data {check,prepare,phantom} ...``; every error is reported on stderr, one
line per problem, with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .cache import MANIFEST, prepare
from .checks import check
from .discovery import MODALITIES, DataError, canonical_modalities, discover
from .preprocess import PreprocessParams

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "collapse-sweep data") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_source(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("root", type=Path, help="directory of BraTS 2020/2021/2023-named cases, or a CSV manifest")
        sub.add_argument("--modalities", nargs="+", default=list(MODALITIES),
                         help="channels, in order (2021 names allowed)")
        sub.add_argument("--workers", type=int, default=1, help="processes (default 1)")

    sub = commands.add_parser("check", help="report every problem with the input, one line each")
    add_source(sub)
    sub.add_argument("--require-seg", action="store_true", help="a missing segmentation is a problem")

    sub = commands.add_parser("prepare", help="check, then preprocess every subject into a float16 .npy cache")
    add_source(sub)
    sub.add_argument("--out", type=Path, required=True, help="cache directory")
    sub.add_argument("--size", type=int, required=True, help="output edge N of the [C, N, N, N] arrays")
    sub.add_argument("--mode", choices=("fit", "spacing"), default="fit",
                     help="fit: crop to the brain, pad to a cube, resample (default); "
                          "spacing: resample to --spacing, then crop/pad")
    sub.add_argument("--spacing", type=float, nargs="+", default=[1.0], help="output voxel size in mm (mode spacing)")
    sub.add_argument("--clip", type=float, default=5.0, help="clip z-scores to [-clip, clip] (default 5)")
    sub.add_argument("--skip-bad", action="store_true", help="leave bad subjects out instead of failing")
    sub.add_argument("--factors", type=Path, metavar="CSV",
                     help="factors to add or override: a 'subject' column and numeric columns (e.g. a phantom's "
                          "factors.csv); the segmentations' factors are recorded anyway")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = commands.add_parser("phantom", help="write a BraTS-named phantom data set with known factors")
    sub.add_argument("out", type=Path)
    sub.add_argument("--n", type=int, required=True, help="number of subjects")
    sub.add_argument("--size", type=int, required=True, help="volume edge in voxels")
    sub.add_argument("--naming", choices=("brats2021", "brats2023"), default="brats2021")
    sub.add_argument("--anatomy", choices=("mni", "procedural"), default="mni",
                     help="MNI152 tissue maps (of the pinned nilearn) or analytic ellipsoids")
    sub.add_argument("--vary", choices=("all", "tumour"), default="all")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--pin", nargs="+", default=[], metavar="FACTOR=VALUE",
                     help="hold factors fixed, e.g. tumour_present=false noise_sigma=0.02 (values read as YAML)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_pins(items: Sequence[str]) -> dict:
    """``["noise_sigma=0.02", "rotation_deg=[0, 0, 5]"]`` -> ``{"noise_sigma": 0.02, "rotation_deg": [0, 0, 5]}``."""
    import yaml

    pins = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--pin '{item}': expected FACTOR=VALUE, e.g. noise_sigma=0.02")
        pins[name] = yaml.safe_load(text)
    return pins


def run_check(args: argparse.Namespace) -> int:
    modalities = canonical_modalities(args.modalities)
    problems = check(args.root, modalities, args.require_seg, args.workers)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) under {args.root}", file=sys.stderr)
        return EXIT_BAD_INPUT
    count = len(discover(args.root, modalities, args.require_seg))
    print(f"ok: {count} subjects under {args.root}, no problems (modalities {' '.join(modalities)})")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
    params = PreprocessParams(args.size, args.mode, tuple(spacing), args.clip, tuple(args.modalities))
    manifest = prepare(args.root, args.out, params, args.workers, args.skip_bad, progress=not args.quiet,
                       factors_csv=args.factors)
    for subject_id, problems in manifest.skipped.items():
        for problem in problems:
            print(f"skipped {subject_id}: {problem}", file=sys.stderr)
    built = len(manifest.entries) - len(manifest.reused)
    print(
        f"{len(manifest.entries)} subjects in {args.out / MANIFEST} ({built} prepared, {len(manifest.reused)} reused, "
        f"{len(manifest.skipped)} skipped); shape {list(manifest.shape)}, params {manifest.params.hash}"
    )
    if manifest.without_factors:
        print(f"note: {len(manifest.without_factors)} subject(s) have neither a segmentation nor a row of "
              f"--factors (e.g. {manifest.without_factors[0]}): no tumour factors to evaluate a code against")
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    try:  # imported here so that check and prepare never depend on the generator
        from .phantom import write_phantom_dataset
    except ImportError as err:
        raise DataError(f"the phantom generator is not available ({err})") from None
    out = write_phantom_dataset(
        args.out, args.n, args.size, naming=args.naming, anatomy=args.anatomy, vary=args.vary,
        seed=args.seed, pin=parse_pins(args.pin), progress=not args.quiet,
    )
    print(f"wrote {args.n} phantom subjects to {out}")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "collapse-sweep data") -> int:
    args = build_parser(prog).parse_args(argv)
    command = {"check": run_check, "prepare": run_prepare, "phantom": run_phantom}[args.command]
    try:
        return command(args)
    except (DataError, ValueError, OSError) as err:
        # Problems naming their file read "FILE: problem", like the lines of the check report.
        named = isinstance(err, DataError) and err.path is not None
        print(str(err) if named or "\n" in str(err) else f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
