"""Mixed precision under a byte budget (``--quant mixed:B``, ``mixed:SIZE``, or a TOML recipe with ``budget``).

    units        what may vary together: per layer, attention q/k/v, o, the shared expert, the routed experts'
                 gate/up and down (ONNX: one QMoE node, one width for the three), a dense MLP, lm_head, the
                 embedding; the router and the norms stay float, pinned tensors (the recipe's rules) as pinned
    candidates   every integer width x group the target's kernels run for the unit (capabilities.INT_BITS)
    measure      each candidate's error per unit (``measure.py``): weights only (relative squared error of
                 round to nearest), or with --calib the relative output error on the calibration activations (GPTQ
                 on each tensor's Hessian from the float model's real inputs), routed experts weighted by the
                 share of tokens routed to them
    allocate     min sum(error) subject to bytes <= budget: a greedy walk up each unit's lower convex hull of
                 (bytes, error), best error saved per byte first, then any single step that still fits
    recipe       one rule per tensor, pins first; make_plan plans it as any recipe, and its bytes are exactly the
                 allocator's (tests/test_mixed.py)

The budget counts the text weights as written (scales, zero points and the float router and norms included): bits per
weight = 8 * bytes / text parameters. The vision tower is not in it (it stays as its own rules say).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .capabilities import int_bits
from .errors import UsageError
from .names import canonical_shapes, is_vision
from .plan import Format, tensor_bytes
from .quant.recipe import MIXED, Recipe, Rule, parse_budget
from .quant.schemes import Int, PerExpert
from .spec import Llama4Spec

log = logging.getLogger(__name__)

GROUPS = (32, 64, 128)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# layer-relative name -> unit kind (None: stays float); ONNX groups the routed experts and the MLPs whole
_KINDS = {
    "self_attn.q_proj.weight": "attention.qkv", "self_attn.k_proj.weight": "attention.qkv",
    "self_attn.v_proj.weight": "attention.qkv", "self_attn.o_proj.weight": "attention.o",
    "feed_forward.experts.gate_proj": "experts.gate_up", "feed_forward.experts.up_proj": "experts.gate_up",
    "feed_forward.experts.down_proj": "experts.down",
    "feed_forward.shared_expert.gate_proj.weight": "shared.gate_up",
    "feed_forward.shared_expert.up_proj.weight": "shared.gate_up",
    "feed_forward.shared_expert.down_proj.weight": "shared.down",
    "feed_forward.gate_proj.weight": "mlp.gate_up", "feed_forward.up_proj.weight": "mlp.gate_up",
    "feed_forward.down_proj.weight": "mlp.down",
}


@dataclass(frozen=True)
class Unit:
    """Tensors that take one scheme together."""

    key: str  # e.g. "layer 3 experts.gate_up", "lm_head"
    kind: str  # attention.qkv, attention.o, experts.gate_up, experts.down, experts, shared..., mlp..., lm_head, embedding
    tensors: tuple[str, ...]
    layer: int | None = None
    expert: int | None = None  # per-expert placement: this routed expert of the stacks in ``tensors``


@dataclass
class Option:
    scheme: Int
    nbytes: int
    error: float = 0.0  # the unit's measured error with this scheme (share-weighted)


@dataclass
class Allocation:
    """The allocator's answer: a scheme per unit, and the arithmetic (l4export.json quant.allocation)."""

    budget: str
    budget_bytes: int
    params: int  # text parameters (the bits-per-weight denominator)
    fixed_bytes: int  # router, norms and pinned tensors
    measure: str  # "weights" | "calibration"
    chosen: dict[str, Option] = field(default_factory=dict)  # unit key -> option
    units: dict[str, Unit] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)  # unit key -> token share (routed: top-k of 1 per token)

    @property
    def nbytes(self) -> int:
        return self.fixed_bytes + sum(o.nbytes for o in self.chosen.values())

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.params

    def record(self) -> dict[str, Any]:
        return {"budget": self.budget, "budget_bytes": self.budget_bytes, "bytes": self.nbytes,
                "bits_per_weight": round(self.bpw, 4), "params": self.params, "fixed_bytes": self.fixed_bytes,
                "measure": self.measure,
                "placement": "expert" if any(u.expert is not None for u in self.units.values()) else "projection",
                "units": [{"unit": k, "tensors": list(self.units[k].tensors), "scheme": o.scheme.name,
                           "bytes": o.nbytes, "error": o.error, "share": self.shares.get(k, 1.0)}
                          for k, o in self.chosen.items()]}


