"""A DPO script in the alignment handbook's shape (`scripts/run_dpo.py` / `scripts/dpo.py`): parse with TrlParser,
load the policy itself with `AutoModelForCausalLM.from_pretrained(**model_kwargs)` (dtype, `use_cache` off under
gradient checkpointing, TRL's `get_quantization_config` and the handbook's `get_kbit_device_map`), no reference
model when training PEFT (`ref_model = None if model_args.use_peft`), then DPOTrainer with `get_peft_config`. Under
`--strategy qlora` it must train the paper's 4-bit setup whole."""

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config


def get_kbit_device_map():
    """The handbook's helper (older TRL exported it): each process's own GPU, none on CPU."""
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    model_kwargs = dict(
        revision=model_args.model_revision, attn_implementation=model_args.attn_implementation, dtype=dtype,
        use_cache=not training_args.gradient_checkpointing,
        device_map=get_kbit_device_map() if quantization_config is not None else None,
        quantization_config=quantization_config,
    )
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    ref_model = None if model_args.use_peft else AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dataset = load_dataset(script_args.dataset_name)
    trainer = DPOTrainer(model, ref_model, args=training_args, train_dataset=dataset[script_args.dataset_train_split],
                         processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(training_args.output_dir)
