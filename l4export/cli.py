"""The ``l4export`` command line: a thin click layer over the library functions.

Every L4ExportError becomes one line on stderr and its exit code (2 usage, 1 bad data or failed parity);
no tracebacks for user errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import click

from .capabilities import default_dtype
from .errors import MAX_LINE, MORE, L4ExportError, one_line, short_path, shorten

log = logging.getLogger("l4export")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is: the same cleanup (atomic outputs, calibration spill), one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                with contextlib.suppress(ValueError):  # only the main thread may set handlers
                    signal.signal(sig, _on_signal)
        try:
            return super().invoke(ctx)
        except L4ExportError as e:
            _error(str(e), e.detail)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            _error(f"interrupted ({signal.Signals(signum).name}); nothing was written")
            ctx.exit(128 + signum)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _error(f"{where}{e.strerror or e}")
            ctx.exit(1)


def _error(message: str, detail: str | None = None) -> None:
    """The one error line on stderr, at most MAX_LINE characters; the whole message (``detail``: the wrapped
    library's) is logged at INFO, shown with -v."""
    line = "error: " + one_line(message)
    if len(line) > MAX_LINE:
        detail = detail or message
        line = "error: " + _fit(one_line(message).removesuffix(MORE.strip()).rstrip(), MAX_LINE - len("error: "))
    click.echo(line, err=True)
    if detail:
        log.info("the full message: %s", one_line(detail))


def _fit(body: str, width: int) -> str:
    """A message in ``width`` characters: a long path it starts with cut to its end (which names the file); if that
    is not enough, its start and end (where the fix is) around " ... ", ending with MORE."""
    where, sep, rest = body.partition(": ")
    if sep and os.sep in where:
        body = short_path(where, max(width - len(sep + rest), 24)) + sep + rest
    return body if len(body) <= width else shorten(body, width - len(MORE)) + MORE


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More logging: -v progress, -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
@click.version_option(package_name="l4export")
def main(verbose: int, quiet: bool) -> None:
    """Export Llama 4 MoE checkpoints to ONNX and MLX, quantize them, run and verify them."""
    level = logging.ERROR if quiet else logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--check", is_flag=True, help="Read every tensor; report non-finite values (exit 1 if any).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "mlx"]), default=None, help="Dry run: plan this export.")
@click.option("--quant", default=None, help="Dry run: plan this recipe (int4, int8, fp8, fp8-block, mixed:BITS, mixed:SIZE "
              "or RECIPE.toml).")
@click.option("--dtype", default=None, help="Dry run: compute dtype (default as convert).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Dry run: ONNX provider.")
@click.option("--context", type=click.IntRange(1), default=None,
              help="Memory plan for N tokens of context (KV per layer type and dtype).")
def inspect(checkpoint: Path, as_json: bool, check: bool, fmt: str | None, quant: str | None, dtype: str | None,
            target: str, context: int | None) -> None:
    """Describe a Llama 4 checkpoint: layers, experts, attention pattern, sizes, parameter counts.

    With --format or --quant, also the dry run of that convert: its planned bytes per component. On an export
    folder: what it holds, and with --check its files against its sha256 manifest."""
    from .folder import EXPORT_INFO

    if (checkpoint / EXPORT_INFO).is_file():
        return _inspect_export(checkpoint, as_json, check)
    from .checkpoint import Checkpoint
    from .inspect import check as check_tensors
    from .inspect import (context_memory, format_context, format_mixed, format_plan, format_table, plan_summary,
                          summarize)

    ckpt = Checkpoint(checkpoint)
    info = summarize(ckpt)
    if fmt is not None or quant is not None:
        from .plan import make_plan
        from .quant.recipe import load_recipe

        fmt = fmt or "onnx"
        dtype = dtype or default_dtype(fmt, target)
        recipe = None if quant is None else load_recipe(quant)
        vision = ckpt.spec.vision is not None and not ckpt.vision_missing()
        if recipe is not None and recipe.budget is not None:
            from .mixed import budget_plan

            info["mixed"] = budget_plan(ckpt.spec, recipe, fmt, dtype, target)  # type: ignore[arg-type]
        else:
            info["plan"] = plan_summary(make_plan(ckpt.spec, fmt, dtype, target, recipe, calibrated=True,  # type: ignore[arg-type]
                                                  vision=vision))
    if context is not None:
        weights = info.get("mixed", {}).get("budget_bytes") or info.get("plan", {}).get("total_bytes")
        info["context"] = context_memory(ckpt.spec, context, weights)
    if check:
        info["check"] = check_tensors(ckpt, progress=not as_json)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(format_table(info))
        if "plan" in info:
            click.echo(format_plan(info["plan"]))
        if "mixed" in info:
            click.echo(format_mixed(info["mixed"]))
        if "context" in info:
            click.echo(format_context(info["context"]))
        if check:
            bad = info["check"]["non_finite"]
            click.echo(f"check: {info['check']['tensors_checked']} tensors read, "
                       + (f"{len(bad)} with non-finite values: {', '.join(list(bad)[:5])}" if bad else "all finite"))
    if check and info["check"]["non_finite"]:
        raise click.exceptions.Exit(1)