def units(spec: Llama4Spec, fmt: Format, pinned: set[str], per_expert: bool = False) -> list[Unit]:
    """The allocatable units of the text model, in model order (pinned tensors and float kinds left out);
    ``per_expert``: each routed expert of a layer a unit of its own (ONNX: gate, up and down together; MLX: gate/up
    and down, as its per-projection units)."""
    found = _units(spec, fmt, pinned)
    if not per_expert:
        return found
    out = []
    for u in found:
        if not u.kind.startswith("experts"):
            out.append(u)
            continue
        kind = u.kind.replace("experts", "expert")  # ONNX: expert (gate, up, down); MLX: expert.gate_up, expert.down
        out += [Unit(f"layer {u.layer} {kind} {e}", kind, u.tensors, u.layer, e) for e in range(spec.num_experts)]
    return out


def _units(spec: Llama4Spec, fmt: Format, pinned: set[str]) -> list[Unit]:
    found: dict[str, list[str]] = {}
    kinds: dict[str, tuple[str, int | None]] = {}
    for name in canonical_shapes(spec):
        if name in pinned or is_vision(name):
            continue
        m = _LAYER.match(name)
        if m is None:
            kind, layer = {"lm_head.weight": "lm_head", "model.embed_tokens.weight": "embedding"}.get(name), None
        else:
            kind, layer = _KINDS.get(m.group(2)), int(m.group(1))
        if kind is None:
            continue
        if fmt == "onnx" and kind.split(".")[0] in ("experts", "shared", "mlp"):
            kind = kind.split(".")[0]  # one QMoE node (routed experts; an int4 MLP) reads the three together
        key = kind if layer is None else f"layer {layer} {kind}"
        found.setdefault(key, []).append(name)
        kinds[key] = (kind, layer)
    return [Unit(k, kinds[k][0], tuple(v), kinds[k][1]) for k, v in found.items()]


def candidates(unit: Unit, shapes: dict[str, tuple[int, ...]], fmt: Format, target: str,
               widths: tuple[int, ...] | None = None) -> list[Int]:
    """Every integer scheme the target runs for ``unit`` (of ``widths``, the recipe's choice, when given): each width
    it reads x each group dividing the inputs.
    ONNX CPU: int8 activations (accuracy_level 4, the int4 preset's speed); symmetric from 4 bits (no zero points
    to store), asymmetric below (a zero point pays at 2 bits). MLX stores a bias per group anyway: asymmetric."""
    acc = 4 if fmt == "onnx" and target == "cpu" else 0
    out = []
    for bits in int_bits(fmt, target, embedding=unit.kind == "embedding"):
        if widths is not None and bits not in widths:
            continue
        for g in GROUPS:
            if all(shapes[n][-1] % g == 0 for n in unit.tensors):
                # one routed expert: asymmetric at every width (a stack's experts share the zero-point form)
                sym = fmt == "onnx" and bits >= 4 and unit.expert is None
                out.append(Int(bits, g, symmetric=sym, accuracy_level=acc))
    return out


def options(unit: Unit, shapes: dict[str, tuple[int, ...]], fmt: Format, dtype: str, target: str,
            widths: tuple[int, ...] | None = None) -> list[Option]:
    """Each candidate with its exact bytes (what make_plan will count)."""
    out = []
    for s in candidates(unit, shapes, fmt, target, widths):
        # plan._qmoe_stored: routed experts; an MLP whose gate/up/down are one int4 scheme (the whole unit here)
        qmoe = unit.kind in ("experts", "expert") or (unit.kind in ("shared", "mlp") and len(unit.tensors) == 3
                                                      and s.bits == 4)  # (MLX: no QMoE, the flag is not read)
        one = (lambda n: shapes[n][1:]) if unit.expert is not None else (lambda n: shapes[n])  # noqa: E731
        out.append(Option(s, sum(tensor_bytes(fmt, n, one(n), s, dtype, target, qmoe) for n in unit.tensors)))
    return out


