"""A reward-model script that loads its classifier itself (the shape of TRL's older `reward_modeling.py`): parse
with TrlParser, `AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`, then RewardTrainer with
`get_peft_config`. Under `--strategy qlora` it must train the 4-bit classifier unchanged."""

from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trl import ModelConfig, RewardConfig, RewardTrainer, ScriptArguments, TrlParser, get_peft_config

if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, RewardConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = load_dataset(script_args.dataset_name)
    trainer = RewardTrainer(model=model, args=training_args, processing_class=tokenizer,
                            train_dataset=dataset[script_args.dataset_train_split],
                            peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(training_args.output_dir)
