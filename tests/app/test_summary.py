"""The run summary's throughput: the rate after the first batch is told apart from the first's warm-up."""

import time

import lightning as L
import torch

from lightning_slide.app.summary import RunSummary


class _SlowFirstBatch(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            time.sleep(0.5)  # as a first step that warms up does
        return self.layer(batch["input_ids"].float()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_rate_after_the_first_batch():
    batches = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}] * 5
    summary = RunSummary()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[summary],
    )
    trainer.fit(_SlowFirstBatch(), torch.utils.data.DataLoader(batches, batch_size=None))
    assert summary.tokens == 40 and summary.first_tokens == 8 and summary.first_seconds >= 0.5
    after_first = summary.tokens_per_second_after_first
    assert after_first == 32 / (summary.seconds - summary.first_seconds) and after_first > 2 * summary.tokens_per_second
    (line,) = [line for line in summary.report(None, None, None) if line.startswith("throughput")]
    assert f"{after_first:,.0f} after the first batch" in line, line


def test_one_batch_has_no_rate_after_it():
    summary = RunSummary()
    summary.seconds, summary.tokens, summary.steps = 1.0, 8, 1
    assert summary.tokens_per_second_after_first is None
    assert "after the first" not in " ".join(summary.report(None, None, None))