def size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def budget_bytes(recipe: Recipe, params: int) -> int:
    bpw, size = parse_budget(str(recipe.budget), f"--quant {recipe.name}:")
    return size if size is not None else int(bpw * params / 8)


def choose(opts: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """Minimise the summed error under ``budget`` bytes: start every unit at its smallest option; take the upgrade
    that saves the most error per added byte along each unit's lower convex hull while it fits; then any single
    step of any unit that still fits, best first. Raises UsageError when even the smallest options do not fit."""
    hulls = {k: _hull(v) for k, v in opts.items() if v}
    at = {k: 0 for k in hulls}
    used = sum(h[0].nbytes for h in hulls.values())
    if used > budget:
        raise UsageError(f"the smallest form of every tensor is {size(used)} of weights to place, more than the "
                         f"{size(budget)} left for them; raise the budget")
    heap = [(-_gain(h[0], h[1]), k) for k, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        h, i = hulls[k], at[k]
        if used + h[i + 1].nbytes - h[i].nbytes > budget:
            continue
        used += h[i + 1].nbytes - h[i].nbytes
        at[k] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (-_gain(h[i + 1], h[i + 2]), k))
    chosen = {k: hulls[k][i] for k, i in at.items()}
    return _fill(chosen, opts, budget - used)


def _fill(chosen: dict[str, Option], opts: dict[str, list[Option]], left: int) -> dict[str, Option]:
    """Spend what the hull walk left: the single change (any option) with the most error saved per byte that fits."""
    while True:
        best = None
        for k, cur in chosen.items():
            for o in opts[k]:
                extra = o.nbytes - cur.nbytes
                if 0 < extra <= left and o.error < cur.error:
                    gain = (cur.error - o.error) / extra
                    if best is None or gain > best[0]:
                        best = (gain, k, o, extra)
        if best is None:
            return chosen
        _, k, o, extra = best
        chosen[k], left = o, left - extra


def _gain(a: Option, b: Option) -> float:
    return (a.error - b.error) / max(b.nbytes - a.nbytes, 1)


def _hull(opts: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error), bytes ascending, error strictly falling."""
    pts: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.nbytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # dominated: more bytes, no less error
        while len(pts) >= 2 and _gain(pts[-2], pts[-1]) <= _gain(pts[-1], o):
            pts.pop()  # pts[-1] lies above the segment pts[-2] -> o
        pts.append(o)
    return pts


def recipe_of(alloc: Allocation, pins: Recipe) -> Recipe:
    """The allocation as a recipe: the pins first, then the float router and norms, then one rule per tensor."""
    rules = list(pins.rules) + [Rule("*.feed_forward.router.weight", None), Rule("*norm.weight", None)]
    stacks: dict[str, dict[int, Int]] = {}  # per-expert units: stack name -> expert -> scheme
    for k, o in alloc.chosen.items():
        u = alloc.units[k]
        if u.expert is None:
            rules += [Rule(n, o.scheme) for n in u.tensors]
        for n in u.tensors if u.expert is not None else ():
            stacks.setdefault(n, {})[u.expert] = o.scheme
    for n, by in stacks.items():
        each = tuple(by[e] for e in sorted(by))
        rules.append(Rule(n, each[0] if len(set(each)) == 1 else PerExpert(each)))
    name = pins.name if pins.name.startswith(MIXED) else f"{pins.name} ({MIXED}{pins.budget})"
    return Recipe(name, tuple(rules))


def fixed_bytes(spec: Llama4Spec, pins: Recipe, placed: set[str], fmt: Format, dtype: str, target: str) -> int:
    """Bytes of the text tensors the allocator does not place: float (router, norms) or pinned."""
    total = 0
    for name, shape in canonical_shapes(spec).items():
        if name not in placed:
            total += tensor_bytes(fmt, name, shape, pins.scheme_for(name), dtype, target, ".experts." in name)
    return total


@dataclass
class Layout:
    """What may be placed: the units with at least one candidate (a unit no group divides stays float, as the
    presets leave such tensors), their options, and the bytes of everything else (float, pinned)."""

    params: int
    units: list[Unit]
    options: dict[str, list[Option]]
    fixed: int


def layout(spec: Llama4Spec, pins: Recipe, fmt: Format, dtype: str, target: str) -> Layout:
    shapes = canonical_shapes(spec)
    text = {n: s for n, s in shapes.items() if not is_vision(n)}
    params = sum(int(np.prod(s, dtype=np.int64)) for s in text.values())
    pinned = {n for n in text if any(r.matches(n) for r in pins.rules)}
    per_expert = resolve_placement(pins, fmt, target, 8 * budget_bytes(pins, params) / params) == "expert"
    if per_expert and target == "cuda":  # asymmetric QMoE nodes per width: never run on a GPU here
        raise UsageError(f"--quant {pins.name}: per-expert widths are built and verified for ONNX Runtime CPU and MLX, "
                         "not for --target cuda (no GPU has checked them); use mixed:B (per projection) there")
    runs = int_bits(fmt, target)
    if pins.widths is not None and not set(pins.widths) & set(runs):
        where = "ONNX Runtime " + target.upper() if fmt == "onnx" else "MLX"
        raise UsageError(f"--quant {pins.name}: widths = {list(pins.widths)}: {where} runs none of them; choose among "
                         f"{', '.join(map(str, runs))}")
    found = [u for u in units(spec, fmt, pinned, per_expert) if candidates(u, shapes, fmt, target, pins.widths)]
    opts = {u.key: options(u, shapes, fmt, dtype, target, pins.widths) for u in found}
    return Layout(params, found, opts, fixed_bytes(spec, pins, {n for u in found for n in u.tensors}, fmt, dtype, target))


# ``mixed:B`` on ONNX Runtime CPU places each routed expert at its own width from this budget up. Measured on
# bench_low_bit's trained model (512 held-out windows, calibrated, equal bytes; benchmarks/results/
# low-bit-placement-512-2026-12-07.json, low-bit-512-2026-12-07.json), per expert against per projection, mean KL:
# 2.5 bits 0.96x (a tie), 2.75 0.52x, 3.0 0.47x, 3.5 0.49x. Why: ONNX Runtime has no 3-bit kernel, so per
# projection a layer's whole stack of experts is 2 or 4 bits; per expert mixes them inside the stack. It costs about
# 8 % of decode speed (more QMoE nodes), so below this budget, where it does not pay, the default stays per projection.
# MLX stays per projection (mlx-lm reads one width per projection); CUDA too (per-expert nodes unverified on GPUs).
PER_EXPERT_FROM_BPW = 2.75


def resolve_placement(pins: Recipe, fmt: Format, target: str, bpw: float) -> str:
    """The placement of ``pins`` ("projection" or "expert") for this format, target and budget (bits per weight)."""
    if pins.placement != "auto":
        return pins.placement
    return "expert" if fmt == "onnx" and target == "cpu" and bpw >= PER_EXPERT_FROM_BPW - 1e-9 else "projection"


def text_bytes(spec: Llama4Spec, recipe: Recipe, fmt: Format, dtype: str, target: str) -> int:
    """The text weights' bytes of the plan of ``recipe``: exactly what convert writes for them."""
    from .plan import make_plan

    plan = make_plan(spec, fmt, dtype, target, recipe, calibrated=True)
    return sum(t.nbytes for n, t in plan.tensors.items() if not is_vision(n))


def budget_plan(spec: Llama4Spec, pins: Recipe, fmt: Format, dtype: str, target: str) -> dict[str, Any]:
    """What ``inspect --quant mixed:B`` prints before any weight is read: the budget's bytes and the range the units can
    span (all at their smallest and at their largest form); the placement itself needs the measurement convert runs."""
    lay = layout(spec, pins, fmt, dtype, target)
    found, opts, fixed, params = lay.units, lay.options, lay.fixed, lay.params
    lo = fixed + sum(min(o.nbytes for o in v) for v in opts.values())
    hi = fixed + sum(max(o.nbytes for o in v) for v in opts.values())
    kinds: dict[str, str] = {}
    for u in found:
        ss = [o.scheme for o in opts[u.key]]
        kinds.setdefault(u.kind, f"int{'/'.join(str(b) for b in sorted({s.bits for s in ss}))} x groups "
                                 f"{'/'.join(str(g) for g in sorted({s.group_size for s in ss}))}")
    budget = budget_bytes(pins, params)
    return {"recipe": pins.name, "format": fmt, "dtype": dtype, "target": target, "params": params,
            "budget_bytes": budget, "budget_bpw": round(8 * budget / params, 4), "fixed_bytes": fixed,
            "smallest_bytes": lo, "largest_bytes": hi, "units": len(found), "candidates": kinds,
            "feasible": lo <= budget, "per": resolve_placement(pins, fmt, target, 8 * budget / params),
            "placement": "measured by convert: the weights alone, or with --calib the calibration activations "
                         "(GPTQ at each width, routed experts weighted by their routing share)"}


def allocate(ckpt: Any, pins: Recipe, fmt: Format, dtype: str, target: str, calib: Any = None,
             ids: list | None = None, measurements: Path | None = None) -> tuple[Recipe, Allocation]:
    """Measure every unit's candidates on ``ckpt`` (weights only, or with ``calib`` options and token ``ids`` on the
    calibration activations) and allocate ``pins.budget``. Returns the recipe to plan and the allocation, whose bytes
    are the plan's (a unit whose storage depends on its neighbours' schemes is settled by planning, and stepped down
    while the plan is over the budget)."""
    spec = ckpt.spec
    lay = layout(spec, pins, fmt, dtype, target)
    alloc = Allocation(str(pins.budget), budget_bytes(pins, lay.params), lay.params, lay.fixed,
                       "weights" if calib is None else "calibration", units={u.key: u for u in lay.units})
    left = alloc.budget_bytes - alloc.fixed_bytes
    smallest = sum(min(o.nbytes for o in v) for v in lay.options.values())
    if smallest > left:  # before any weight is read
        least = 8 * (alloc.fixed_bytes + smallest) / lay.params
        raise UsageError(f"--quant {pins.name}: the smallest form this model takes on {fmt} {dtype} is {least:.2f} bits "
                         f"per weight ({size(alloc.fixed_bytes + smallest)}); raise the budget to at least that")
    errors, shares = _measure(ckpt, lay.units, lay.options, calib, ids, measurements)
    for key, errs in errors.items():
        for o, e in zip(lay.options[key], errs):
            o.error = float(e)
    alloc.shares = {u.key: _share(u, spec, shares) for u in lay.units}
    alloc.chosen, lay.options = _choose_placement(lay, left)
    recipe = _within(alloc, lay, pins, spec, (fmt, dtype, target))
    log.info("mixed %s: %d units placed by %s, %.3f bits per weight (%d of %d bytes)", pins.budget, len(lay.units),
             alloc.measure, alloc.bpw, alloc.nbytes, alloc.budget_bytes)
    return recipe, alloc


def _choose_placement(lay: Layout, left: int) -> tuple[dict[str, Option], dict[str, list[Option]]]:
    """``choose`` over the layout; with per-expert units, the routed experts share one group size (a stack's scales
    keep one shape): each group size is tried for all of them and the least summed error kept. Returns the choice
    and the options it chose from."""
    experts = {u.key for u in lay.units if u.expert is not None}
    if not experts:
        return choose(lay.options, left), lay.options
    best = None
    for g in GROUPS:
        opts = {k: [o for o in v if k not in experts or o.scheme.group_size == g] for k, v in lay.options.items()}
        if any(not v for v in opts.values()) or sum(min(o.nbytes for o in v) for v in opts.values()) > left:
            continue
        chosen = choose(opts, left)
        err = sum(o.error for o in chosen.values())
        if best is None or err < best[0]:
            best = (err, chosen, opts)
    if best is None:
        raise UsageError("no group size fits every routed expert into the budget; raise the budget")
    return best[1], best[2]


def _within(alloc: Allocation, lay: Layout, pins: Recipe, spec: Llama4Spec, how: tuple) -> Recipe:
    """Plan the allocation; while its text bytes are over the budget, step down the unit that loses the least error
    per byte saved. The allocation's fixed bytes are then set so that its bytes are the plan's."""
    while True:
        recipe = recipe_of(alloc, pins)
        planned = text_bytes(spec, recipe, *how)
        if planned <= alloc.budget_bytes:
            alloc.fixed_bytes = planned - sum(o.nbytes for o in alloc.chosen.values())
            return recipe
        downs = [((o.error - cur.error) / (cur.nbytes - o.nbytes), k, o) for k, cur in alloc.chosen.items()
                 for o in lay.options[k] if o.nbytes < cur.nbytes]
        if not downs:
            raise UsageError(f"--quant {pins.name}: no placement fits the budget once planned; raise the budget")
        _, k, o = min(downs, key=lambda d: d[0])
        alloc.chosen[k] = o


def _measure(ckpt: Any, found: list[Unit], opts: dict[str, list[Option]], calib: Any, ids: list | None,
             cache: Path | None = None):
    """Each unit's error under each option, and the routing shares; ``cache``: a measurements file (as llama.cpp's
    importance matrix: measure once, export at several budgets) read when it was made for the same checkpoint,
    measure, candidates and calibration tokens, else written."""
    from .quant.measure import output_errors, weight_errors

    names = {u.key: u.tensors for u in found}
    experts = {u.key: u.expert for u in found if u.expert is not None}
    schemes = {k: [o.scheme for o in v] for k, v in opts.items()}
    key = _measure_key(ckpt, schemes, calib, ids)
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        if data.get("key") == key:
            log.info("mixed: measurements read from %s", cache)
            return data["errors"], {int(k): np.array(v) for k, v in data["shares"].items()}
        log.warning("%s was measured for another checkpoint, target or calibration: measuring again", cache)
    if calib is None:
        errors, shares = weight_errors(ckpt, names, schemes, experts=experts), {}
    else:
        errors, shares = output_errors(ckpt, names, schemes, ids, calib, experts)
    if cache is not None:
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps({"key": key, "errors": errors, "shares": {str(k): v.tolist() for k, v in shares.items()}}))
        tmp.replace(cache)
    return errors, shares


