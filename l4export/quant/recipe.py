"""Quantization recipes: an ordered list of ``Rule(pattern -> scheme)``, first match wins.

Patterns match canonical tensor names (names.py): fnmatch globs, or a regular expression after ``re:``
(``re.fullmatch``). A rule whose scheme is ``None`` keeps the tensor float; a tensor no rule matches
stays float as well. The vision tower and projector (``vision_model.*``, ``multi_modal_projector.*``) are matched
only by rules whose pattern starts with one of those two names: a text recipe's ``*.self_attn.*`` never quantizes
the vision tower, which stays float unless a rule names it. Presets are data (``PRESETS``); TOML recipes are read strictly:

    name = "experts-int4-g64"
    [[rule]]
    match = "*.feed_forward.router.weight"
    scheme = "float"
    [[rule]]
    match = "*.feed_forward.experts.*"
    scheme = "int4"           # int2 | int3 | int4 | int5 | int6 | int8 | fp8 | mxfp8 | float
    group_size = 64           # int: 32, 64, 128
    symmetric = true          # int (default: true from 4 bits, false below: a zero point pays at 2 and 3 bits)
    accuracy_level = 4        # int, ONNX only: 0 float activations (exact), 4 int8 activations (fast on CPU)
    # activation = "static"   # fp8 only: per-expert static input scales from calibration (needs --calib)
    # block_size = 128        # fp8 only: 128x128 square tiles instead of per-channel scales

Unknown keys, unknown schemes and bad values are ``RecipeError``s naming the key and the file.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged (the tomli dependency)
    import tomli as tomllib

from ..capabilities import MXFP8_GROUP, fitting_group, int_bits
from ..errors import CapabilityError, RecipeError
from ..names import VISION_PREFIXES, canonical_shapes, is_linear_weight, is_vision
from ..spec import Llama4Spec
from .schemes import INT_WIDTHS, AnyScheme, Fp8, Int, MxFp8, PerExpert


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: AnyScheme | None  # None: keep float

    @property
    def names_vision(self) -> bool:
        """The pattern is about the vision tower or the projector (the only rules that reach them)."""
        return self.pattern.removeprefix("re:").startswith(tuple(p.rstrip(".") for p in VISION_PREFIXES))

    def matches(self, name: str) -> bool:
        if is_vision(name) and not self.names_vision:
            return False
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    # mixed precision (``--quant mixed:B`` or a TOML ``budget``): the average bits per weight ("3.0") or the bytes
    # ("40GB") of the text weights; the rules pin tensors and l4export.mixed allocates the rest, by measurement,
    # into a recipe of one rule per tensor (budget None). make_plan takes only allocated recipes.
    budget: str | None = None
    # where the allocator may vary widths: "projection" (one width per projection per layer: what mlx-lm reads;
    # ``mixed:B:per-projection``), "expert" (each routed expert its own width; ONNX: one QMoE node per width;
    # ``mixed:B:per-expert``) or "auto" (``mixed:B``): l4export.mixed.resolve_placement decides by format and budget
    placement: str = "auto"
    # the widths the allocator may place (TOML ``widths = [2, 4, 8]``; None: every width the target runs), e.g. the
    # widths whose kernels are fastest on a device (mlx's CPU backend: 3 and 5 bits run 20-25 % slower)
    widths: tuple[int, ...] | None = None

    def scheme_for(self, name: str) -> AnyScheme | None:
        """The scheme of the first rule matching ``name`` (None: float)."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme
        return None

    def plan(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, AnyScheme]:
        """Canonical name -> scheme for every tensor that gets quantized."""
        return {n: s for n in shapes if (s := self.scheme_for(n)) is not None}

    def validate(self, spec_or_shapes: Llama4Spec | Mapping[str, tuple[int, ...]]) -> dict[str, AnyScheme]:
        """Check every matched tensor before any weight is read: 2-D or stacked 3-D linears only, and the
        group size divides the input dimension. Returns the plan."""
        shapes = canonical_shapes(spec_or_shapes) if isinstance(spec_or_shapes, Llama4Spec) else spec_or_shapes
        plan = self.plan(shapes)
        for name, scheme in plan.items():
            shape = shapes[name]
            if not is_linear_weight(name, shape):
                raise RecipeError(f"recipe {self.name}: {name} {list(shape)} is not a linear weight; add a float rule for it")
            g = scheme.group_for(shape[-1])
            if shape[-1] % g:
                raise RecipeError(
                    f"recipe {self.name}: group size {g} does not divide {name}'s input dimension {shape[-1]} "
                    f"(shape {list(shape)}); use a group size that divides {shape[-1]}"
                )
            b = scheme.block_size if isinstance(scheme, Fp8) else 0
            if b and shape[-2] % b:  # square FP8 tiles also split the output dimension
                raise RecipeError(
                    f"recipe {self.name}: fp8 block size {b} does not divide {name}'s output dimension {shape[-2]} "
                    f"(shape {list(shape)}); use a block size that divides {shape[-2]}"
                )
        return plan

    def check_target(self, fmt: str, target: str, names: Iterable[str] | None = None,
                     calibrated: bool | None = None) -> None:
        """Refuse schemes the target cannot store or run (see docs/quantization.md, "Targets", and docs/fp8.md).

        With the checkpoint's canonical ``names`` (and whether ``calibrated``), also refuse what depends on which
        tensor a rule hits: per-channel FP8 routed experts on ``--target cuda`` (QMoE fp8 takes square blocks
        only) and static FP8 activation scales without calibration or where calibration computes none."""
        schemes = {r.scheme for r in self.rules if r.scheme is not None}
        schemes = {e for s in schemes for e in (s.schemes if isinstance(s, PerExpert) else (s,))}
        for s in schemes:
            if isinstance(s, MxFp8) and fmt == "onnx":
                raise CapabilityError(
                    f"recipe {self.name}: mxfp8 (e8m0 group scales) has no ONNX Runtime kernel; use fp8 for --format onnx"
                )
            if isinstance(s, Int) and s.accuracy_level and (fmt == "mlx" or target == "cuda"):
                where = "MLX" if fmt == "mlx" else "--target cuda"
                raise CapabilityError(
                    f"recipe {self.name}: accuracy_level = {s.accuracy_level} (int8 activations) is an ONNX Runtime CPU "
                    f"kernel option that {where} cannot run; use accuracy_level = 0 for {where}"
                )
            if isinstance(s, Int) and s.bits not in int_bits(fmt, target):
                where = "MLX" if fmt == "mlx" else f"ONNX Runtime {target.upper()}"
                raise CapabilityError(f"recipe {self.name}: {s.name} has no {where} kernel; use one of "
                                      f"{', '.join(f'int{b}' for b in int_bits(fmt, target))} there")
            if isinstance(s, Fp8) and fmt == "mlx" and s.activation == "static":
                raise CapabilityError(
                    f"recipe {self.name}: MLX has no static FP8 activation scales; use activation = \"dynamic\" for --format mlx"
                )
        if names is None or fmt != "onnx":
            return
        for name in names:
            s = self.scheme_for(name)
            if not isinstance(s, Fp8):
                continue
            routed = ".feed_forward.experts." in name
            if routed and target == "cuda" and not s.block_size:
                raise CapabilityError(
                    f"recipe {self.name}: {name} is per-channel FP8 (CUDA's QMoE takes square blocks); set "
                    "block_size = 128 in its rule, or use --quant fp8-block or --target cpu"
                )
            if s.activation != "static":
                continue
            if calibrated is False:
                raise RecipeError(
                    f"recipe {self.name}: {name} has activation = \"static\", whose scales come from calibration; "
                    f"pass --calib FILE, or use activation = \"dynamic\""
                )
            if not name.startswith("model.layers."):
                raise RecipeError(
                    f"recipe {self.name}: calibration computes static activation scales for decoder-layer linears "
                    f"only, not {name}; use activation = \"dynamic\" for it"
                )


