"""Decode and prefill speed on a synthetic 1 GB Llama 4 MoE, l4export beside its peers (CPU).

    python benchmarks/bench_decode.py [--runs 3] [--prompt 128] [--new 64] [--threads 2] [--engines a,b,...]

The model: transformers' Llama4ForCausalLM, hidden 1024, 8 layers all MoE (16 experts, top-1, expert width 1024),
16 heads / 4 KV heads, head_dim 64, vocab 32000, attention_chunk_size 256, llama3 RoPE factor 8, qk-norm,
initializer 0.02, torch seed 0, saved in bf16 in 500 MB shards (514 M parameters, 104 M active per token), with the
byte-level tokenizer. Built once under benchmarks/work/ (deterministic).

Engines, each in its own process, runs interleaved (engine order rotated every run), medians of ``--runs``:
    l4export ONNX float32 / int4 preset / fp8 preset / mixed:3.0   (ONNX Runtime CPU)
    l4export MLX float32 / int4 preset / mixed:3.5 / mixed:3.0     (mlx[cpu] on Linux: its CPU backend)
    mlx-lm float32 / 4-bit g64 / 3-bit g64 / 2-bit g32 (f32 scales) of our float MLX export; mlx-lm on our MLX int4
    export (same weights). mixed:B exports are placed on the weights alone (speed, not quality, is measured here).
    transformers eager float32 (runs every expert for every token)
    llama.cpp f32 / Q4_0 / Q4_K_M through llama-cpp-python, when it is installed (GGUF made with llama.cpp's
    converter, see llama_cpp_gguf)
    llama-bench-KIND (KIND: f32, BF16, Q8_0, Q4_0, Q4_K_M): llama.cpp's own llama-bench -t THREADS -fa 1 (f16 cache),
    prefill as pp PROMPT, decode as tg NEW at depth PROMPT (-d), from a llama.cpp build in $L4_LLAMA_BIN (default
    benchmarks/work/llama.cpp-bin: llama-bench and llama-quantize; its source tree, two folders up, has the converter)

Reported per engine: prefill and decode tokens/s, peak RSS of the process, weight bytes read per decode token (the
export's tensor bytes for everything a token touches: one routed expert per layer, one embedding row), and that
traffic as a share of the machine's memory-bandwidth ceiling (a 2-thread copy, read + write bytes). Ratios against
mlx-lm 4-bit, our float32 ONNX export and llama.cpp Q4_0. Writes benchmarks/results/decode-<date>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, measure, save_result, table  # noqa: E402

LLAMA_BIN = Path(__import__("os").environ.get("L4_LLAMA_BIN", WORK / "llama.cpp-bin"))

MODEL = WORK / "decode-1g"
CHUNK = 256  # attention_chunk_size of the model (--chunk: 8192 is Llama 4's, and what llama.cpp hard-codes)
ENGINES = ("onnx-fp32", "onnx-int4", "onnx-int8", "genai-int4", "onnx-fp8", "onnx-mixed3.0", "onnx-mixed3.0-pe", "onnx-mixed3.0-pp", "mlx-fp32", "mlx-int4", "mlx-mixed3.5", "mlx-mixed3.0",
           "mlx-lm-fp32", "mlx-lm-4bit", "mlx-lm-3bit", "mlx-lm-2bit-g32", "mlx-lm-on-l4-int4", "transformers-fp32",
           "llama.cpp-f32", "llama.cpp-Q4_0", "llama.cpp-Q4_K_M", "llama-bench-Q4_0", "llama-bench-Q4_K_M",
           "llama-bench-Q8_0", "llama-bench-BF16")
MLX_LM_BITS = {"mlx-lm-4bit": ("4", "64"), "mlx-lm-3bit": ("3", "64"), "mlx-lm-2bit-g32": ("2", "32")}


# ---- the model and its exports -------------------------------------------------------------------------------
def build_model(out: Path = MODEL) -> Path:
    """The synthetic checkpoint (transformers' classes, torch seed 0, bf16, 500 MB shards) and its tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from l4export.demo import write_tokenizer
    from l4export.spec import load_spec

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_local_experts=16, num_experts_per_tok=1, intermediate_size=1024, intermediate_size_mlp=2048,
        vocab_size=32000, attention_chunk_size=CHUNK, interleave_moe_layer_step=1, use_qk_norm=True,
        initializer_range=0.02, max_position_embeddings=262144, bos_token_id=256, eos_token_id=[257, 261],
        pad_token_id=262, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
    tmp = out.with_name(out.name + ".partial")
    Llama4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp, max_shard_size="500MB")
    write_tokenizer(tmp, load_spec(tmp))
    tmp.rename(out)
    return out


