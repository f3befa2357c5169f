"""The early-fusion vision path: ONNX (three-model layout) and MLX exports against transformers'
Llama4ForConditionalGeneration, onnxruntime-genai on the same files, the CLI, and bad input.

The checkpoint is the tiny Scout (tests/builders.py): a vision tower with Scout's structure (2 layers, 56-pixel
tiles of 14-pixel patches, pixel shuffle 0.5 -> 4 image tokens per tile) and the image tokens in its tokenizer.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from l4export.convert import ExportOptions, convert
from l4export.cli import main
from l4export.errors import ImageError, MappingError
from l4export.runtimes import load_runtime
from l4export.verify import compare

TOL = 1e-4  # the gate: relative max error of fp32 features and logits


def picture(h: int, w: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y) % 256], -1).astype(np.uint8)
    return Image.fromarray(a // 2 + np.random.default_rng(seed).integers(0, 120, a.shape, dtype=np.uint8))


ONE = picture(40, 50, 1)  # one tile
WIDE = picture(90, 200, 2)  # 1 x 4 tiles + the global tile


@pytest.fixture(scope="module")
def ref(scout):
    from l4export.runtimes.reference import VisionReference

    return VisionReference(scout)


def _pixels(rt, images) -> np.ndarray:
    return np.concatenate([p.pixel_values for p in rt.process_images(images)])


def _parity(rt, ref, prompt: str, images: list) -> None:
    ids, feats = rt.prompt_ids(prompt, images)
    pixels = _pixels(rt, images)
    want = ref.image_features(pixels)
    assert np.abs(feats - want).max() <= TOL * np.abs(want).max()
    r = ref.logits(ids, pixels)
    assert compare(r, rt.logits(ids, feats))["rel"] <= TOL
    assert compare(r, rt.logits_incremental(ids, 1, feats))["rel"] <= TOL
    assert list(rt.generate(ids, 8, stop=[], features=feats)) == ref.greedy(ids, pixels, 8)


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_one_and_two_images_match_transformers(fmt, export, scout, ref):
    """Image features, logits (full forward and token by token) and greedy tokens with one image and with two
    (one multi-tile), ONNX and MLX, float32."""
    rt = load_runtime(export(scout, fmt))
    _parity(rt, ref, "What is in this picture?", [ONE])
    _parity(rt, ref, "<|image|> and <|image|>: compare them.", [ONE, WIDE])


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_patch_token_in_text_without_images_is_a_token(fmt, export, scout, ref):
    """A <|patch|> id in a prompt with no image embeds as the token it is, as transformers' text model does (the
    ONNX embedding graph scattered image features there whatever their number, and failed with none)."""
    rt = load_runtime(export(scout, fmt))
    ids = [1, 40, rt.spec.vision.image_token_id, 41, rt.spec.vision.image_token_id, 42]
    assert compare(ref.logits(ids), rt.logits(ids))["rel"] <= TOL


def test_onnx_layout_and_genai_config(export, scout):
    out = export(scout, "onnx")
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["vision"]["filename"] == "vision.onnx" and cfg["embedding"]["filename"] == "embedding.onnx"
    assert cfg["decoder"]["filename"] == "model.embeds.genai.onnx" and "input_ids" not in cfg["decoder"]["inputs"]
    import onnx

    dec = onnx.load(str(out / "model.embeds.onnx"), load_external_data=False).graph
    assert [i.name for i in dec.input][0] == "inputs_embeds"
    assert not any(n.name.startswith("model.embed_tokens/") for n in dec.node)  # the lookup lives in embedding.onnx
    assert (out / "model.embeds.kv-int8.onnx").is_file()


def test_onnxruntime_genai_runs_the_three_models(export, scout):
    """genai's multimodal pipeline (vision -> embedding -> decoder) on our files and our pixel_values gives our
    greedy tokens, with an image and on text alone."""
    og = pytest.importorskip("onnxruntime_genai")
    out = export(scout, "onnx")
    rt = load_runtime(out)
    ids, feats = rt.prompt_ids("Describe <|image|> please.", [WIDE])
    model = og.Model(str(out))

    def genai(ids: list[int], pixels: np.ndarray | None, n: int = 8) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n)
        gen = og.Generator(model, params)
        inputs = og.NamedTensors()
        inputs["input_ids"] = np.asarray(ids, np.int32)[None]  # genai reads int32 here
        if pixels is not None:
            inputs["pixel_values"] = pixels
            inputs["num_image_tokens"] = np.array([len(feats)], np.int64)
        gen.set_inputs(inputs)
        toks = []
        while not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
        return toks

    assert genai(ids, _pixels(rt, [WIDE])) == list(rt.generate(ids, 8, stop=[], features=feats))
    text = rt.encode("Hello, Llama 4!")
    assert genai(text, None) == list(rt.generate(text, 8, stop=[]))


def test_text_only_export_and_images_refused(tmp_path, scout):

    out = convert(scout, tmp_path / "text", ExportOptions(format="onnx", text_only=True))
    assert not (out / "vision.onnx").exists() and json.loads((out / "l4export.json").read_text())["vision"] is None
    with pytest.raises(ImageError, match="no vision model"):
        load_runtime(out).prompt_ids("hi", [ONE])
    ONE.save(tmp_path / "one.png")
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "hi", "--image", str(tmp_path / "one.png")])
    assert r.exit_code == 1 and "no vision model" in r.stderr


def test_cli_run_and_verify_with_images(tmp_path, export, scout):
    ONE.save(tmp_path / "one.png")
    WIDE.save(tmp_path / "wide.jpg", quality=95)
    out = export(scout, "onnx")
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "What is it?", "--image", str(tmp_path / "one.png"),
                                  "-n", "4"])
    assert r.exit_code == 0, r.output
    rep = tmp_path / "verify.json"
    r = CliRunner().invoke(main, ["verify", str(out), "--reference", str(scout), "--image", str(tmp_path / "one.png"),
                                  "--image", str(tmp_path / "wide.jpg"), "--greedy-tokens", "4", "--json", str(rep)])
    assert r.exit_code == 0, r.output
    results = {x["name"]: x for x in json.loads(rep.read_text())["results"]}
    assert {"image1", "image2", "all-images"} <= set(results)
    assert results["all-images"]["images"] == 2 and results["all-images"]["image_features_rel"] <= TOL


def test_chat_template_places_the_images(tmp_path, export, scout):
    """run --prompt goes through the export's chat template: one <|image|> per image, then the text."""
    out = shutil.copytree(export(scout, "onnx"), tmp_path / "chat")
    (out / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m.role }}<|header_end|>\n\n"
        "{% for c in m.content %}{% if c.type == 'image' %}<|image|>{% else %}{{ c.text }}{% endif %}{% endfor %}"
        "<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}")
    from l4export.runtimes.chat import render, user_turn

    rt = load_runtime(out)
    chat = render(rt, user_turn("What is it?", 1), fallback=False)
    assert "<|header_start|>user" in chat and chat.count("<|image|>") == 1
    want = "".join(rt.generate_text(chat, 4, images=[ONE], add_bos=False))
    ONE.save(tmp_path / "one.png")
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "What is it?", "--image", str(tmp_path / "one.png"),
                                  "-n", "4"])
    assert r.exit_code == 0 and r.stdout.rstrip("\n") == want


