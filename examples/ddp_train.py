"""DistributedDataParallel with MiTLoss: every rank keeps the same loss state.

    torchrun --nproc_per_node 2 examples/ddp_train.py            # CPU (gloo) or one GPU per rank (nccl)
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import mitkernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else \
        torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(16, 4).to(device), device_ids=[device] if use_cuda else None)
    # The loss state lives outside DDP: process_group makes its statistics global.
    criterion = mitkernels.MiTLoss(4, process_group=dist.group.WORLD).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *criterion.parameters()], lr=0.1)
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank sees its own data
    for _ in range(args.steps):
        x = torch.randn(32, 16, generator=gen).to(device)
        y = torch.randint(0, 4, (32,), generator=gen).to(device)
        optimizer.zero_grad()
        loss, stats = criterion(model(x), y)
        loss.backward()
        optimizer.step()
    # The state is identical on every rank: check it (a host sync is fine here, after training).
    flat = torch.cat([criterion.tau.detach().double().reshape(1), criterion.class_counts,
                      criterion.lambda_entropy.reshape(1)])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks diverged"
    if rank == 0:
        print(f"{world} ranks agree: T={float(criterion.temperature):.4f} "
              f"lambda={float(criterion.lambda_entropy):.4f} "
              f"samples={int(criterion.total_seen)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