def l4_export(name: str, fmt: str, *extra: str) -> Path:
    out = WORK / (f"decode-{name}" if CHUNK == 256 else f"decode-c{CHUNK}-{name}")
    if not (out / "l4export.json").is_file():
        subprocess.run([sys.executable, "-m", "l4export.cli", "convert", str(MODEL), "-o", str(out), "--format", fmt,
                        "--force", *extra], check=True, capture_output=True)
    return out


def mlx_lm_4bit(src: Path, bits: str = "4", group: str = "64") -> Path:
    """mlx-lm's own ``bits``-bit (default 4-bit g64) of our float32 MLX export (scales in the model dtype: float32)."""
    out = WORK / ("decode-mlx-lm-4bit" if (bits, group) == ("4", "64") else f"decode-mlx-lm-{bits}bit-g{group}")
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
                        "--q-bits", bits, "--q-group-size", group], check=True, capture_output=True)
    return out


def llama_cpp_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py and gguf-py from the llama-cpp-python source distribution of the installed
    version (downloaded once into benchmarks/work; run, never copied into the project)."""
    if (LLAMA_BIN / "llama-bench").is_file() and (LLAMA_BIN.resolve().parents[1] / "convert_hf_to_gguf.py").is_file():
        return LLAMA_BIN.resolve().parents[1]  # the build's own source tree
    try:
        from importlib.metadata import version

        v = version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed: llama.cpp is skipped
        return None
    root = WORK / "llama.cpp-src" / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        dl = WORK / "llama.cpp-src"
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                        f"llama-cpp-python=={v}"], check=True, capture_output=True)
        subprocess.run(["tar", "xzf", str(dl / f"llama_cpp_python-{v}.tar.gz"), "-C", str(dl), "--wildcards",
                        "*/vendor/llama.cpp/convert_hf_to_gguf.py", "*/vendor/llama.cpp/gguf-py/*",
                        "*/vendor/llama.cpp/conversion/*"], check=True)
    return root


_CONVERT = """import sys, runpy
src = sys.argv[1]; sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
# our byte-level tokenizer is not one the converter fingerprints: name its pre-tokenizer
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_cpp_gguf(kind: str) -> Path | None:
    """GGUF files: f32 from llama.cpp's converter, Q4_0 / Q4_K_M from llama.cpp's quantizer.

    Known limits (issue notes): the converter refuses a tokenizer without BPE merges, so it reads a copy of the
    checkpoint whose tokenizer gains one merge ("Ġ t", replacing an unused reserved token); it hard-codes Llama 4's
    attention chunk to 8192 (attention_chunk_size is not written), so llama.cpp agrees with transformers only
    within the first 256 tokens here; speed is what is compared."""
    conv = llama_cpp_converter()
    if conv is None:
        return None
    f32 = WORK / "decode-gguf-f32.gguf"
    if not f32.is_file():
        src = WORK / "decode-1g-gguf-src"
        src.mkdir(exist_ok=True)
        for f in MODEL.iterdir():
            if f.name != "tokenizer.json" and not (src / f.name).exists():
                (src / f.name).symlink_to(f.resolve())
        tok = json.loads((MODEL / "tokenizer.json").read_text())
        tok["model"]["vocab"].pop("<|reserved_264|>")
        tok["model"]["vocab"]["Ġt"] = 264
        tok["added_tokens"] = [a for a in tok["added_tokens"] if a["content"] != "<|reserved_264|>"]
        tok["model"]["merges"] = [["Ġ", "t"]]
        (src / "tokenizer.json").write_text(json.dumps(tok))
        script = WORK / "convert_hf_to_gguf_wrapper.py"
        script.write_text(_CONVERT)
        subprocess.run([sys.executable, str(script), str(conv), str(src), "--outfile", str(f32), "--outtype", "f32"],
                       check=True, capture_output=True)
    if kind == "f32":
        return f32
    out = WORK / f"decode-gguf-{kind}.gguf"
    if not out.is_file() and (LLAMA_BIN / "llama-quantize").is_file():
        subprocess.run([str(LLAMA_BIN / "llama-quantize"), str(f32), str(out), kind, "2"], check=True, capture_output=True)
    if not out.is_file():
        import ctypes

        import llama_cpp

        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}"), 2
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(p)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize to {kind}")
    return out


