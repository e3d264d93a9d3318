"""Worker processes for the distributed tests: gloo on 127.0.0.1."""
import os
import socket
import sys
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(train, world: int, *args) -> None:
    """Runs train(rank, *args) in `world` processes, with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT set (for torch.distributed's env:// and Accelerate); a worker's error fails the call."""
    mp.spawn(_run, args=(train, world, free_port(), args), nprocs=world, join=True)


def _run(rank, train, world, port, args):
    """Ends with os._exit: a gloo worker can abort in interpreter teardown after a clean run. So an
    exception is printed here and turned into exit code 1, which mp.spawn reports as a failure."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        train(rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
