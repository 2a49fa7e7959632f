"""What each TRL trainer runs beside SFT's one forward and backward, for `plan --trainer` and `--memory_budget`.

Read from TRL 1.16's trainers (`trl/trainer/{dpo,kto,reward,grpo,rloo}_trainer.py`):

- DPO: chosen and rejected are concatenated into one batch, so every forward is on 2 x batch rows of up to
  `max_length` (prompt + completion) tokens. The reference is a no-grad forward of the same 2 x batch rows with the
  adapter disabled (`use_adapter(model, None)`), run *after* the policy's forward and before its backward: its
  transient sits beside the policy's saved activations. Through TRL's fused LM head it materialises per-token
  log-probs only (never the logits); what it adds is its forward transient (the decoder stack's, or the head's
  tiles beside the last hidden states, `activations.eval_transient`) beyond the backward's own.
  `precompute_ref_log_probs` moves it before training (a no-grad pass over the data beside the weights only).
- KTO: batch rows (unpaired), a no-grad KL forward of batch rows before the policy's, then the reference forwards
  (KL rows and completion rows, one after the other) beside the policy's saved activations: as DPO at 1 x batch.
- Reward: chosen and rejected concatenated (2 x batch rows) through a sequence-classification model: no LM head
  (its one-output `score` head), no reference.
- GRPO / RLOO: once every `steps_per_generation` steps, `model.generate` samples `max_completion_length` tokens for
  the whole generation batch (batch x steps_per_generation rows per device: `num_generations` completions per
  prompt, so batch x steps_per_generation / num_generations prompts), with gradient checkpointing switched off
  (`unwrap_model_for_generation`) so the KV cache is used: layers x 2 x rows x kv_heads x head_dim x (prompt +
  completion) in the compute dtype, and the prefill's forward transient over the prompts. This runs before the
  step's forward, with no activations or gradients alive, so it raises the peak only by what it holds beyond the
  step's transients. The reference (`beta != 0`: RLOO's default 0.05, GRPO's default 0.0 has none) is a no-grad
  forward in chunks of batch rows of prompt + completion tokens, also before the step's forward. The training
  step is SFT's at batch rows of prompt + completion tokens.

Each pass is its own component of the plan (`reference`, `generation`): what it adds to the step's peak (often
nothing for the reference: with gradient checkpointing the backward's recomputed layer holds more), with the pass's
own bytes in the plan's details. Measured against real CPU runs in docs/plan.md ("Other trainers").
"""

from __future__ import annotations

import dataclasses

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.plan.activations import eval_transient
from qlora_plugin.plan.budget import peaks
from qlora_plugin.plan.estimate import Plan, PlanSettings, plan_strategy
from qlora_plugin.plan.skeleton import skeleton

TRAINERS = ("sft", "dpo", "kto", "reward", "grpo", "rloo")
PAIRED = ("dpo", "reward")  # chosen + rejected concatenated: 2 rows per sample
GENERATES = ("grpo", "rloo")
REFERENCE_DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "grpo": 0.0, "rloo": 0.05}  # TRL 1.16's config defaults
TRL_MAX_COMPLETION = 512  # GRPOConfig / RLOOConfig `max_completion_length`
TRL_NUM_GENERATIONS = {"grpo": 8, "rloo": 2}
# per sampled token: the logits row in the compute dtype, its fp32 copy, the temperature-scaled copy and the
# probabilities `generate` samples from (transformers' sampling path), per row x vocabulary entry
DECODE_BYTES_PER_LOGIT = 16