def engine_model(engine: str) -> Path | None:
    """The file or folder an engine runs (made on first use); None when the engine is not installed."""
    if engine == "onnx-fp32":
        return l4_export("onnx-fp32", "onnx")
    if engine.startswith("path:"):  # any export folder, run by our runtime (e.g. one made by an earlier commit)
        return Path(engine.removeprefix("path:"))
    if engine == "genai-int4":  # onnxruntime-genai's own generator on our int4 export
        return l4_export("onnx-int4", "onnx", "--quant", "int4")
    if engine in ("onnx-int4", "onnx-fp8", "onnx-int8"):
        return l4_export(engine, "onnx", "--quant", engine.split("-")[1])
    if engine in ("mlx-fp32", "mlx-lm-fp32"):
        return l4_export("mlx-fp32", "mlx")
    if engine in ("mlx-int4", "mlx-lm-on-l4-int4"):
        return l4_export("mlx-int4", "mlx", "--quant", "int4")
    if engine.startswith("mlx-uniform-"):  # every linear and the embedding at one width, as mlx-lm's -q --q-bits
        bits, group = engine.removeprefix("mlx-uniform-").split("-g")
        recipe = WORK / f"uniform-{bits}-g{group}.toml"
        recipe.write_text(f'name = "uniform-{bits}-g{group}"\n[[rule]]\nmatch = "*.router.weight"\nscheme = "float"\n'
                          f'[[rule]]\nmatch = "*norm.weight"\nscheme = "float"\n[[rule]]\nmatch = "*"\n'
                          f'scheme = "int{bits}"\ngroup_size = {group}\nsymmetric = false\n')
        return l4_export(engine, "mlx", "--quant", str(recipe))
    if engine.startswith(("onnx-mixed", "mlx-mixed")):  # mixed:B placed on the weights alone (no calibration:
        fmt, budget = engine.split("-mixed")                # speed only); -pe: mixed:B:per-expert; -w2468: only
        if "-w" in budget:                                   # widths 2, 4, 6, 8 (a recipe's widths = [...])
            budget, ws = budget.split("-w")
            recipe = WORK / f"mixed-{budget}-w{ws}.toml"
            recipe.write_text(f'budget = "{budget}"\nwidths = [{", ".join(ws)}]\n')
            return l4_export(engine, fmt, "--quant", str(recipe))
        # -pe / -pp: per expert / per projection; neither: the CLI's default (ONNX CPU: per expert from 2.75 bits)
        quant = f"mixed:{budget.removesuffix('-pe').removesuffix('-pp')}" + {"-pe": ":per-expert", "-pp": ":per-projection"}.get(budget[-3:], "")
        return l4_export(engine, fmt, "--quant", quant)
    if engine in MLX_LM_BITS:
        return mlx_lm_4bit(l4_export("mlx-fp32", "mlx"), *MLX_LM_BITS[engine])
    if engine == "transformers-fp32":
        return MODEL
    if engine.startswith("llama.cpp"):
        return llama_cpp_gguf(engine.split("-", 1)[1])
    if engine.startswith("llama-bench-"):
        return llama_cpp_gguf(engine.removeprefix("llama-bench-"))
    raise ValueError(engine)


