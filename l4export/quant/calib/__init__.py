"""Layer-by-layer calibration with per-expert GPTQ, in torch (CPU, or CUDA when torch sees a GPU).

Only one decoder layer's non-expert weights and one batch of its routed experts are in memory at a time; the
calibration activations ``X`` (one ``[T_i, H]`` tensor per sample) are carried from layer to layer:

    X = embed(ids)
    for each layer L:
        load L's non-expert weights (float32)
        pass 1, float weights: capture every non-expert linear's real inputs as Hessians H = Σ x xᵀ
            q/k/v  <- input_layernorm(X)            o <- attention output
            router, shared expert <- h2 = post_attention_layernorm(X + attn)
            keep h2 and the top-1 routing (expert, score) of every token
        GPTQ the non-expert tensors; pass 2 (quantized) up to the router: X + attn + shared, h2', routing'
        for each batch of B routed experts (B from ``expert_batch_bytes``; Maverick: 1):
            load the batch's gate/up/down (``LazyTensor.load(experts=slice)``)
            IMPORTANT: routed expert e (top-1) sees only the tokens routed to it, scaled:
                gate/up <- s·h2, s = sigmoid(max router logit)        (never expert(h2)·s)
                down    <- silu(G s h2) ⊙ (U s h2)                    (the real intermediate)
            GPTQ the batch (vectorised over its experts, with the layer prior), spill it to disk
            add the batch's quantized output to the pass-2 tokens routed to it
        X <- pass 2's output    (the next layer calibrates on what it will see)

Rare and unrouted experts: ``Ĥ_e = (H_e + α·H̄) / (n_e + α)``, where ``H̄`` is the layer's mean per-token
outer product over all routed tokens (gate/up: one shared input space) or ``mean-diag·I`` (down: each
expert's intermediate features are its own), and α = ``prior_tokens``. An expert with no tokens is
quantized against the layer prior: finite, non-zero, never NaN; no weight column is ever zeroed. Neither
prior needs per-expert stacks: gate/up's is one [H, H] sum over all routed tokens; down's needs each expert's
tr(H_e), a first pass over the batches with gate/up only.

Peak memory therefore does not grow with the number of experts: one layer's activations, its non-expert
weights and one expert batch. Calibrated tensors go to disk as they are made (``SpilledTensors``), so
``CalibResult.tensors`` is a mapping over memory-mapped files, not ~1 byte per weight of RAM.

The parts of this package, each importing only those above it:

    options.py   CalibOptions, CalibResult, spill_next_to; _Run, what every step of one calibration shares
    stats.py     weight / output SQNR, FP8 static input scales, a tensor's log line, ETA lines
    hessian.py   Σ x xᵀ in memory (_Acc) or in tiles on disk (_TiledAcc), the layer prior, _SHARES
    weights.py   weight readers (_Weights, _stored, _Dequantized), quantization a block of rows at a time
    experts.py   one expert batch as a job (ExpertBatch -> run_expert_batch -> BatchResult), batch sizing
    moe.py       one MoE layer's routed experts in the driver: routing state, priors, jobs out, results back
    driver.py    calibrate(): the layer walk, the float pass and pass 2, dense GPTQ, lm_head and the embedding

Outside it: the layer maths in torch (``l4export/torch_llama4.py``), GPTQ (``quant/gptq.py``), the on-disk store
(``quant/spill.py``); the calibration file is read by ``calib_data.read_calibration``, before this runs.
"""

from .driver import calibrate
from .experts import BatchResult, ExpertBatch, expert_batch_size, expert_bytes, run_expert_batch
from .options import CalibOptions, CalibResult, Observer, spill_next_to

__all__ = ["CalibOptions", "CalibResult", "calibrate", "spill_next_to", "expert_batch_size", "expert_bytes",
           "ExpertBatch", "BatchResult", "run_expert_batch", "Observer"]