@dataclasses.dataclass(frozen=True)
class TrainerPasses:
    """A trainer's passes. None means TRL 1.16's default for the trainer."""

    kind: str = "sft"
    beta: float | None = None
    precompute_ref: bool = False
    max_completion_length: int | None = None  # grpo/rloo
    num_generations: int | None = None  # grpo/rloo
    steps_per_generation: int = 1  # grpo/rloo; TRL's default is gradient_accumulation_steps

    def __post_init__(self):
        if self.kind not in TRAINERS:
            raise QLoRAPluginError(f"`--trainer {self.kind}` is not modelled by plan. Use one of "
                                   f"{', '.join(TRAINERS)}.")
        for name in ("max_completion_length", "num_generations", "steps_per_generation"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise QLoRAPluginError(f"`--{name}` must be a positive integer; got {value!r}.")

    @property
    def has_reference(self) -> bool:
        if self.kind not in REFERENCE_DEFAULT_BETA or self.precompute_ref:
            return False
        beta = REFERENCE_DEFAULT_BETA[self.kind] if self.beta is None else self.beta
        return beta != 0.0 or self.kind in ("dpo", "kto")  # DPO and KTO always score against the reference

    def rows(self, batch: int) -> int:
        """Rows of each forward for a per-device batch of `batch` samples."""
        return 2 * batch if self.kind in PAIRED else batch

    def completion(self) -> int:
        return self.max_completion_length or TRL_MAX_COMPLETION

    def trained_len(self, seq_len: int) -> int:
        """Tokens per trained row: `seq_len` (TRL's `max_length`), or prompt (`seq_len`) + completion for grpo/rloo."""
        return seq_len + self.completion() if self.kind in GENERATES else seq_len

    def check(self, batch: int) -> None:
        generations = self.num_generations or TRL_NUM_GENERATIONS.get(self.kind, 1)
        if self.kind in GENERATES and (batch * self.steps_per_generation) % generations:
            raise QLoRAPluginError(
                f"The generation batch (batch {batch} x steps_per_generation {self.steps_per_generation}) must be a "
                f"multiple of num_generations {generations}, as TRL requires. Change one of them.")


def passes_for_args(kind: str, args) -> TrainerPasses:
    """The passes of a training run, from its TRL config (`args`)."""
    if kind not in GENERATES:
        return TrainerPasses(kind, getattr(args, "beta", None), bool(getattr(args, "precompute_ref_log_probs", False)))
    return TrainerPasses(kind, args.beta, False, args.max_completion_length, args.num_generations,
                         args.steps_per_generation or args.gradient_accumulation_steps)


def planner(passes: TrainerPasses | None, args=None):
    """The plan function for `estimate.make_plans` / `predict_for_run` under `passes` (None: SFT's). With a
    training run's `args`, its settings go through `run_settings` first."""
    if passes is None or passes.kind == "sft":
        return None

    def plan(config, name, strategy, options, settings, pm=None):
        if args is not None:
            settings = run_settings(settings, args, passes)
        return plan_trainer(config, name, strategy, options, settings, passes, pm)

    return plan


def peaks_for(passes: TrainerPasses | None):
    """The `trainer_peaks` argument of `budget.choose` under `passes` (None: SFT's)."""
    if passes is None or passes.kind == "sft":
        return None

    def trainer_peaks_of(config, name, strategy, options, settings, pm=None, in_use=None):
        return trainer_peaks(config, name, strategy, options, settings, passes, pm, in_use)

    return trainer_peaks_of


def run_settings(settings: PlanSettings, args, passes: TrainerPasses) -> PlanSettings:
    """A training run's plan settings for its trainer: for grpo/rloo the prompt's tokens, which TRL's configs do
    not bound (the run's prompts decide), so no prediction is made for them."""
    if passes.kind in GENERATES:
        raise QLoRAPluginError(
            f"{passes.kind.upper()}Config bounds no prompt length (the prompts decide it), so the plan cannot size "
            f"its batches: plan it with `qlora-plugin plan MODEL --trainer {passes.kind} --seq-len PROMPT_TOKENS`.")
    return settings


def plan_trainer(config, name: str, strategy, options, settings: PlanSettings, passes: TrainerPasses,
                 pm=None) -> Plan:
    """`estimate.plan_strategy` for the trainer's step (its rows and tokens), plus its reference and generation
    passes as components. `settings.batch_size` is samples per device (DPO pairs, GRPO completions); for grpo/rloo
    `settings.seq_len` is the prompt's tokens."""
    if passes.kind == "sft":
        return plan_strategy(config, name, strategy, options, settings, pm)
    passes.check(settings.batch_size)
    options = _start_for(options, passes)
    rows, seq = passes.rows(settings.batch_size), passes.trained_len(settings.seq_len)
    inner = dataclasses.replace(settings, batch_size=rows, eval_batch_size=passes.rows(settings.eval_batch_size),
                                seq_len=seq)
    plan = plan_strategy(config, name, strategy, options, inner, pm)
    details, components = plan.details, plan.components
    model = skeleton(config, strategy, options, details["compute_dtype"], pm, settings.trust_remote_code,
                     settings.device)
    share = details["allocator_share"]
    # what the step itself holds beyond the resident model and the optimizer state (as `plan_strategy` sums it)
    step = sum(components[k] for k in ("gradients", "activations", "loss", "allocator"))
    details.update(trainer=passes.kind, samples_per_batch=settings.batch_size, forward_rows=rows, tokens_per_row=seq,
                   reference_pass_bytes=0, generation_pass_bytes=0)
    components["reference"] = components["generation"] = 0
    if passes.kind == "reward":
        _as_classifier(model, plan)
        step = sum(components[k] for k in ("gradients", "activations", "loss", "allocator"))
    if passes.has_reference:
        ref = eval_transient(model, rows, seq, settings.device)["total"]
        if passes.kind in ("dpo", "kto"):
            # beside the policy's saved activations and what its fused head keeps, in place of the backward's
            # transient (the recomputed layer and the head's): it adds only what it holds beyond that
            beside = ref + _head_saved(details, rows)
            backward = details["layer_phase_per_sample"] * rows + components["loss"]
            components["reference"] = int((1 + share) * max(beside - backward, 0))
        else:  # before the step's forward: nothing of the step is alive yet
            components["reference"] = max(int((1 + share) * ref) - step, 0)
        details["reference_pass_bytes"] = ref
        details["reference_how"] = _reference_how(passes)
    elif passes.kind in REFERENCE_DEFAULT_BETA:
        details["reference_how"] = ("precomputed before training (precompute_ref_log_probs)" if passes.precompute_ref
                                    else "none (beta=0: no KL term)")
    if passes.kind in GENERATES:
        generation = generation_bytes(model, config, passes, settings, details["compute_dtype"])
        details["generation_pass_bytes"] = generation["total"]
        details["generation"] = generation
        components["generation"] = max(int((1 + share) * generation["total"]) - step
                                       - components["reference"], 0)
    if details["allocator_bytes"] is not None:  # cuda: what the caching allocator holds includes the passes
        details["allocator_bytes"] += components["reference"] + components["generation"]
    details.update(batch_size=settings.batch_size, eval_batch_size=settings.eval_batch_size,
                   eval_rows=inner.eval_batch_size, seq_len=seq)
    return plan


def _start_for(options, passes: TrainerPasses):
    """The adapter's start under this trainer, as `training.trainer_setup.options_for_kind` picks it: peft's zero
    start for the trainers with a reference (a reward model is calibrated on its own batches)."""
    if options.init_lora_weights == "auto" and passes.kind in REFERENCE_DEFAULT_BETA:
        return dataclasses.replace(options, init_lora_weights="default")
    return options


def _head_saved(details: dict, rows: int) -> int:
    """What TRL's fused head keeps from the policy's forward to its backward (the flattened hidden states and
    per-token statistics), alive while the reference runs."""
    head = details.get("head")
    if not head:
        return 0
    from qlora_plugin.plan.loss import fused_loss_bytes

    return fused_loss_bytes(rows * (head["seq_len"] - 1), head["hidden"], head["vocab"], head["hidden_itemsize"],
                            head["compute_itemsize"], head["device"])["saved"]


def _reference_how(passes: TrainerPasses) -> str:
    if passes.kind in ("dpo", "kto"):
        return ("a no-grad forward of the same rows with the adapter disabled, after the policy's forward and "
                "before its backward (beside its saved activations); per-token log-probs only")
    return "a no-grad forward with the adapter disabled, in chunks of the batch, before the step's forward"


def _as_classifier(model, plan: Plan) -> None:
    """A reward model: the LM head and its loss are a one-output `score` head (trained in full: a few KiB)."""
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if head is not None and not tied:
        plan.components["weights"] -= head.weight.numel() * head.weight.element_size()
    plan.step_cost = dataclasses.replace(plan.step_cost, head=None)
    plan.components["allocator"] = plan.step_cost.allocator(plan.details["batch_size"])
    plan.components["loss"] = 0
    stack = plan.details.get("eval_stack_per_sample")
    if stack is not None:  # evaluation: the stack alone, no LM head
        plan.details["eval_activations"] = stack * plan.details["eval_batch_size"]
    plan.details["loss_path"] = "a sequence-classification score head (one output; no LM head)"
    plan.details["head"] = None


def generation_bytes(model, config, passes: TrainerPasses, settings: PlanSettings, compute: str) -> dict:
    """Bytes `model.generate` holds at its peak for the generation batch: the KV cache at prompt + completion
    tokens plus a sampling step's logits, or the KV cache of the prompt plus the prefill's forward transient."""
    import torch

    text = config.get_text_config()
    rows = settings.batch_size * passes.steps_per_generation
    prompt, total = settings.seq_len, settings.seq_len + passes.completion()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    itemsize = torch.empty(0, dtype=getattr(torch, compute)).element_size()
    per_token = text.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
    prefill = eval_transient(model, rows, prompt, settings.device)
    prefill_stack = prefill["stack"] * rows if prefill["stack"] is not None else prefill["total"]
    decode = rows * text.vocab_size * DECODE_BYTES_PER_LOGIT
    kv_full = rows * total * per_token
    total_bytes = max(rows * prompt * per_token + prefill_stack, kv_full + decode)
    return {"total": total_bytes, "rows": rows, "kv_cache_bytes": kv_full, "prefill_bytes": prefill_stack,
            "decode_bytes": decode, "kv_bytes_per_token": per_token, "prompt_tokens": prompt,
            "completion_tokens": passes.completion()}


def passes_line(details: dict) -> str | None:
    """The plan table's line on the trainer's passes (None for SFT)."""
    kind = details.get("trainer")
    if not kind:
        return None
    line = (f"  trainer {kind}: {details['samples_per_batch']} samples -> {details['forward_rows']} rows x "
            f"{details['tokens_per_row']} tokens per forward")
    if details.get("reference_how"):
        line += f"; reference: {details['reference_how']}"
        if details["reference_pass_bytes"]:
            line += f", {details['reference_pass_bytes'] / 2**20:,.1f} MiB"
    generation = details.get("generation")
    if generation:
        line += (f"; generation: {generation['rows']} rows x ({generation['prompt_tokens']} prompt + "
                 f"{generation['completion_tokens']} completion) tokens, KV cache "
                 f"{generation['kv_cache_bytes'] / 2**20:,.1f} MiB, peak {generation['total'] / 2**20:,.1f} MiB")
    return line


@dataclasses.dataclass
class TrainerPeaks:
    """`budget.Peaks` for another trainer: SFT's step at the trainer's rows and tokens (`base`, a function of
    rows), plus its reference and generation components, linear in the batch between the plans at 1 and 2."""

    base: object  # budget.Peaks over rows of `tokens_per_row`
    passes: TrainerPasses
    extra_one: int
    extra_two: int

    def offset(self) -> int:
        return self.base.offset()

    @property
    def margin(self) -> float:
        return self.base.margin

    def extra(self, batch: int) -> int:
        return max(self.extra_one + (batch - 1) * (self.extra_two - self.extra_one), 0)

    def train(self, batch: int) -> int:
        return self.base.train(self.passes.rows(batch)) + self.extra(batch)

    def eval(self, batch: int, train_batch: int = 1) -> int:
        return self.base.eval(self.passes.rows(batch), self.passes.rows(train_batch))


def trainer_peaks(config, name, strategy, options, settings: PlanSettings, passes: TrainerPasses, pm=None,
                  in_use: int | None = None):
    """(`TrainerPeaks`, the plan function `budget` names its levers with) for `--memory_budget` under `passes`.
    A reward model has no LM head: its step is priced without the head's term."""
    options = _start_for(options, passes)
    rows_settings = dataclasses.replace(settings, seq_len=passes.trained_len(settings.seq_len))
    base = peaks(config, name, strategy, options, rows_settings, pm, in_use)
    if passes.kind == "reward":  # no LM head: the stack alone, in training and in evaluation
        base.head, base.step = None, dataclasses.replace(base.step, head=None)
        base.eval_per_sample = int((1 + base.share) * (base.eval_stack_per_sample or 0)) or base.eval_per_sample
    one, two = (plan_trainer(config, name, strategy, options,
                             dataclasses.replace(settings, batch_size=b, eval_batch_size=b), passes, pm)
                for b in (1, 2))
    extra = [plan.components["reference"] + plan.components["generation"] for plan in (one, two)]
    return TrainerPeaks(base, passes, *extra), planner(passes)