# ---- presets ------------------------------------------------------------------------------------------
# No preset names the vision tower, so it stays float (a small share of the bytes, run once per image, and its error
# reaches every image token); a recipe file can quantize it with rules of its own (docs/vision.md).
_ROUTER_NORMS_EMBED = (
    Rule("*.feed_forward.router.weight", None),  # routing decisions stay exact (every toolkit keeps it float)
    Rule("*norm.weight", None),
    Rule("model.embed_tokens.weight", None),
)
_FLOAT_FIRST = _ROUTER_NORMS_EMBED + (Rule("lm_head.weight", None),)

def _int_preset(name: str, experts: Int, rest: Int) -> Recipe:
    """Routed and shared experts at ``experts``; attention, Maverick's dense MLPs, lm_head and the input embedding
    at ``rest``; router and norms float."""
    return Recipe(name, (
        Rule("*.feed_forward.router.weight", None),  # routing decisions stay exact (every toolkit keeps it float)
        Rule("*norm.weight", None),
        Rule("*.feed_forward.experts.*", experts),
        Rule("*.feed_forward.shared_expert.*", experts),
        Rule("*.self_attn.*_proj.weight", rest),
        Rule("re:model\\.layers\\.\\d+\\.feed_forward\\.(gate|up|down)_proj\\.weight", rest),
        Rule("lm_head.weight", rest),
        Rule("model.embed_tokens.weight", rest),
    ))