class _FiniteNonNegative(click.ParamType):
    """A float >= 0 that is a number (click's FloatRange lets nan through: every comparison with it is false)."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or v < 0:
            self.fail(f"{value!r} must be a finite number >= 0", param, ctx)
        return v


FINITE_NON_NEGATIVE = _FiniteNonNegative()


def _inspect_export(path: Path, as_json: bool, check: bool) -> None:
    from .inspect import describe_export, format_export
    from .manifest import check_manifest

    info = describe_export(path)
    if check:
        info["check"] = check_manifest(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_export(info))
    if check and not as_json:
        bad = info["check"]
        click.echo(f"check: {len(info['files']) - 1} files against manifest.sha256: "
                   + ("all intact" if not bad else f"{len(bad)} problem(s): {', '.join(bad[:5])}"))
    if check and info["check"]:
        raise click.exceptions.Exit(1)


@main.command("demo-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=None, help="Random weights drawn from this seed instead of the trained ones.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def demo_checkpoint(out: Path, seed: int | None, force: bool) -> None:
    """Write a tiny Scout-shaped Llama 4 checkpoint (no download, no torch)."""
    from .demo import write_demo_checkpoint

    write_demo_checkpoint(out, seed=seed, force=force)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "mlx"]), default="onnx", show_default=True)
@click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 for cpu/mlx, float16 for cuda).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="ONNX execution provider.")
@click.option("--quant", default=None, help="int4, int8, fp8, fp8-block (CUDA), mixed:BITS (e.g. mixed:3.0: average bits per "
              "weight) or mixed:SIZE (e.g. mixed:40GB; ONNX CPU from 2.75 bits gives each routed expert its own width, "
              "else one width per projection: :per-expert or :per-projection after either to choose), or a RECIPE.toml "
              "file.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Calibration text (.txt lines or .jsonl 'text').")
@click.option("--calib-samples", default=64, show_default=True, type=click.IntRange(1), help="Calibration samples.")
@click.option("--calib-seqlen", default=256, show_default=True, type=click.IntRange(1), help="Tokens per calibration sample.")
@click.option("--text-only", is_flag=True, help="Leave a multimodal checkpoint's vision tower out (smaller; no images).")
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(1), help="Images one prompt may carry.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Quantize and calibrate on a Ray cluster: local, auto, or ray://HOST:PORT (the distributed extra).")
@click.option("--tmp-dir", type=click.Path(path_type=Path), default=None,
              help="Where calibration spills its codes (default: inside the output's temporary folder).")
@click.option("--measurements", type=click.Path(path_type=Path), default=None,
              help="mixed:B: a measurements file, read when it fits this checkpoint and calibration, else written "
                   "(measure once, export at several budgets).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert(checkpoint: Path, out: Path, fmt: str, dtype: str | None, target: str, quant: str | None,
            calib: Path | None, calib_samples: int, calib_seqlen: int, text_only: bool, max_images: int,
            ray_address: str | None, tmp_dir: Path | None, measurements: Path | None, force: bool) -> None:
    """Convert a Hugging Face Llama 4 checkpoint to ONNX or MLX (with its vision path, unless --text-only)."""
    from .convert import ExportOptions
    from .convert import convert as run_convert

    if dtype is None:
        dtype = default_dtype(fmt, target)
    options = ExportOptions(format=fmt, dtype=dtype, target=target, text_only=text_only,  # type: ignore[arg-type]
                            max_images=max_images, ray=ray_address, tmp_dir=tmp_dir, measurements=measurements)
    if quant is not None:
        from .quant.recipe import load_recipe

        options.quant = load_recipe(quant)
    if calib is not None:
        if quant is None:
            raise click.UsageError("--calib needs --quant")
        from .quant.calib import CalibOptions

        options.calib = CalibOptions(path=calib, samples=calib_samples, seqlen=calib_seqlen)
    run_convert(checkpoint, out, options, force=force)
    click.echo(f"wrote {out}")


def _parse_ids(ids: str) -> list[int]:
    try:
        return [int(t) for t in ids.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter("--ids takes integers separated by commas or spaces") from None


@main.command()
@click.argument("export", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text (needs tokenizer.json in the export).")
@click.option("--ids", default=None, help="Prompt token ids, e.g. '1,15,27'.")
@click.option("-n", "--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=FINITE_NON_NEGATIVE, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this (0 < p <= 1).")
@click.option("--seed", default=0, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None, help="ONNX Runtime provider.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="MLX compute dtype (default: the export's where the device runs it, else float32).")
@click.option("--kv-dtype", type=click.Choice(["int8", "fp8"]), default=None,
              help="Quantize the KV cache as tokens arrive (fp8: MLX, or ONNX Runtime CUDA).")
@click.option("--prefill-step", type=int, default=None, help="Prompt tokens per step (default min(2048, chunk size)).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image for the prompt (repeat for more); placed at the prompt's <|image|> markers, else first.")
@click.option("--no-chat-template", is_flag=True, help="Send --prompt as is, not through the export's chat template.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the end-of-turn tokens (benchmarks).")
def run(export: Path, prompt: str | None, ids: str | None, max_new_tokens: int, temperature: float, top_p: float,
        seed: int, provider: str | None, dtype: str | None, kv_dtype: str | None, prefill_step: int | None,
        images: tuple[Path, ...], no_chat_template: bool, ignore_eos: bool) -> None:
    """Generate from an ONNX or MLX export, streaming tokens to stdout."""
    from .runtimes import load_runtime

    if (prompt is None) == (ids is None):
        raise click.UsageError("pass exactly one of --prompt or --ids")
    if images and prompt is None:
        raise click.UsageError("--image needs --prompt (the image tokens are laid out in the prompt text)")
    from .folder import read_export_info
    from .image import IMAGE_PLACEHOLDER
    from .runtimes.base import require_tokenizer
    from .runtimes.chat import render, stop_ids, template, user_turn

    fmt = read_export_info(export).format
    if prompt is not None:
        require_tokenizer(export)
    if dtype is not None and fmt != "mlx":
        raise click.UsageError(f"--dtype chooses the MLX compute dtype; this is a {fmt} export (its dtype is fixed at convert)")
    if provider is not None and fmt != "onnx":
        raise click.UsageError(f"--provider chooses the ONNX Runtime provider; this is a {fmt} export")
    rt = load_runtime(export, provider=provider, dtype=dtype, kv_dtype=kv_dtype, prefill_step=prefill_step)
    kw = dict(temperature=temperature, top_p=top_p, seed=seed)
    kw["stop"] = [] if ignore_eos else sorted(stop_ids(rt))
    if prompt is not None:
        own = not no_chat_template and IMAGE_PLACEHOLDER not in prompt and template(rt, fallback=False) is not None
        text = render(rt, user_turn(prompt, len(images)), fallback=False) if own else prompt
        for piece in rt.generate_text(text, max_new_tokens, images=list(images), add_bos=not own, **kw):
            click.echo(piece, nl=False)
        click.echo()
    else:
        for tok in rt.generate(_parse_ids(ids), max_new_tokens, **kw):
            click.echo(tok, nl=False)
            click.echo(" ", nl=False)
        click.echo()


@main.command()
@click.argument("export", type=click.Path(path_type=Path))
@click.option("-n", "--max-new-tokens", default=256, show_default=True, type=click.IntRange(1), help="Per answer.")
@click.option("--temperature", default=0.0, show_default=True, type=FINITE_NON_NEGATIVE, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--system", default=None, help="A system message first.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None, help="ONNX Runtime provider.")
@click.option("--kv-dtype", type=click.Choice(["int8", "fp8"]), default=None, help="Quantize the KV cache.")
def chat(export: Path, max_new_tokens: int, temperature: float, top_p: float, seed: int, system: str | None,
         provider: str | None, kv_dtype: str | None) -> None:
    """Talk to an export in the terminal (the conversation is kept; /reset forgets it; Ctrl-D leaves)."""
    from .folder import read_export_info
    from .runtimes import load_runtime
    from .runtimes.base import require_tokenizer

    read_export_info(export)  # not an export: that error first
    require_tokenizer(export)
    rt = load_runtime(export, provider=provider, kv_dtype=kv_dtype)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/reset":
            messages = list(start)
            click.echo("(conversation reset)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        for piece in rt.chat(messages, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed):
            answer.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": "".join(answer)})


@main.command()
@click.argument("export", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--name", default=None, help="The model name clients use (default: the export folder's name).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None, help="ONNX Runtime provider.")
@click.option("--kv-dtype", type=click.Choice(["int8", "fp8"]), default=None, help="Quantize the KV cache.")
@click.option("--api-key", default=None, envvar="L4EXPORT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--max-tokens", "max_tokens", default=8192, show_default=True, type=click.IntRange(1),
              help="The most max_tokens a request may ask.")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for the model (429 beyond).")
@click.option("--max-body-bytes", default=32 << 20, show_default=True, type=click.IntRange(1024),
              help="Largest request body (413 beyond).")
@click.option("--prompt-cache", default=4, show_default=True, type=click.IntRange(0),
              help="Sequences kept beside the live one for prompt reuse (alternating conversations; with --parallel "
                   "each slot keeps its own instead).")
@click.option("--prompt-cache-bytes", default=2 << 30, show_default=True, type=click.IntRange(0),
              help="Bytes of KV the kept sequences may take.")
@click.option("--parallel", "-np", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Sequences decoded together (continuous batching; each slot keeps its own prompt cache).")
@click.option("--ctx-size", "-c", default=None, type=click.IntRange(2),
              help="Tokens each --parallel slot holds, prompt and answer [default: max_position_embeddings, <= 8192].")
def serve(export: Path, host: str, port: int, name: str | None, provider: str | None, kv_dtype: str | None,
          api_key: str | None, max_tokens: int, max_queue: int, max_body_bytes: int, prompt_cache: int,
          prompt_cache_bytes: int, parallel: int, ctx_size: int | None) -> None:
    """Serve an export over an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions,
    /health); one log line per request."""
    import logging

    from .serve import Limits
    from .serve import serve as run_server

    if logging.getLogger().getEffectiveLevel() <= logging.WARNING:  # the request lines (-q: errors only)
        logging.getLogger("l4export.serve").setLevel(logging.INFO)
    run_server(str(export), host=host, port=port, name=name, provider=provider, kv_dtype=kv_dtype,
               limits=Limits(api_key, max_body_bytes, max_tokens, max_queue, prompt_cache, prompt_cache_bytes, parallel,
                             ctx_size))


@main.command()
@click.argument("export", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path), help="The source checkpoint folder.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="Prompts file (one per line; or ids).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Write a JUnit XML report (for CI).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--greedy-tokens", default=32, show_default=True, type=click.IntRange(0),
              help="Greedy tokens compared per prompt (0: none).")
@click.option("--kv-dtype", type=click.Choice(["int8", "fp8"]), default=None,
              help="Run with a quantized KV cache; also report KL against the float cache.")
@click.option("--prefill-step", type=int, default=None, help="Prompt tokens per step.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Also verify prompts with this image (repeat for more; each alone, then all together).")
def verify(export: Path, reference: Path, prompts: Path | None, json_out: Path | None, junit: Path | None,
           provider: str | None, greedy_tokens: int, kv_dtype: str | None, prefill_step: int | None,
           images: tuple[Path, ...]) -> None:
    """Compare an export's logits with transformers (float32); exit 1 outside the thresholds."""
    from .outputs import check_writable
    from .verify import verify as run_verify

    for report_path in (json_out, junit):  # before the run, not after it
        if report_path is not None:
            check_writable(report_path)
    report = run_verify(export, reference, prompts=prompts, provider=provider, greedy_tokens=greedy_tokens,
                        kv_dtype=kv_dtype, prefill_step=prefill_step, images=list(images))
    click.echo(report.table())
    if json_out:
        json_out.write_text(report.to_json())
    if junit:
        junit.write_text(report.to_junit())
    if not report.passed:
        raise click.exceptions.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
