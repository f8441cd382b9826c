"""`mofe`: one entry point per pipeline stage (what dvc.yaml runs) plus the user commands.

Stage modules are imported only when their command runs: importing torch, kfp,
mlflow and dvc together costs ~10 s, which `mofe --help` should not pay.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

import yaml

# command -> (module, help). Each stage module has run(params, ...) with default paths.
STAGES = {
    "prepare": ("mofe_ood.prepare", "build the ID splits and OOD sets under data/prepared"),
    "extract": ("mofe_ood.extract", "frozen-backbone features under data/features"),
}


def parse_set(items: list[str]) -> dict:
    """`--set a.b=1` pairs -> a nested override dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mofe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a param for this run only (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    from mofe_ood import params as params_mod

    try:
        params = params_mod.merged(params_mod.load(args.params), parse_set(args.set))
        module = importlib.import_module(STAGES[args.command][0])
        result = module.run(params)
    except (params_mod.ParamError, FileNotFoundError, ConnectionError, ValueError) as err:
        # Bad input is the user's to fix: one clear line, no stack trace.
        print(f"mofe {args.command}: error: {err}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in (result or {}).items() if k != "splits"}
    if isinstance(result, dict) and "splits" in result:
        summary["splits"] = {k: v.get("count") for k, v in result["splits"].items()}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