def _int4_preset(name: str, level: int) -> Recipe:
    """Routed and shared experts int4 g64 (Meta's int4_mixed covers both); attention, Maverick's dense MLPs, lm_head
    and the input embedding int8 g128; router and norms float. ``level``: ONNX Runtime's accuracy_level.

    Why these (benchmarks/bench_decode.py, bench_quant_quality.py; docs/quantization.md "Speed and accuracy level"):
    on ORT CPU, integer kernels at accuracy_level 4 (int8 activations, per block) decode 5x faster than the float
    export, while 8-bit MatMulNBits at level 0 runs 300x slower than at level 4 (the lm_head alone took 70% of a
    step). int8 g128 reads as fast as int4 g64 at level 4 and keeps attention and lm_head at 8 bits. The embedding
    is a lookup (GatherBlockQuantized): int8 halves its bytes at no speed cost and brings the export under 0.32x
    bf16 on the 1 GB benchmark model. mlx-lm quantizes everything to 4 bits; llama.cpp's Q4_K_M keeps
    output.weight at 6."""
    return _int_preset(name, Int(bits=4, group_size=64, symmetric=True, accuracy_level=level),
                       Int(bits=8, group_size=128, symmetric=True, accuracy_level=level))


def _int8_preset(name: str, level: int) -> Recipe:
    """Every linear and the input embedding int8, groups of 32, symmetric; router and norms float: the near-lossless
    8-bit path (issue 27). On ORT CPU at accuracy_level 4 MatMulNBits and QMoE run 8-bit weights against int8
    activations (per block), as llama.cpp's Q8_0 runs its blocks against q8 activations (blocks of 32 too).

    Why 32, not 64 (benchmarks/results/low-bit-int8-g32-2026-12-07.json, decode-c8192-int8-g32-2026-12-07.json):
    KL against float 0.00020 instead of 0.00030 (48 windows), for 8.59 bits per weight instead of 8.31 (float32
    scales; QMoE's float16: Q8_0 8.53) and 0.93x the decode speed (145 vs 156 tok/s; Q8_0 101). On 512 windows
    (low-bit-presets-512-2026-12-07.json) its mean KL is 0.000225 ± 0.000017, Q8_0's 0.000254 ± 0.000031; zero
    points (asymmetric) gave no better."""
    int8 = Int(bits=8, group_size=32, symmetric=True, accuracy_level=level)
    return _int_preset(name, int8, int8)


