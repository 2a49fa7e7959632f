"""The shape of the most widely copied public SFT scripts: TRL's parser with a YAML recipe, the model loaded by the
script itself, `SFTTrainer` handed the object and `get_peft_config(model_args)`. Knows nothing of qlora-plugin.

    python public_recipe_sft.py --config recipe.yaml [--strategy qlora]
"""

import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config


def kbit_device_map():
    """What `trl.get_kbit_device_map()` returned before TRL removed it: this rank's GPU, or None."""
    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def main(script_args, training_args, model_args):
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    print(f"script sees: load_in_4bit={model_args.load_in_4bit} use_peft={model_args.use_peft} "
          f"lora_r={model_args.lora_r} lora_alpha={model_args.lora_alpha} "
          f"quantization_config={quantization_config is not None}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation,
        use_cache=False, quantization_config=quantization_config,
        device_map=kbit_device_map() if quantization_config is not None else None,
    )
    print(f"script loaded: 4bit={getattr(model, 'is_loaded_in_4bit', False)} use_cache={model.config.use_cache}",
          flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dataset = load_dataset(script_args.dataset_name)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset[script_args.dataset_train_split],
                         processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
