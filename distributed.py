"""Processes and devices: `--device 0,1,...` re-launches the script under torchrun, one process per id.

We use torch's own launcher rather than a hand-written spawn, so `torchrun`, `deepspeed` and
`accelerate launch` all end up in the same code path (they set RANK / WORLD_SIZE / LOCAL_RANK).
Without a GPU the ids still give that many CPU processes over gloo.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # DeepSpeed would otherwise warn on every import that it fell back to CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_flags(local: int, world_size: int = 0, rank_offset: int = 0, master_addr: str = "127.0.0.1",
                   master_port: int | None = None) -> list[str]:
    """torchrun's flags for `local` processes here, from the original's multi-machine flags: a
    --world_size above `local` means world_size / local machines, this one starting at global rank
    --rank_offset (the original's meaning), meeting at --master_addr:--master_port."""
    from common import UserError

    world_size = world_size or local
    if world_size < local or world_size % local or rank_offset % local or not 0 <= rank_offset < world_size:
        raise UserError(f"--world_size {world_size} / --rank_offset {rank_offset}: expected a multiple of this machine's "
                        f"{local} process(es) and an offset that is a multiple of {local} below it")
    nodes = world_size // local
    if nodes > 1 and master_port is None:
        raise UserError("--world_size across machines needs --master_port (and --master_addr of the rank-0 machine)")
    flags = ["--nproc_per_node", str(local), "--master_port", str(master_port or free_port())]
    if nodes > 1:
        flags += ["--nnodes", str(nodes), "--node_rank", str(rank_offset // local), "--master_addr", master_addr]
    return flags


def check_devices(devices: list[str]) -> None:
    """GPU ids must name GPUs this machine has; without a GPU, ids only count CPU processes, so
    they must be 0,1,...,n-1 (anything else is a typo or a machine mix-up)."""
    from common import UserError

    ids = [int(d) for d in devices]
    if torch.cuda.is_available():
        missing = [i for i in ids if i >= torch.cuda.device_count()]
        if missing:
            raise UserError(f"--device: GPU {missing[0]} does not exist here ({torch.cuda.device_count()} visible)")
    elif ids and sorted(ids) != list(range(len(ids))):
        raise UserError(f"--device {','.join(devices)}: this machine has no GPU; use cpu, or 0,1,...,n-1 for n CPU processes")
    if len(set(ids)) != len(ids):
        raise UserError(f"--device {','.join(devices)}: an id appears twice")


def relaunch_if_needed(devices: list[str], **launch) -> None:
    """With several processes to run and no launcher around us, run this same command under torchrun
    and exit. `launch`: the multi-machine flags of torchrun_flags."""
    local = max(1, len(devices))
    if "WORLD_SIZE" in os.environ or (local == 1 and (launch.get("world_size") or 1) <= 1):
        if len(devices) == 1 and torch.cuda.is_available():
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", devices[0])
        return
    env = dict(os.environ)
    if torch.cuda.is_available() and devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(local, **launch), sys.argv[0], *sys.argv[1:]]
    print("launching:", " ".join(command[1:]), flush=True)
    sys.exit(subprocess.call(command, env=env))


def start(devices: list[str]) -> None:
    """A script's first step: re-launch per device if needed, then join the process group."""
    relaunch_if_needed(devices)
    init_process_group()


def ensure_single_process_env() -> None:
    """DeepSpeed looks for MPI when no launcher set these; one process needs them spelled out."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group() -> None:
    """Join the process group when launched with several processes (no-op for one)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend=backend)


def gather_to_main(obj):
    """Every rank's object, as a list on rank 0 (None elsewhere)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def script_main(arguments_class, run, relaunch: bool = False):
    """Entry point of a model-running script: parse its flags, start its processes (`relaunch`: under
    torchrun when --device names several ids), run; bad input ends in one `error:` line, exit 2."""
    from args import device_list, parse
    from common import cli_main

    @cli_main
    def main() -> None:
        args = parse(arguments_class)
        devices = device_list(args.device)
        check_devices(devices)
        if relaunch:
            launch = {name: getattr(args, name) for name in ("world_size", "rank_offset", "master_addr", "master_port")
                      if hasattr(args, name)}
            relaunch_if_needed(devices, **launch)
        else:
            start(devices)
        run(args)

    return main
