"""Train and evaluate SASRec: `python main.py --config configs/beauty.toml [--flag value ...]`.

The command line: configuration flows one way (config.py): config file -> defaults -> command-line flags,
built once and frozen. The resolved config is written beside every checkpoint, so evaluation and inference
never need the training flags again. The job (data, model, checkpoints, report) is training/run.py; the
loop training/loop.py.
"""
import os
import sys

import distributed
from cli import exits, resolve_device
from config import build_config
from files import release_locks
from training.loop import Interrupted
from training.run import keep_freed_memory, run_job


@exits
def main(argv=None):
    config = build_config(argv)
    keep_freed_memory()
    device = distributed.init(resolve_device(config.train.device))
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # under torchrun rank 0 reports; errors still reach stderr
    try:
        run_job(config, device)
        # Every rank leaves the process group together, after rank 0's report: a rank tearing gloo down
        # while rank 0 still worked aborted now and then ("terminate called without an active exception").
        distributed.barrier()
    except Interrupted as e:
        print(e, flush=True)
        sys.exit(130)
    finally:
        release_locks()
        distributed.shutdown()


if __name__ == "__main__":
    main()
