"""A user's own SFT script parsing SFTConfig with HfArgumentParser (no TRL ModelConfig)."""

from dataclasses import dataclass

from datasets import load_dataset
from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer


@dataclass
class Paths:
    model: str
    data: str


paths, config = HfArgumentParser((Paths, SFTConfig)).parse_args_into_dataclasses()
trainer = SFTTrainer(model=paths.model, args=config, train_dataset=load_dataset(paths.data)["train"])
trainer.train()
trainer.save_model(config.output_dir)
