"""`bagel-titan`: train from a TOML file with --section.key overrides."""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from bagel_titan.config.manager import load_job_config, main_help, to_toml
from bagel_titan.errors import UserError


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        if "-h" in argv or "--help" in argv:
            sys.stdout.write(main_help(argv))
            return 0
        job_config, plugins = load_job_config(argv)
        if job_config.job.print_config:
            sys.stdout.write(to_toml(job_config))
            return 0
        from bagel_titan.distributed.utils import destroy_distributed
        from bagel_titan.trainer import Trainer

        trainer = Trainer(job_config, plugins)
        try:
            trainer.train()
        finally:
            trainer.close()
            destroy_distributed()
    except UserError as exc:  # user mistakes print one clear line, not a traceback
        print(f"bagel-titan: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