# ---- bytes a decode token reads ----------------------------------------------------------------------------------
def l4_bytes_per_token(export: Path) -> int:
    """From the export plan: every tensor a token reads (routed experts: 1/E of each, the embedding: one row)."""
    from l4export.folder import read_export_info
    from l4export.plan import make_plan
    from l4export.quant.recipe import placed_recipe
    from l4export.spec import load_spec

    info, spec = read_export_info(export), load_spec(MODEL)
    q = info.quant
    recipe = None if q is None else placed_recipe(q.recipe, q.schemes, q.placement)  # what was written, tensor by tensor
    plan = make_plan(spec, info.format, info.dtype, info.target, recipe, calibrated=True)
    return _active(plan.by_tensor, spec.num_experts, spec.vocab_size)


def _active(by_tensor: dict[str, int], experts: int, vocab: int) -> int:
    return int(sum(n / experts if ".experts." in name else n / vocab if "embed_tokens" in name else n
                   for name, n in by_tensor.items()))


def gguf_bytes_per_token(path: Path) -> int:
    conv = llama_cpp_converter()
    sys.path[:0] = [str(conv / "gguf-py")]
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    by = {t.name: int(t.n_bytes) for t in r.tensors}
    return int(sum(n / 16 if "_exps" in k else n / 32000 if k == "token_embd.weight" else n for k, n in by.items()))


def safetensors_bytes_per_token(folder: Path) -> int:
    """mlx-lm exports: tensor bytes by name (``switch_mlp``/``experts`` stacks: 1/E; the embedding: one row)."""
    import struct

    by: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        by.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    by = {k.replace("switch_mlp", "experts"): v for k, v in by.items()}
    return _active(by, 16, 32000)


def bytes_per_token(engine: str, model: Path) -> int | None:
    if engine.startswith(("onnx", "genai", "mlx-fp32", "mlx-int4", "mlx-mixed", "mlx-lm-fp32", "mlx-lm-on-l4", "path:")):
        return l4_bytes_per_token(model)
    if engine in MLX_LM_BITS:
        return safetensors_bytes_per_token(model)
    if engine.startswith(("llama.cpp", "llama-bench")):
        return gguf_bytes_per_token(model)
    if engine == "transformers-fp32":
        return 4 * 514475008  # eager MoE runs every expert on every token
    return None


def bandwidth_gbs(threads: int = 2, mb: int = 256, reps: int = 5) -> float:
    """Copy bandwidth of ``threads`` numpy copies at once (read + write bytes per second), median of ``reps``."""
    arrays = [(np.ones(mb << 18, np.float32), np.empty(mb << 18, np.float32)) for _ in range(threads)]
    rates = []
    for _ in range(reps):
        ts = [threading.Thread(target=np.copyto, args=(dst, src)) for src, dst in arrays]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        rates.append(2 * threads * (mb << 20) / (time.perf_counter() - t) / 1e9)
    return float(np.median(rates))


# ---- one engine in one process ------------------------------------------------------------------------------------
def _timed_decode(step, first: int, n: int) -> tuple[float, int]:
    """Median seconds of ``n`` greedy decode steps (``step(tok) -> logits``), and the last token."""
    tok, times = first, []
    for _ in range(n):
        t = time.perf_counter()
        logits = step(tok)
        times.append(time.perf_counter() - t)
        tok = int(np.argmax(logits))
    return float(np.median(times)), tok


