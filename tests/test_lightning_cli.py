"""LightningCLI builds MultimodalLMModule from a YAML: --print_config and a 2-step fit."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from mllm_metrics.demo import make_multimodal_batch  # noqa: E402
from mllm_metrics.lightning import MultimodalLMModule  # noqa: E402

# Lightning 2.6 calls jsonargparse APIs that 4.49+ deprecates: theirs to update, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")


class TinyImageData(pl.LightningDataModule):
    """Four pre-collated LLaVA-style batches, for training and validation."""

    def __init__(self, batches: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = [
            make_multimodal_batch(
                [[1, -200, 7], [-200, 8]],
                [[5, 9], [5]],
                torch.rand(2, 1, 8, 8, generator=generator),
            )
            for _ in range(batches)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None)


CONFIG = """\
model:
  model:
    class_path: mllm_metrics.demo.TinyLlavaForCausalLM
    init_args:
      config:
        class_path: mllm_metrics.demo.TinyLlavaConfig
  learning_rate: 0.003
  logits_chunk_size: 4
data:
  batches: 2
seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(
        MultimodalLMModule, TinyImageData, args=args, save_config_kwargs={"overwrite": True}
    )


def test_print_config_lists_the_module_arguments(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    with pytest.raises(SystemExit) as exit_info:
        _cli(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for argument in ("learning_rate: 0.003", "logits_chunk_size: 4", "weight_decay: 0.0"):
        assert argument in printed
    assert "mllm_metrics.demo.TinyLlavaForCausalLM" in printed


def test_a_two_step_fit_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    cli = _cli(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert cli.model.learning_rate == 0.003 and cli.model.logits_chunk_size == 4
    assert cli.model.hparams["learning_rate"] == 0.003
    assert "val/bit_match" in cli.trainer.callback_metrics
    parameters = sum(p.numel() for p in cli.model.model.parameters())
    assert parameters < 1_000_000  # TinyLlavaConfig() is tiny by default
