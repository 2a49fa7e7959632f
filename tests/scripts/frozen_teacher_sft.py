"""A script that loads more than the model it trains: a frozen teacher first (another folder), then the student
from --model_name_or_path, then a frozen reference copy of the student. Only the student is trained."""

from dataclasses import dataclass

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config


@dataclass
class TeacherArguments:
    teacher_model_name_or_path: str = ""


script_args, training_args, model_args, teacher_args = TrlParser(
    (ScriptArguments, SFTConfig, ModelConfig, TeacherArguments)).parse_args_and_config()
teacher = AutoModelForCausalLM.from_pretrained(teacher_args.teacher_model_name_or_path, dtype=torch.float32).eval()
student = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                               quantization_config=get_quantization_config(model_args))
reference = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32).eval()
for name, model in (("teacher", teacher), ("student", student), ("reference", reference)):
    print(f"script loaded {name}: 4bit={getattr(model, 'is_loaded_in_4bit', False)} dtype={model.dtype}", flush=True)
trainer = SFTTrainer(model=student, args=training_args,
                     train_dataset=load_dataset(script_args.dataset_name)[script_args.dataset_train_split],
                     peft_config=get_peft_config(model_args))
trainer.train()
trainer.save_model(training_args.output_dir)
