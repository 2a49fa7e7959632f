"""Where one CPU training step's bytes go, in process (a benchmark: prints figures; docs/plan.md, "Where the bytes
go"): the trainer TRL builds with `--strategy qlora` (peft's start), two training steps under bf16 autocast, each
with the peak of its live torch tensors (`memory_probe_hooks.Live`: every storage an op creates, followed until
freed) beside the process's resident set before it and at its peak, and the plan's components for the same shape.

    python examples/bench/step_memory.py HIDDEN LAYERS SEQ BATCH                    # glibc's defaults
    qlora-plugin run -- python examples/bench/step_memory.py 1024 8 512 4           # glibc tuned, as training should run

The model is examples/bench/plan_grid.py's (Llama-shaped, intermediate 3 x hidden, hidden / 64 heads, tiny vocabulary);
the optimizer's step is not run (its state is the plan's exact `optimizer` term).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # real_model

import torch  # noqa: E402

import plan_grid  # noqa: E402
from memory_probe_hooks import Live, hwm, rss  # noqa: E402


def main() -> None:
    hidden, layers, seq, batch = (int(a) for a in sys.argv[1:5])
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.plan.estimate import PlanSettings, make_plans, running_malloc_mode

    path = plan_grid.model(hidden, layers, max(4, hidden // 64), 3 * hidden, 0)
    data = load_dataset("json", data_files=plan_grid.dataset() + "/train.jsonl", split="train")
    args = SFTConfig(output_dir=os.path.join(plan_grid.CACHE, "step-memory"), max_length=seq, use_cpu=True,
                     per_device_train_batch_size=batch, report_to="none", max_steps=1, dataset_text_field="text",
                     padding_free=False)
    trainer = make_trainer("qlora", {"init_lora_weights": "default"}, model=path, args=args, train_dataset=data)
    model = trainer.model
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train() does
    trainer.model_wrapped, trainer.current_gradient_accumulation_steps = model, 1
    for step in range(2):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, live = rss(), Live()
        with live, torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the forward in
            trainer.training_step(model, inputs)
        print(f"step {step}: live torch tensors peak {live.peak / 2**20:.1f} MiB; resident set before "
              f"{before / 2**20:.0f} MiB, at the step's peak {hwm() / 2**20:.0f} MiB", flush=True)
    settings = PlanSettings(batch_size=batch, seq_len=seq, device="cpu", malloc=running_malloc_mode())
    plan = make_plans(path, ["qlora"], settings, {"init_lora_weights": "default"})[0]
    c = plan.components
    transients = c["gradients"] + c["activations"] + c["loss"]
    print(f"plan ({settings.malloc} malloc): step transients {transients / 2**20:.1f} MiB, allocator "
          f"{c['allocator'] / 2**20:.1f} MiB; components MiB " +
          ", ".join(f"{k} {v / 2**20:.1f}" for k, v in c.items()))


if __name__ == "__main__":
    main()
