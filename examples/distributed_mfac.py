"""Train a small MLP with M-FAC sharded over ranks (FSDP2 or DDP + ZeRO-1), then checkpoint it.

    torchrun --nproc_per_node 2 examples/distributed_mfac.py              # FSDP2
    torchrun --nproc_per_node 2 examples/distributed_mfac.py --mode ddp   # DDP, ZeRO-1 window

gloo on the CPU, NCCL on GPUs (one GPU per rank), the same script. Each rank trains on its own
slice of a synthetic regression data set and keeps only its share of M-FAC's gradient window
(``m * d / P`` numbers); a step all-reduces ``m`` numbers for the window's dot products. At the
end the model and optimizer are saved with ``torch.distributed.checkpoint`` and loaded back
(they load at any world size as well).
"""

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from curvopt.optim import MFAC


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--m", type=int, default=16, help="M-FAC window size")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial model and data on every rank

    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 4)).to(device)
    X = torch.randn(1024, 32, device=device)
    Y = torch.sin(X[:, :4]) + 0.1 * torch.randn(1024, 4, device=device)
    mine = slice(rank * len(X) // world, (rank + 1) * len(X) // world)

    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh(device.type if cuda else "cpu", (world,)))
        net = model
        opt = MFAC(model.parameters(), lr=0.02, m=args.m, damp=0.1, momentum=0.9)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
        opt = MFAC(
            model.parameters(),
            lr=0.02,
            m=args.m,
            damp=0.1,
            momentum=0.9,
            process_group=dist.group.WORLD,
        )

    for step in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(X[mine]), Y[mine])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {total.item() / world:.4f}")

    d = sum(p.numel() for p in model.parameters())
    print(
        f"rank {rank}: window {tuple(opt.window.G.shape)} of m x d = {args.m} x {d}, "
        f"optimizer memory {opt.memory_bytes() / 1024:.1f} KiB"
    )

    # checkpoint: sharded model and optimizer state, loadable at any world size
    path = [tempfile.mkdtemp(prefix="mfac-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(path)
    state = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
    dcp.save(state, checkpoint_id=path[0])
    state = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
    dcp.load(state, checkpoint_id=path[0])
    model.load_state_dict(state["model"])
    opt.load_sharded_state_dict(state["optim"])
    dist.barrier()
    if rank == 0:
        print(f"saved and reloaded the checkpoint ({path[0]}, now removed)")
        shutil.rmtree(path[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
