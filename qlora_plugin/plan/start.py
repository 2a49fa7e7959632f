"""The LoftQ starts' transient memory, for `plan`: held while the adapter's start is computed, freed before the first
step (`strategies/loftq.py`, `strategies/calibration.py`).

Why it matters: the start runs when training begins, with the model already resident, so its own peak competes with
the training step's: `init_lora_weights auto` picks the calibrated start on a 4-bit base, which was not in the plan.
What it holds at its peak, as the code does it (counted from the skeleton, not measured per shape):

- every adapted layer's finished A and B until all layers are done (`loftq_initialise` sets them at the end), kept
  on the CPU in the adapter's dtype: host memory, so on the device only where the device is the CPU;
- one layer at a time, on the device: the 16-bit original read and its fp32 copy, the dequantized weight in fp32
  (the residual is formed in place), then the weighted residual beside it: about 10 bytes per element of the
  largest adapted layer (`PER_ELEMENT`; `loftq.transient_bytes` names the two fp32 copies);
- the calibrated start only: one group of input second-moment matrices (float64, at most `GROUP_BYTES` together,
  all of them up to `COVARIANCE_LIMIT`, else per-channel scales) with their float32 Cholesky factors and one
  damped copy, and the no-grad calibration forwards (evaluation-like, at most 16 rows and 1,024 tokens).
"""

from __future__ import annotations

PER_ELEMENT = 10  # bytes per element of one layer's temporaries (see the module docstring)


def start_transient_bytes(model, method: str | None, eval_stack_per_token: int | None = None,
                          device: str = "cpu") -> dict:
    """{"total", "adapters_fp32", "layer", "statistics"} in bytes for the start `method` of the meta skeleton
    `model` (peft-wrapped); zeros for peft's own start. `eval_stack_per_token`: the decoder stack's no-grad
    transient per token, for the calibration forwards. `device`: where training runs ("cpu", "cuda"): the
    finished factors wait in host memory, which is the device's only on a CPU."""
    if method not in ("loftq", "loftq_calibrated"):
        return {"total": 0, "adapters_fp32": 0, "layer": 0, "statistics": 0}
    from qlora_plugin.plan.skeleton import QuantizedLinearStandIn
    from qlora_plugin.strategies.calibration import (
        CALIBRATION_TOKENS, COVARIANCE_LIMIT, GROUP_BYTES, covariance_bytes, layer_groups,
    )

    adapted = [(name, module) for name, module in model.named_modules()
               if hasattr(module, "lora_A") and isinstance(module.get_base_layer(), QuantizedLinearStandIn)]
    trainable = sum(p.numel() for module in (m for _, m in adapted) for p in module.lora_A.parameters()) + \
        sum(p.numel() for module in (m for _, m in adapted) for p in module.lora_B.parameters())
    largest = max((m.get_base_layer().weight.numel() for _, m in adapted), default=0)
    statistics = 0
    if method == "loftq_calibrated" and adapted:
        layers = [(name, module.get_base_layer()) for name, module in adapted]
        if covariance_bytes(layers) <= COVARIANCE_LIMIT:
            group = max(covariance_bytes(g) for g in layer_groups(layers, GROUP_BYTES))
            widest = max(m.in_features for _, m in layers)
            statistics = group + group // 2 + 8 * widest ** 2  # sums (float64), factors (float32), a damped copy
        else:
            statistics = sum(8 * m.in_features for _, m in layers)  # per-channel sums and scales
        statistics += (eval_stack_per_token or 0) * CALIBRATION_TOKENS
    adapter_bytes = max((p.element_size() for _, m in adapted for p in m.lora_A.parameters()), default=4)
    adapters_fp32 = adapter_bytes * trainable if device == "cpu" else 0  # key kept for the plan's details
    layer = PER_ELEMENT * largest
    return {"total": adapters_fp32 + layer + statistics, "adapters_fp32": adapters_fp32, "layer": layer,
            "statistics": statistics}