def _measure_key(ckpt: Any, schemes: dict, calib: Any, ids: list | None) -> str:
    """What a measurement depends on: the checkpoint's tensors (their names, shapes and stored bytes' sizes), the
    candidates, and for calibration its token ids and options."""
    h = hashlib.sha256()
    for n, t in ckpt.tensors.items():
        h.update(f"{n}{t.shape}{t.nbytes}".encode())
    h.update(json.dumps({k: [s.name for s in v] for k, v in schemes.items()}).encode())
    if calib is not None:
        h.update(f"{calib.method}{calib.damp}{calib.prior_tokens}".encode())
        for a in ids or []:
            h.update(np.asarray(a, np.int64).tobytes())
    return h.hexdigest()


def _share(u: Unit, spec: Llama4Spec, shares: dict) -> float:
    """The share of tokens through a unit: a layer's routed experts together take top-k per token."""
    if u.expert is not None:
        return float(shares[u.layer][u.expert]) if u.layer in shares else spec.top_k / spec.num_experts
    if u.kind.startswith("experts"):
        return float(shares[u.layer].sum()) if u.layer in shares else float(spec.top_k)
    return 1.0


__all__ = ["Allocation", "Layout", "Option", "PER_EXPERT_FROM_BPW", "Unit", "allocate", "budget_bytes", "budget_plan", "layout", "resolve_placement", "text_bytes", "candidates", "choose", "fixed_bytes",
           "options", "recipe_of", "units"]
