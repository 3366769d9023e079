"""`python -m megatron_m2d.distillation.megatron --config run.yaml [--flag ...]`: a Megatron distillation run for
launchers (torchrun, srun), with the flags of `m2d distill --backend megatron`."""

from __future__ import annotations

import argparse
import sys

from megatron_m2d.errors import M2DError


def main(argv: list[str] | None = None) -> int:
    from megatron_m2d.cli.convert import require_megatron_core
    from megatron_m2d.distillation.megatron.config import add_run_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m megatron_m2d.distillation.megatron",
                                     description="Distill a dense student from its MoE teacher on Megatron-Core.")
    parser.add_argument("--config", default=None, help="run config file (YAML or JSON); flags override it")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        require_megatron_core()
        from megatron_m2d.distillation.megatron.run import run

        run(config_from_args(args.config, args))
    except M2DError as exc:
        print(f"m2d: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