def _genai_threads(model: Path, threads: int) -> Path:
    """The export as genai sees it, pinned to ``threads`` intra-op threads like every other engine (genai's default is
    ORT's: every core the machine reports, more than the 2 this VM lets us use): a folder of links beside it with
    its own genai_config.json."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="genai-", dir=WORK))
    for f in model.iterdir():
        (tmp / f.name).symlink_to(f)
    cfg = json.loads((model / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (tmp / "genai_config.json").unlink()
    (tmp / "genai_config.json").write_text(json.dumps(cfg))
    return tmp


def run_engine(engine: str, model: Path, prompt: int, new: int, threads: int) -> dict:
    """Prefill ``prompt`` random token ids, then ``new`` greedy decode steps; times in seconds."""
    ids = np.random.default_rng(0).integers(300, 30000, prompt).tolist()
    if engine.startswith(("onnx", "mlx-fp32", "mlx-int4", "mlx-mixed", "mlx-uniform", "path:")):
        from l4export.runtimes import load_runtime

        rt = load_runtime(model)
        rt.reset()
        rt.reserve(prompt + new + 1)
        t = time.perf_counter()
        logits = rt.forward(ids, last_only=True)[-1]
        pre = time.perf_counter() - t
        dec, _ = _timed_decode(lambda tok: rt.forward([tok])[-1], int(np.argmax(logits)), new)
    elif engine.startswith("genai"):
        import onnxruntime_genai as og

        model = _genai_threads(model, threads)
        cfg = og.Config(str(model))
        cfg.clear_providers()  # CPU
        m = og.Model(cfg)
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=prompt + new + 1, do_sample=False)
        gen = og.Generator(m, params)
        t = time.perf_counter()
        gen.append_tokens(np.array(ids, dtype=np.int32))
        pre = time.perf_counter() - t

        def step(_tok):
            gen.generate_next_token()
            return gen.get_logits()[0, -1]

        dec, _ = _timed_decode(step, 0, new)
    elif engine.startswith("mlx-lm"):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        m, _ = load(str(model))
        cache = make_prompt_cache(m)
        t = time.perf_counter()
        logits = m(mx.array([ids]), cache=cache)[0, -1]
        mx.eval(logits)
        pre = time.perf_counter() - t

        def step(tok):
            out = m(mx.array([[tok]]), cache=cache)[0, -1]
            mx.eval(out)
            return np.array(out)

        dec, _ = _timed_decode(step, int(np.argmax(np.array(logits))), new)
    elif engine == "transformers-fp32":
        import torch

        from l4export.runtimes.reference import load_reference

        torch.set_num_threads(threads)
        m = load_reference(model)
        with torch.no_grad():
            t = time.perf_counter()
            out = m(input_ids=torch.tensor([ids]), use_cache=True)
            pre = time.perf_counter() - t
            past = [out.past_key_values]

            def step(tok):
                o = m(input_ids=torch.tensor([[tok]]), past_key_values=past[0], use_cache=True)
                past[0] = o.past_key_values
                return o.logits[0, -1].numpy()

            dec, _ = _timed_decode(step, int(out.logits[0, -1].argmax()), new)
    elif engine.startswith("llama-bench"):
        return {"prefill_tok_s": llama_bench(model, threads, prompt, 0, 0), "decode_tok_s": llama_bench(model, threads, 0, new, prompt),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    else:  # llama.cpp
        llm = llama_cpp(model, prompt + new + 8, threads)
        t = time.perf_counter()
        llm.eval(ids)
        pre = time.perf_counter() - t

        def step(tok):
            llm.eval([tok])
            return llama_cpp_logits(llm)

        dec, _ = _timed_decode(step, int(np.argmax(llama_cpp_logits(llm))), new)
    return {"prefill_tok_s": prompt / pre, "decode_tok_s": 1.0 / dec,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def llama_bench(model: Path, threads: int, prompt: int, new: int, depth: int) -> float:
    """tokens/s of one llama-bench test (pp PROMPT, or tg NEW at depth DEPTH), one repetition (the runs repeat)."""
    out = subprocess.run([str(LLAMA_BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-fa", "1",
                          "-p", str(prompt), "-n", str(new), "-d", str(depth), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def llama_cpp(model: Path, n_ctx: int, threads: int):
    """llama.cpp through llama-cpp-python, set as llama-bench -t THREADS -fa 1 runs it: flash attention, an f16
    cache, the same threads for batches and for single tokens, batches of 512."""
    from llama_cpp import Llama

    return Llama(model_path=str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 n_ubatch=512, flash_attn=True, verbose=False)


def llama_cpp_logits(llm) -> np.ndarray:
    """The last token's logits (llama-cpp-python keeps them in its scores only with logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def available(engine: str) -> bool:
    import importlib.util

    if engine.startswith("llama-bench"):
        return (LLAMA_BIN / "llama-bench").is_file()
    need = {"llama.cpp": "llama_cpp", "mlx": "mlx", "transformers": "transformers", "onnx": "onnxruntime",
            "genai": "onnxruntime_genai", "path:": "l4export"}
    return importlib.util.find_spec(need[next(k for k in need if engine.startswith(k))]) is not None