def _one_line(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output, result.stderr


def test_bad_image_input_cli(tmp_path, scout):

    out = convert(scout, tmp_path / "one-image", ExportOptions(format="onnx", max_images=1))
    ONE.save(tmp_path / "one.png")
    (tmp_path / "text.png").write_text("hello")
    data = (tmp_path / "one.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    run = lambda *a: CliRunner().invoke(main, ["run", str(out), "-n", "2", *a])  # noqa: E731
    img = str(tmp_path / "one.png")
    _one_line(run("--prompt", "x", "--image", str(tmp_path / "text.png")), 1, "not an image file")
    _one_line(run("--prompt", "x", "--image", str(tmp_path / "cut.png")), 1, "truncated")
    _one_line(run("--prompt", "x", "--image", img, "--image", img), 1, "at most 1")
    _one_line(run("--prompt", "<|image|> vs <|image|>", "--image", img), 1, "2 <|image|> placeholders but 1")
    _one_line(run("--prompt", "<|image|> what?"), 1, "no image was given")
    usage = run("--ids", "1,2", "--image", img)  # a click usage error: exit 2, its own "Error:" line
    assert usage.exit_code == 2 and "--image needs --prompt" in usage.stderr and "Traceback" not in usage.output
    assert run("--prompt", "a dot", "--image", str(tmp_path / "dot.png")).exit_code == 0  # 1x1 pixel: a valid image


def test_vision_tensors_are_checked(tmp_path, scout):
    """A multimodal config whose files lack the vision tensors: an error naming --text-only (which still works)."""
    from safetensors.torch import load_file, save_file

    from l4export.checkpoint import Checkpoint

    src = shutil.copytree(scout, tmp_path / "no-vision")
    for f in src.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(f).items() if not k.startswith("vision_model.")}, f)
    idx = src / "model.safetensors.index.json"
    if idx.is_file():
        data = json.loads(idx.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith("vision_model.")}
        idx.write_text(json.dumps(data))
    assert Checkpoint(src).vision_missing()
    with pytest.raises(MappingError, match="--text-only"):
        convert(src, tmp_path / "out", ExportOptions(format="onnx"))
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", ExportOptions(format="onnx", text_only=True))


