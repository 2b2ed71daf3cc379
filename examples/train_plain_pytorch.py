"""Train titan_cp's debug GDN model with plain PyTorch: torchrun, FSDP2, titan_cp CP. No TorchTitan.

    torchrun --nproc_per_node 2 examples/train_plain_pytorch.py --cp 2            # CPU: gloo, torch kernel
    torchrun --nproc_per_node 4 examples/train_plain_pytorch.py --cp 2 --layout zigzag   # dp 2 x cp 2
    torchrun --nproc_per_node 8 examples/train_plain_pytorch.py --cp 8 --seq-len 65536 --flavor 340M  # GPUs

Ranks form a (dp, cp) grid: every step the global batch of packed rows is split over dp, and
every row along the sequence over cp. FSDP2 shards the parameters over all ranks (CP ranks
hold the same weights) and sums the gradients; each rank's loss is its tokens' summed loss
over the global number of tokens, so the sum over ranks is the global mean. CP = P computes
what one rank computes (up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

import titan_cp


def packed_batches(seq_len: int, rows: int):
    """Endless batches of the shipped corpus: documents [BOS] + text + [EOS] packed into rows.

    Yields tokens [rows, seq_len], labels [rows, seq_len] (-100 where the next token starts
    another document) and doc_starts [rows, seq_len] bool.
    """
    tokenizer = Tokenizer.from_file(str(titan_cp.TOKENIZER_PATH / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id("<|end_of_text|>")
    with open(titan_cp.CORPUS_PATH) as f:
        texts = [json.loads(line)["text"] for line in f]
    stream, starts = [], []
    while True:
        for text in texts:
            doc = [bos, *tokenizer.encode(text).ids, eos]
            stream += doc
            starts += [True] + [False] * (len(doc) - 1)
            while len(stream) >= rows * (seq_len + 1):
                n = rows * (seq_len + 1)
                ids = torch.tensor(stream[:n]).view(rows, seq_len + 1)
                begins = torch.tensor(starts[:n]).view(rows, seq_len + 1)
                del stream[:n], starts[:n]
                labels = ids[:, 1:].masked_fill(begins[:, 1:], -100)
                yield ids[:, :-1], labels, begins[:, :-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="debug")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree (divides the world size)")
    p.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"))
    p.add_argument("--exchange", default="allgather", choices=("allgather", "logscan", "alltoall"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="global batch (rows), divisible by dp")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="rank 0 saves {'losses', 'initial_params', 'params'} here (torch.save)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    world = dist.get_world_size()
    dp = world // args.cp
    grid = init_device_mesh(device.type, (dp, args.cp), mesh_dim_names=("dp", "cp"))
    fsdp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    cp = titan_cp.cp_context(grid, mesh_dim="cp", layout=args.layout, exchange=args.exchange)

    # The same initial weights on every rank (and in a 1-rank run), then CP, then FSDP.
    torch.manual_seed(args.seed)
    config = titan_cp.model_config(args.flavor, kernel="triton" if cuda else "torch")
    model = config.build().to(device)
    model.init_weights()
    titan_cp.make_cp_aware(model, cp)
    for block in model.layers.values():
        fully_shard(block, mesh=fsdp_mesh)
    fully_shard(model, mesh=fsdp_mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum the gradients (plain sum: gloo has no scaled reduce)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    initial = {name: p.full_tensor().detach().cpu().clone() for name, p in model.named_parameters()}
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    dp_rank = grid.get_local_rank("dp")
    rows = args.batch // dp
    losses = []
    for step, (tokens, labels, doc_starts) in zip(range(1, args.steps + 1), packed_batches(args.seq_len, args.batch)):
        n_targets = (labels != -100).sum()  # over the global batch
        mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
        positions = titan_cp.packed_positions(doc_starts[mine])
        tokens, labels, positions = (titan_cp.shard_sequence(x.to(device), cp) for x in
                                     (tokens[mine], labels[mine], positions))
        logits = model(tokens, positions=positions)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum") / n_targets
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item())
        if dist.get_rank() == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)

    params = {name: p.full_tensor().detach().cpu().clone() for name, p in model.named_parameters()}
    if dist.get_rank() == 0 and args.out:
        torch.save({"losses": losses, "initial_params": initial, "params": params}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
