"""PatchDataModule under real DDP: two CPU processes (gloo) started by Lightning's ddp_spawn."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from spadkit.data import PatchDataModule

    store, out = sys.argv[1], sys.argv[2]

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append({"position": [batch["stream"]["epoch"][0], batch["stream"]["index"][0]], "cases": batch["case_id"]})
            return (self.weight - batch["image"].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_train_end(self):
            with open(f"{out}/rank{self.global_rank}.json", "w") as f:
                json.dump({"seen": self.seen, "world": self.trainer.world_size}, f)

    if __name__ == "__main__":
        data = PatchDataModule([store], patch_size=8, batch_size=2, samples_per_case=2, num_threads=0, intensity="none")
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Recorder(), data)
    """
)


def test_two_ddp_ranks_get_equal_batches_and_disjoint_cases(uniform_store, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), uniform_store.url, str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world"] == 2 for rank in ranks)
    seen = [rank["seen"] for rank in ranks]
    assert len(seen[0]) == len(seen[1]) > 0  # unequal counts would hang NCCL
    assert [b["position"][1] for b in seen[0]] == list(range(len(seen[0])))
    visits = [{case for batch in rank for case in batch["cases"]} for rank in seen]
    assert visits[0].isdisjoint(visits[1])
    assert visits[0] | visits[1] == set(uniform_store.cases)