VISION_INT8 = """
name = "vision-int8"
[[rule]]
match = "vision_model.patch_embedding.*"   # 588 inputs: no group of 32/64/128 divides it
scheme = "float"
[[rule]]
match = "vision_model.*layernorm*"
scheme = "float"
[[rule]]
match = "vision_model.*.weight"
scheme = "int8"
group_size = 32
[[rule]]
match = "multi_modal_projector.*"
scheme = "int8"
group_size = 32
"""


def test_vision_at_int8(tmp_path, scout, ref):
    """A recipe puts the vision linears at int8: ONNX (MatMulNBits) features close to the float ones; the text model
    stays float; the plan counts the vision bytes."""
    from l4export.checkpoint import Checkpoint
    from l4export.plan import make_plan

    recipe = _vision_int8(tmp_path)
    out = convert(scout, tmp_path / "onnx", ExportOptions(format="onnx", quant=recipe))
    info = json.loads((out / "l4export.json").read_text())["onnx"]
    assert info["vision"]["quant_nodes"]["MatMulNBits"] == 2 * 6 + 3  # per layer q k v o fc1 fc2; adapter; projector
    rt = load_runtime(out)
    pixels = _pixels(rt, [WIDE])
    want = ref.image_features(pixels)
    got = rt.image_features(rt.process_images([WIDE]))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-5 < err < 5e-2  # quantized, and close
    text = rt.encode("Hello")
    assert compare(ref.logits(text), rt.logits(text))["rel"] <= TOL  # text untouched
    plan = make_plan(Checkpoint(scout).spec, "onnx", "float32", recipe=recipe, vision=True)
    assert plan.by_component["vision"] > 0 and plan.scheme("multi_modal_projector.linear_1.weight").bits == 8


@pytest.mark.mlx
def test_vision_at_int8_mlx_equals_onnx(tmp_path, scout):
    """The same int8 vision recipe: MLX's features equal ONNX's (one grid, float activations on both)."""
    recipe = _vision_int8(tmp_path)
    rt = load_runtime(convert(scout, tmp_path / "onnx", ExportOptions(format="onnx", quant=recipe)))
    got = rt.image_features(rt.process_images([WIDE]))
    mrt = load_runtime(convert(scout, tmp_path / "mlx", ExportOptions(format="mlx", quant=recipe)))
    assert np.abs(mrt.image_features(mrt.process_images([WIDE])) - got).max() <= TOL * np.abs(got).max()