PRESETS: dict[str, Recipe] = {
    # Fast on ONNX Runtime CPU (int8 activations); MLX and CUDA read the same weights with float activations.
    "int4": _int4_preset("int4", 4),
    # The same weights with float activations on ONNX Runtime too: exact with respect to the dequantized weights
    # (parity studies; 3-5x slower decode on CPU).
    "int4-exact": _int4_preset("int4-exact", 0),
    # 8 bits everywhere, int8 activations on ONNX Runtime CPU: the near-lossless path beside llama.cpp's Q8_0.
    "int8": _int8_preset("int8", 4),
    # Routed experts only, per expert per output channel (Meta fp8_mixed); the rest float.
    "fp8": Recipe("fp8", _FLOAT_FIRST + (
        Rule("*.feed_forward.experts.*", Fp8()),
    )),
    # Routed experts FP8 in 128x128 tiles (DeepSeek-V3 / Qwen3 FP8 layout): what ORT's CUDA QMoE fp8 runs.
    "fp8-block": Recipe("fp8-block", _FLOAT_FIRST + (
        Rule("*.feed_forward.experts.*", Fp8(block_size=128)),
    )),
}


def for_model(recipe: Recipe, shapes: Mapping[str, tuple[int, ...]], fmt: str, target: str,
              preset: bool | None = None) -> tuple[Recipe, dict[str, str]]:
    """A preset as this model, format and target can run it; explicit recipes are returned unchanged (and refused
    later where they cannot run). Returns the recipe and what was adapted (tensor -> "from -> to"). ``preset``:
    whether ``recipe`` is a preset (default: it is one of PRESETS; make_plan says so for a preset already in MLX's
    form).

    * accuracy_level 4 (int8 activations) is an ONNX Runtime CPU kernel option: level 0 for MLX and --target cuda;
    * a group or block size that does not divide a tensor's dimensions: the largest of 128, 64, 32 that does, else
      the tensor stays float (as llama.cpp falls back to another block size and mlx-lm leaves such tensors float);
      mxfp8 (MLX) takes group 32 only, else float;
    * tensors one kernel reads together share the fallback: an ONNX MoE layer's gate/up/down (QMoE takes one
      scheme for all three), so the group divides both the hidden and the expert width.
    Adapted tensors get rules of their own, first, so the recipe stays the one description of the export."""
    if not (PRESETS.get(recipe.name) is recipe if preset is None else preset):
        return recipe, {}
    rules = list(recipe.rules)
    if not (fmt == "onnx" and target == "cpu"):
        rules = [Rule(r.pattern, replace(r.scheme, accuracy_level=0)) if isinstance(r.scheme, Int) else r for r in rules]
    base = Recipe(recipe.name, tuple(rules))
    extra, adapted = [], {}
    for unit in _units(shapes, fmt):
        s = base.scheme_for(unit[0])
        if s is None or any(base.scheme_for(n) != s for n in unit[1:]):
            continue
        new = _fit(s, [shapes[n] for n in unit])
        if new == s:
            continue
        for n in unit:
            extra.append(Rule(n, new))
            adapted[n] = f"{s.name} -> {new.name if new else 'float'} (shape {list(shapes[n])})"
    if not extra and base.rules == recipe.rules:
        return recipe, {}
    return Recipe(recipe.name, tuple(extra) + base.rules), adapted


def _units(shapes: Mapping[str, tuple[int, ...]], fmt: str) -> list[tuple[str, ...]]:
    """Tensors that must share one scheme: an ONNX MoE layer's routed gate/up/down (one QMoE node); else each alone."""
    units, done = [], set()
    for name in shapes:
        if name in done:
            continue
        unit: tuple[str, ...] = (name,)
        if fmt == "onnx" and name.endswith(".feed_forward.experts.gate_proj"):
            pre = name.rsplit(".", 1)[0]
            unit = tuple(f"{pre}.{p}" for p in ("gate_proj", "up_proj", "down_proj") if f"{pre}.{p}" in shapes)
        done.update(unit)
        units.append(unit)
    return units


def _fit(s: AnyScheme, shapes: list[tuple[int, ...]]) -> AnyScheme | None:
    """``s`` with a group (or block) size that divides every shape, or None (float) where none does."""
    cols = [sh[-1] for sh in shapes]
    if isinstance(s, Int):
        g = fitting_group(s.group_size, cols)
        return None if g is None else replace(s, group_size=g)
    if isinstance(s, MxFp8):
        return s if all(c % MXFP8_GROUP == 0 for c in cols) else None
    if isinstance(s, Fp8) and s.block_size:  # square tiles split both dimensions
        b = fitting_group(s.block_size, cols + [sh[-2] for sh in shapes])
        return None if b is None else replace(s, block_size=b)
    return s


