"""Code run by spawned gloo ranks in tests: kept apart from the test modules so that a spawned rank
imports torch and the tokenizer only, not Lightning and the test module's imports (seconds per rank)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from spadkit.models.tokenizer import code_entropies


def codebook_usage_on_rank(rank: int, world: int, port: int, results) -> None:
    """Rank ``rank`` of ``world``: its tokens all pick code ``rank``; ``results[rank]`` = the gathered usage (nats)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits = torch.full((1, 4, 2, 1, 1), -10.0)
        logits[:, rank] = 10.0

        def gather(local: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.contiguous())
            return torch.stack(parts)

        usage, _ = code_entropies(logits, gather)
        results[rank] = float(usage)
    finally:
        dist.destroy_process_group()
