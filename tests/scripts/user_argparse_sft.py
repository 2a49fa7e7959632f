"""A user's own SFT script: plain argparse, builds SFTTrainer itself, knows nothing of qlora-plugin."""

import argparse

from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, report_to="none",
                   use_cpu=True, logging_steps=1, save_strategy="no", max_length=64)
trainer = SFTTrainer(model=args.model, args=config, train_dataset=load_dataset(args.data)["train"])
trainer.train()
trainer.save_model(args.out)