# ---- driver ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="the model's attention_chunk_size (8192: Llama 4's)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--tag", default="", help="results/decode[-TAG]-DATE.json (a second run of the day keeps the first)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global MODEL, CHUNK
    CHUNK = args.chunk
    MODEL = WORK / ("decode-1g" if CHUNK == 256 else f"decode-1g-c{CHUNK}")
    if args.worker:
        print(json.dumps(run_engine(args.worker, Path(args.model), args.prompt, args.new, args.threads)))
        return
    build_model(MODEL)
    engines = [e for e in args.engines.split(",") if e]
    models = {}
    for e in engines:
        if available(e) and (m := engine_model(e)) is not None:
            models[e] = m
        else:
            print(f"{e}: not installed, skipped")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {e: [] for e in models}
    for r in range(args.runs):
        order = list(models)[r % len(models):] + list(models)[: r % len(models)]  # interleaved, rotated
        for e in order:
            m = measure([sys.executable, __file__, "--worker", e, "--model", str(models[e]), "--prompt", str(args.prompt),
                         "--new", str(args.new), "--threads", str(args.threads)], env=env)
            res = json.loads(m["output_tail"].strip().splitlines()[-1])
            res["process_peak_rss_mb"] = m["peak_rss_mb"]
            runs[e].append(res)
            print(f"run {r + 1}/{args.runs} {e}: decode {res['decode_tok_s']:.1f} tok/s, prefill {res['prefill_tok_s']:.1f}")
    bw = bandwidth_gbs(args.threads)
    report(runs, models, bw, args)


def report(runs: dict, models: dict, bw: float, args) -> None:
    med = {e: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for e, rs in runs.items()}
    for e, m in med.items():
        b = bytes_per_token(e, models[e])
        m["bytes_per_token"] = b
        m["bandwidth_share"] = None if b is None else m["decode_tok_s"] * b / (bw * 1e9)
    ref = {"mlx-lm-4bit": "vs mlx-lm 4-bit", "onnx-fp32": "vs our ONNX fp32", "llama.cpp-Q4_0": "vs llama.cpp Q4_0",
           "llama-bench-Q4_0": "vs llama.cpp Q4_0", "llama-bench-Q8_0": "vs llama.cpp Q8_0"}
    rows = []
    for e, m in med.items():
        row = {"engine": e, "decode tok/s": f"{m['decode_tok_s']:.1f}", "prefill tok/s": f"{m['prefill_tok_s']:.1f}",
               "peak RSS MB": f"{m['process_peak_rss_mb']:.0f}",
               "MB/token": "" if m["bytes_per_token"] is None else f"{m['bytes_per_token'] / 1e6:.1f}",
               "% bandwidth": "" if m["bandwidth_share"] is None else f"{100 * m['bandwidth_share']:.1f}"}
        for k, label in ref.items():
            if k in med:
                row[label] = f"{m['decode_tok_s'] / med[k]['decode_tok_s']:.2f}x"
        rows.append(row)
    print(f"\nbandwidth ceiling (2-thread copy): {bw:.1f} GB/s; prompt {args.prompt}, {args.new} decode steps, "
          f"medians of {args.runs}\n")
    print(table(rows, ["engine", "decode tok/s", "prefill tok/s", "peak RSS MB", "MB/token", "% bandwidth",
                       *[v for k, v in ref.items() if k in med]]))
    goals = decode_goals(med)
    for k, v in goals.items():
        print(f"{'MET   ' if v['met'] else 'MISSED'} {k}: {v['value']}")
    out = {"bandwidth_gbs": bw, "prompt": args.prompt, "new": args.new, "runs": args.runs,
           "threads": args.threads, "medians": med, "all_runs": runs, "goals": goals}
    path = save_result("decode" + (f"-{args.tag}" if args.tag else ""), out, png=lambda png: plot(med, png))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


