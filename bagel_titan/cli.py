"""`bagel-titan`: train from a TOML file with --section.key overrides.

Exit codes: 0 the run finished (or printed what was asked); 2 a user error (one
`bagel-titan: error: ...` line, no traceback); 128 + N a stop by signal N after the stop
checkpoint (143 for SIGTERM, 130 for SIGINT); 1 anything else (a bug: with its traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Sequence

from bagel_titan.config.manager import load_job_config, main_help, to_toml
from bagel_titan.errors import UserError

EXIT_USER_ERROR = 2
EXIT_SIGNAL_BASE = 128
"""A run stopped by signal N exits with 128 + N, as a shell reports a process killed by N."""


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def _peers_running() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _fail(code: int) -> int:
    """End a failed rank. With peers it exits at once, skipping the interpreter's shutdown (a
    barrier or a thread join would wait on peers that sit in a collective): its closed
    connections make the peers' next collective fail within seconds, and the launcher then ends
    every rank, instead of all of them waiting out the process-group timeout."""
    if _peers_running():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    from bagel_titan.distributed.utils import destroy_distributed

    destroy_distributed(wait_for_peers=False)
    return code


def _peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because a peer process is gone."""
    text = str(exc)
    return any(s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    where = f"rank {os.environ['RANK']}: " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
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
        trainer.train()
        trainer.close()
        destroy_distributed()
        if trainer.stop_signal is not None:
            return EXIT_SIGNAL_BASE + trainer.stop_signal
    except UserError as exc:  # user mistakes print one clear line, not a traceback
        print(f"bagel-titan: error: {where}{exc}", file=sys.stderr)
        return _fail(EXIT_USER_ERROR)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if isinstance(exc, SystemExit):
            raise
        if _peers_running() and _peer_lost(exc):
            print(
                f"bagel-titan: error: {where}another rank stopped (its error is printed above); ending this "
                f"rank too",
                file=sys.stderr,
            )
            return _fail(1)
        traceback.print_exc()  # a bug: the traceback is for the report
        print(f"bagel-titan: internal error: {where}the traceback above is a bug report", file=sys.stderr)
        return _fail(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