def _vision_int8(tmp_path):
    from l4export.quant.recipe import load_recipe

    (tmp_path / "v8.toml").write_text(VISION_INT8)
    return load_recipe(str(tmp_path / "v8.toml"))


@pytest.mark.mlx
def test_mlx_vlm_reads_the_mlx_export(export, scout, ref):
    """mlx-vlm's own llama4 model loads our MLX export strictly (every tensor, no extra) and computes image features
    from it; they differ from transformers by mlx-vlm's GELU approximation (tanh), ours do not."""
    import sys

    import mlx.core as mx
    from side_packages import mlx_vlm_dir

    sys.path.append(str(mlx_vlm_dir()))
    from mlx_vlm.models.llama4 import llama4 as vlm
    from mlx_vlm.models.llama4.config import ModelConfig, TextConfig, VisionConfig

    out = export(scout, "mlx")
    cfg = json.loads((out / "config.json").read_text())
    config = ModelConfig.from_dict(cfg)
    config.text_config, config.vision_config = TextConfig.from_dict(cfg["text_config"]), VisionConfig.from_dict(cfg["vision_config"])
    model = vlm.Model(config)
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    weights = model.vision_model.sanitize(model.language_model.sanitize(weights))
    model.load_weights(list(weights.items()), strict=True)
    rt = load_runtime(out)
    pixels = _pixels(rt, [WIDE])
    theirs = np.array(model.multi_modal_projector(model.get_image_features(mx.array(pixels), -1, "default").reshape(
        -1, cfg["vision_config"]["vision_output_dim"])))
    want = ref.image_features(pixels)
    assert np.abs(theirs - want).max() <= 5e-2 * np.abs(want).max()
    assert np.abs(rt.image_features(rt.process_images([WIDE])) - want).max() <= TOL * np.abs(want).max()


def test_float16_export_with_images_passes_verify(tmp_path, export, scout):
    """--dtype float16 (ONNX CPU): the vision graph runs in fp16 (LayerNorm statistics in fp32) and verify's fp16 gate
    (KL) holds on prompts with one and two images."""
    from l4export.verify import verify

    ONE.save(tmp_path / "one.png")
    WIDE.save(tmp_path / "wide.png")
    report = verify(export(scout, "onnx", "float16"), scout, greedy_tokens=4,
                    images=[tmp_path / "one.png", tmp_path / "wide.png"])
    assert report.passed, report.table()
    feats = [r.image_features_rel for r in report.results if r.images]
    assert len(feats) == 3 and max(feats) < 1e-2


def test_calibrated_report_covers_the_vision_tower(tmp_path, scout):
    """With --calib, quant_report.json lists the quantized vision linears (rounded to nearest: calibration runs the
    text model) with their weight SQNR, and its size table has a vision component."""
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"input_ids": rng.integers(4, 280, 24).tolist()}) for _ in range(4)))
    recipe = tmp_path / "r.toml"
    recipe.write_text(VISION_INT8 + '[[rule]]\nmatch = "*.feed_forward.experts.*"\nscheme = "int4"\ngroup_size = 32\n')
    out = tmp_path / "calibrated"
    r = CliRunner().invoke(main, ["convert", str(scout), "-o", str(out), "--quant", str(recipe), "--calib", str(calib),
                                  "--calib-samples", "4", "--calib-seqlen", "24"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "quant_report.json").read_text())
    vision = {n: e for n, e in report["tensors"].items() if n.startswith(("vision_model.", "multi_modal_projector."))}
    assert len(vision) == 2 * 6 + 3 and all(e["calibrated"] is False and e["weight_sqnr_rtn"] > 30 for e in vision.values())
    assert any(".experts." in n for n in report["tensors"])  # the calibrated text tensors are there too
    sizes = report["size_bytes"]["vision"]
    assert 0 < sizes["quantized"] < sizes["float"]
