"""Vocabulary-parallel cross-entropy on two processes (CPU, gloo):

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Each rank holds its slice of the classes (here of unequal sizes) and gets the loss over the whole
vocabulary and its slice of the gradient; the fused linear head does the same with the
projection's rows sharded. Both are checked against the single-process loss on the whole logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import softmax_ext


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full tensors on every rank
    rows, hidden, vocab = 64, 32, 1000
    logits = torch.randn(rows, vocab)
    target = torch.randint(0, vocab, (rows,))
    # unequal contiguous slices of the vocabulary, ranks in order
    bounds = torch.linspace(0, vocab, world + 1).long().tolist()
    bounds[1:-1] = [b + 7 for b in bounds[1:-1]]
    lo, hi = bounds[rank], bounds[rank + 1]

    # cross-entropy on this rank's slice of the logits
    local = logits[:, lo:hi].clone().requires_grad_()
    loss = softmax_ext.cross_entropy(
        local, target, label_smoothing=0.1, process_group=dist.group.WORLD
    )
    loss.backward()
    full = logits.clone().requires_grad_()
    ref = softmax_ext.cross_entropy(full, target, label_smoothing=0.1)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (loss, ref)
    assert torch.allclose(local.grad, full.grad[:, lo:hi], rtol=1e-4, atol=1e-7)

    # the fused linear head with the projection's rows sharded: the logits never exist
    x = torch.randn(rows, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden) / hidden**0.5
    w_local = weight[lo:hi].clone().requires_grad_()
    lin = softmax_ext.linear_cross_entropy(x, w_local, target, process_group=dist.group.WORLD)
    lin.backward()
    print(
        f"rank {rank}/{world}: classes [{lo}, {hi}), cross_entropy {loss.item():.6f} "
        f"(single process {ref.item():.6f}), linear_cross_entropy {lin.item():.6f}, "
        f"weight-gradient slice {tuple(w_local.grad.shape)}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
