"""Processes and devices: `--device 0,1,...` re-launches the script under torchrun, one process per id.

We use torch's own launcher rather than a hand-written spawn, so `torchrun`, `deepspeed` and
`accelerate launch` all end up in the same code path (they set RANK / WORLD_SIZE / LOCAL_RANK).
Without a GPU the ids still give that many CPU processes over gloo.
"""
from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# torch is imported inside the functions that need it: a script checks its flags and sets CUDA_VISIBLE_DEVICES
# (select_devices) before anything can ask CUDA about its devices.


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


def select_devices(devices: list[str]) -> None:
    """--device ids name physical GPUs: put them in CUDA_VISIBLE_DEVICES, so that process i of the run uses
    cuda:i = GPU devices[i]. This must happen before anything asks CUDA about its devices: the first
    torch.cuda.is_available() initialises the driver, which reads the variable once. A launcher that already
    chose this process's devices (WORLD_SIZE and CUDA_VISIBLE_DEVICES set, e.g. `deepspeed --include`) keeps them."""
    if not devices or ("WORLD_SIZE" in os.environ and "CUDA_VISIBLE_DEVICES" in os.environ):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)


def physical_gpu_count() -> int | None:
    """GPUs on this machine whatever CUDA_VISIBLE_DEVICES says, from NVML without initialising CUDA; None when
    NVML cannot tell (no NVIDIA driver, or a torch without that helper)."""
    import torch

    try:
        count = getattr(torch.cuda, "_raw_device_count_nvml", lambda: -1)()
    except OSError:  # no libnvidia-ml: no NVIDIA driver
        return None
    return count if count >= 0 else None


def check_devices(devices: list[str]) -> None:
    """GPU ids must name GPUs this machine has; without a GPU, ids only count CPU processes, so
    they must be 0,1,...,n-1 (anything else is a typo or a machine mix-up). Call after select_devices."""
    import torch

    from common import UserError

    ids = [int(d) for d in devices]
    if len(set(ids)) != len(ids):
        raise UserError(f"--device {','.join(devices)}: an id appears twice")
    physical = physical_gpu_count() if ids else None
    if physical:
        missing = [i for i in ids if i >= physical]
        if missing:
            raise UserError(f"--device: GPU {missing[0]} does not exist here ({physical} GPUs)")
    if ids and torch.cuda.is_available():
        if torch.cuda.device_count() < len(ids):
            raise UserError(f"--device {','.join(devices)}: only {torch.cuda.device_count()} of these GPUs are visible")
    elif ids and sorted(ids) != list(range(len(ids))):
        raise UserError(f"--device {','.join(devices)}: this machine has no GPU; use cpu, or 0,1,...,n-1 for n CPU processes")


def relaunch_if_needed(devices: list[str], **launch) -> None:
    """With several processes to run and no launcher around us, run this same command under torchrun
    and exit. `launch`: the multi-machine flags of torchrun_flags."""
    local = max(1, len(devices))
    if "WORLD_SIZE" in os.environ or (local == 1 and (launch.get("world_size") or 1) <= 1):
        return
    # the workers inherit CUDA_VISIBLE_DEVICES (select_devices): worker i takes cuda:i
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(local, **launch), sys.argv[0], *sys.argv[1:]]
    print("launching:", " ".join(command[1:]), flush=True)
    sys.exit(subprocess.call(command))


def start(devices: list[str]) -> None:
    """A script's first step: re-launch per device if needed, then join the process group."""
    relaunch_if_needed(devices)
    init_process_group()


def ensure_single_process_env() -> None:
    """DeepSpeed looks for MPI when no launcher set these; one process needs them spelled out."""
    quiet_deepspeed_on_cpu()
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def quiet_deepspeed_on_cpu() -> None:
    """Without a GPU, DeepSpeed would warn at every import that it fell back to its CPU accelerator."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group() -> None:
    """Join the process group when launched with several processes (no-op for one)."""
    import torch

    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend=backend)


def gather_to_main(obj):
    """Every rank's object, as a list on rank 0 (None elsewhere)."""
    import torch

    if world_size() == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    import torch

    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def script_main(arguments_class, run: str, relaunch: bool = False) -> Callable[[], None]:
    """Entry point of a model-running script: parse its flags, set its devices, start its processes
    (`relaunch`: under torchrun when --device names several ids), then import `run` ("module:function")
    and call it with the flags. Bad input ends in one `error:` line, exit 2. The run's module (torch,
    transformers, the model code) is imported only after the devices are set."""
    from flags import device_list, parse
    from common import cli_main

    @cli_main
    def main() -> None:
        args = parse(arguments_class)
        devices = device_list(args.device)
        select_devices(devices)
        check_devices(devices)
        if relaunch:
            launch = {name: getattr(args, name) for name in ("world_size", "rank_offset", "master_addr", "master_port")
                      if hasattr(args, name)}
            relaunch_if_needed(devices, **launch)
        else:
            start(devices)
        module, _, function = run.partition(":")
        getattr(importlib.import_module(module), function)(args)

    return main


def _building_in(folder: Path) -> bool:
    """Whether a process works inside `folder` (torch runs an op's ninja build with it as the working
    directory). Without /proc, any lock counts as a build in progress."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(folder):
                    return True
            except OSError:
                continue
    return False


def clear_stale_build_locks(min_age_s: float = 120.0) -> list[Path]:
    """Remove the lock file of a DeepSpeed/torch op build that was killed partway (torch_extensions/<op>/lock):
    torch takes it without recording an owner, so a stale one makes every later run wait on it forever.
    A lock counts as stale when it is older than `min_age_s` and no process is building in its folder."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue
        if age < min_age_s or _building_in(lock.parent.resolve()):
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        print(f"note: removed {lock}, a stale build lock ({age / 60:.0f} min old, no build running): a build "
              f"killed partway leaves it, and every later run would wait on it", flush=True)
    return removed
