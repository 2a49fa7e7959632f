"""`qlora-plugin tiny-model`, the first experiment a new user makes: flags in the order users type them, and a
tokenizer with a chat template so chat `messages` data trains (issue 16, item 5)."""

from __future__ import annotations

import json

import pytest

from conftest import DATA, TRAIN_FLAGS, run_command, run_python


def chat_rows(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()[:count]]
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]


@pytest.mark.slow
def test_chat_data_trains_on_a_tiny_model_built_with_data_before_out(tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat_rows(64)))
    proc = run_command(["qlora-plugin", "tiny-model", "--data", "chat/train.jsonl", "tiny", "--hidden-size", "64"],
                       tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["tiny llama model and tokenizer written to tiny (the tokenizer has a chat "
                                        "template: `messages` data trains too)"]  # nothing else, no blank lines
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", "tiny", "--dataset_name", "chat",
                       "--output_dir", "out", "--strategy", "qlora", *TRAIN_FLAGS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "out" / "qlora_plugin_report.json").read_text())["measured"]["steps"] == 3


def test_data_is_repeatable_and_chat_turns_feed_the_tokenizer(tmp_path):
    from qlora_plugin.cli import make_parser
    from qlora_plugin.models.tiny_model import _corpus

    args = make_parser().parse_args(["tiny-model", "--data", "a.jsonl", "out", "--data", "b.jsonl"])
    assert args.out == "out" and args.data == ["a.jsonl", "b.jsonl"]
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat_rows(1)[0]) + "\n")
    assert _corpus([str(tmp_path / "chat.jsonl")]) == ["<|user|> What color is orange? <|assistant|>  orange"]
