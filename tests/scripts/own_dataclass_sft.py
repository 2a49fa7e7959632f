"""A user's script with its own argument dataclass (no TRL ModelConfig, no --model_name_or_path) that loads a
concrete model class itself and hands the object to SFTTrainer. Knows nothing of qlora-plugin."""

from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import HfArgumentParser, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer


@dataclass
class Paths:
    model_path: str = field(metadata={"help": "Model folder."})
    data: str = field(metadata={"help": "Dataset folder."})


paths, config = HfArgumentParser((Paths, SFTConfig)).parse_args_into_dataclasses()
model = LlamaForCausalLM.from_pretrained(paths.model_path, dtype=torch.float32)
print(f"script loaded: 4bit={getattr(model, 'is_loaded_in_4bit', False)}", flush=True)
trainer = SFTTrainer(model=model, args=config, train_dataset=load_dataset(paths.data)["train"])
trainer.train()
trainer.save_model(config.output_dir)