# ---- TOML ---------------------------------------------------------------------------------------------
_TOP_KEYS = {"name", "rule", "budget", "placement", "widths"}
PLACEMENTS = ("auto", "projection", "expert")
_SCHEME_KEYS: dict[str, set[str]] = {
    **{f"int{b}": {"group_size", "symmetric", "accuracy_level"} for b in INT_WIDTHS},
    "fp8": {"activation", "block_size"},
    "mxfp8": set(),
    "float": set(),
}


INT_KINDS = tuple(f"int{b}" for b in INT_WIDTHS)


def _scheme(kind: str, opts: dict[str, Any], where: str) -> AnyScheme | None:
    try:
        if kind in INT_KINDS:
            bits = int(kind[3:])
            gs, acc = opts.get("group_size", 32), opts.get("accuracy_level", 0)
            sym = opts.get("symmetric", bits >= 4)  # below 4 bits a zero point pays (asymmetric by default)
            if any(not isinstance(v, int) or isinstance(v, bool) for v in (gs, acc)) or not isinstance(sym, bool):
                raise RecipeError(f"{where}: group_size and accuracy_level must be integers and symmetric true or false")
            return Int(bits=bits, group_size=gs, symmetric=sym, accuracy_level=acc)
        if kind == "fp8":
            block = opts.get("block_size", 0)
            if not isinstance(block, int) or isinstance(block, bool):
                raise RecipeError(f"{where}: block_size must be an integer (128, or 16, 32, 64)")
            return Fp8(activation=opts.get("activation", "dynamic"), block_size=block)
        if kind == "mxfp8":
            return MxFp8()
        return None
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None


def scheme_from_record(record: dict[str, Any], where: str) -> AnyScheme:
    """The scheme ``schemes.scheme_record`` wrote (l4export.json ``quant.schemes``)."""
    opts = {k: v for k, v in record.items() if k != "kind"}
    if record.get("kind") == "per-expert":
        bits = opts.pop("bits", None)
        if not isinstance(bits, list) or not bits or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
            raise RecipeError(f"{where}: a per-expert scheme needs bits, one integer per expert; convert the export again")
        made = [_scheme(f"int{b}", opts, where) for b in bits]
        try:
            return PerExpert(tuple(made))  # type: ignore[arg-type]
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
    scheme = _scheme(str(record.get("kind")), opts, where)
    if scheme is None:
        raise RecipeError(f"{where}: unknown scheme kind {record.get('kind')!r}; convert the export again")
    return scheme


def placed_schemes(schemes: Mapping[str, dict], placement: Mapping[str, str]) -> dict[str, AnyScheme]:
    """Each quantized tensor's scheme as an export recorded it (l4export.json ``quant.schemes`` / ``quant.placement``)."""
    made = {k: scheme_from_record(v, f"l4export.json quant.schemes.{k}") for k, v in schemes.items()}
    return {n: made[s] for n, s in placement.items()}


def placed_recipe(name: str, schemes: Mapping[str, dict], placement: Mapping[str, str]) -> Recipe:
    """The recipe an export recorded: one rule per tensor."""
    return Recipe(name, tuple(Rule(n, s) for n, s in placed_schemes(schemes, placement).items()))


def _reject_unknown(table: dict[str, Any], allowed: set[str] | frozenset[str], at: str, what: str) -> None:
    for key in table:
        if key not in allowed:
            raise RecipeError(f"{at}: unknown key {key!r}{what}; allowed: {', '.join(sorted(allowed))}")