RATIO_GOALS = (  # (engine, against, at least, what it says): a goal reported when both engines ran
    ("genai-int4", "onnx-int4", 0.95, "onnxruntime-genai on our int4 export >= 0.95x our runtime (issue 27)"),
    ("onnx-int4", "mlx-lm-4bit", 10, "ONNX int4 decode >= 10x mlx-lm 4-bit"),
    ("onnx-int4", "onnx-fp32", 2.5, "ONNX int4 decode >= 2.5x our ONNX fp32"),
    ("onnx-int4", "llama.cpp-Q4_0", 0.5, "ONNX int4 decode >= 0.5x llama.cpp Q4_0"),
    ("onnx-int4", "llama-bench-Q4_0", 1.0, "ONNX int4 decode >= llama.cpp Q4_0 (llama-bench; issue 27)"),
    ("onnx-int4", "llama-bench-Q4_K_M", 1.0, "ONNX int4 decode >= llama.cpp Q4_K_M (llama-bench; issue 27)"),
    ("onnx-int8", "llama-bench-Q8_0", 1.0, "ONNX int8 decode >= llama.cpp Q8_0 (llama-bench; issue 27)"),
    ("onnx-int8", "llama-bench-BF16", 1.0, "ONNX int8 decode >= llama.cpp BF16 (llama-bench; issue 27)"),
    ("onnx-fp8", "onnx-fp32", 1.0, "ONNX fp8 decode >= our ONNX fp32"),
    ("mlx-int4", "mlx-lm-on-l4-int4", 1.0, "MLX int4 decode >= mlx-lm on the same export"),
    ("onnx-mixed3.0", "onnx-int4", 1.0, "ONNX mixed:3.0 decode >= the int4 preset's (issue 26)"),
    ("onnx-mixed3.0-pp", "onnx-int4", 1.0, "ONNX mixed:3.0 per projection decode >= the int4 preset's (issue 26)"),
    ("onnx-mixed3.0-pe", "onnx-mixed3.0-pp", 1.0, "ONNX mixed:3.0 per expert decode vs per projection (issue 26)"),
    ("mlx-mixed3.5", "mlx-lm-3bit", 1.0, "MLX mixed:3.5 decode >= mlx-lm 3-bit g64 (3.5 bpw; issue 26)"),
    ("mlx-mixed3.0", "mlx-lm-2bit-g32", 1.0, "MLX mixed:3.0 decode >= mlx-lm 2-bit g32 (3.0 bpw; issue 26)"),
    ("mlx-mixed3.0-w2468", "mlx-lm-2bit-g32", 1.0, "MLX mixed:3.0 widths 2/4/6/8 decode >= mlx-lm 2-bit g32"),
    ("mlx-uniform-2-g32", "mlx-lm-2bit-g32", 1.0, "MLX int2 g32 everywhere: our runtime >= mlx-lm 2-bit g32"),
    ("mlx-uniform-3-g64", "mlx-lm-3bit", 1.0, "MLX int3 g64 everywhere: our runtime >= mlx-lm 3-bit g64"),
)


def decode_goals(med: dict) -> dict:
    g: dict = {}
    d = {e: m["decode_tok_s"] for e, m in med.items()}

    for a, b, goal, text in RATIO_GOALS:
        if a in d and b in d:
            g[text] = {"value": f"{d[a]:.1f} / {d[b]:.1f} = {d[a] / d[b]:.2f}x", "met": d[a] / d[b] >= goal}
    if med.get("onnx-int4", {}).get("bandwidth_share") is not None:
        s = med["onnx-int4"]["bandwidth_share"]
        g["ONNX int4 decode >= 25% of the bandwidth ceiling"] = {"value": f"{100 * s:.1f}%", "met": s >= 0.25}
    return g


def plot(med: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(med)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    a.barh(names, [med[n]["decode_tok_s"] for n in names], color=["C0" if n.startswith(("onnx", "mlx-fp", "mlx-int"))
                                                                  else "C7" for n in names])
    a.set_xlabel("decode tokens/s (2 threads)")
    a.invert_yaxis()
    b.barh(names, [100 * (med[n]["bandwidth_share"] or 0) for n in names], color="C1")
    b.set_xlabel("% of memory-bandwidth ceiling")
    b.invert_yaxis()
    fig.suptitle("Decode on a synthetic 1 GB Llama 4 MoE (l4export in blue)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