def parse_recipe(data: dict[str, Any], where: str) -> Recipe:
    _reject_unknown(data, _TOP_KEYS, where, "")
    rules_in = data.get("rule", [] if "budget" in data else None)
    budget = data.get("budget")
    if budget is not None:
        if not isinstance(budget, (str, int, float)) or isinstance(budget, bool):
            raise RecipeError(f"{where}: budget must be bits per weight (3.0) or a size (\"40GB\")")
        parse_budget(str(budget), f"{where}: budget")
    if not isinstance(rules_in, list) or (not rules_in and budget is None):
        raise RecipeError(f"{where}: no [[rule]] tables; add at least one rule (match = ..., scheme = ...)")
    rules = []
    for n, r in enumerate(rules_in, 1):
        at = f"{where} rule {n}"
        if not isinstance(r, dict):
            raise RecipeError(f"{at}: a rule must be a table with match and scheme")
        kind = r.get("scheme")
        if not isinstance(kind, str) or kind not in _SCHEME_KEYS:
            raise RecipeError(f"{at}: scheme {kind!r} is not one of {', '.join(_SCHEME_KEYS)}")
        _reject_unknown(r, {"match", "scheme"} | _SCHEME_KEYS[kind], at, f" for scheme {kind}")
        pattern = r.get("match")
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"{at}: match must be a non-empty string (a glob, or re:REGEX)")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise RecipeError(f"{at}: bad regular expression {pattern!r}: {err}") from None
        rules.append(Rule(pattern, _scheme(kind, {k: v for k, v in r.items() if k not in ("match", "scheme")}, at)))
    name = data.get("name", Path(where).stem)
    if not isinstance(name, str):
        raise RecipeError(f"{where}: name must be a string")
    placement = data.get("placement", "auto")
    if placement not in PLACEMENTS or budget is None and "placement" in data:
        raise RecipeError(f"{where}: placement must be \"auto\", \"projection\" or \"expert\", beside a budget")
    widths = data.get("widths")
    if widths is not None and (budget is None or not isinstance(widths, list) or not widths
                               or any(isinstance(w, bool) or w not in INT_WIDTHS for w in widths)):
        raise RecipeError(f"{where}: widths must be a list of {', '.join(map(str, INT_WIDTHS))}, beside a budget")
    return Recipe(name, tuple(rules), None if budget is None else str(budget), placement,
                  None if widths is None else tuple(sorted(set(widths))))


MIXED = "mixed:"
PER = {":per-expert": "expert", ":per-projection": "projection"}  # mixed:3.0:per-expert
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIN_BPW, MAX_BPW = 2.0, 16.0


def parse_budget(value: str, where: str) -> tuple[float | None, int | None]:
    """``"3.0"`` -> (3.0 bits per weight, None); ``"40GB"`` / ``"512MiB"`` -> (None, bytes)."""
    size = _SIZE.match(value)
    if size:
        return None, int(float(size.group(1)) * _UNITS[size.group(2).lower()])
    try:
        bpw = float(value)
    except ValueError:
        raise RecipeError(f"{where} {value!r} is neither bits per weight (e.g. 3.0) nor a size (e.g. 40GB)") from None
    if not MIN_BPW <= bpw <= MAX_BPW:
        raise RecipeError(f"{where} {value!r}: bits per weight must be between {MIN_BPW:g} and {MAX_BPW:g}")
    return bpw, None


def load_recipe(value: str | Path) -> Recipe:
    """A preset name (``int4``, ``fp8``), ``mixed:B`` / ``mixed:SIZE`` (a budget, no pins), or a TOML recipe file."""
    if isinstance(value, str) and value in PRESETS:
        return PRESETS[value]
    if isinstance(value, str) and value.startswith(MIXED):
        budget, placement = value[len(MIXED):], "auto"
        for suffix, how in PER.items():
            if budget.endswith(suffix):
                budget, placement = budget.removesuffix(suffix), how
        parse_budget(budget, "--quant")
        return Recipe(value, (), budget, placement)
    path = Path(value)
    if path.suffix != ".toml" or not path.is_file():
        raise RecipeError(f"--quant {value}: not a preset ({', '.join(PRESETS)}), mixed:BITS or mixed:SIZE, nor an "
                          "existing .toml recipe file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML ({err}); fix the file") from None
    return parse_recipe(data, str(path))
