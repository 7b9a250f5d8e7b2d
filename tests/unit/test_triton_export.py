"""``ldm-serve export-triton`` and the Triton model's Triton-free core (``worker/triton_model.py``).

The real server is in ``tests/tritonserver`` (``make triton-test``); here: the committed
``model_repository/`` is what the exporter writes, its configs have the structure Triton needs
(read with a small protobuf-text reader, since ``tritonclient``'s protos want another protobuf
than the main venv's), and :class:`TritonLDM` batches, validates and reproduces like the worker.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from launcher.triton_export import MODEL_TEMPLATE, config_pbtxt, export_triton_repository
from ldm.pipeline import GenerationRow, load_pipeline
from ldm_serve.errors import ConfigError, InvalidInput
from worker.triton_model import (
    INPUT_NAMES,
    PARAMETERS,
    TritonLDM,
    load_triton_pipeline,
    settings_from_config,
)

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "model_repository"


# --- a small reader of protobuf text format (enough for model configs) -----------------------------

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?)*\s*("(?:[^"\\]|\\.)*"|[{}\[\]:,]|[-\w.]+)')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "" or text[pos:].lstrip().startswith("#"):
                break
            raise ValueError(f"cannot read pbtxt at {text[pos:pos + 30]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def parse_pbtxt(text: str) -> dict:
    """Protobuf text as ``{field: [values]}`` (every field a list; messages are dicts)."""
    toks = _tokens(text)
    pos = 0

    def value() -> object:
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while toks[pos] != "]":
                items.append(value())
                if toks[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end: str | None) -> dict:
        nonlocal pos
        fields: dict[str, list] = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            assert re.fullmatch(r"[a-z_]+", name), f"bad field name {name!r}"
            pos += 1
            if toks[pos] == ":":
                pos += 1
            v = value()
            fields.setdefault(name, []).extend(v if isinstance(v, list) else [v])
            if pos < len(toks) and toks[pos] == ",":
                pos += 1
        pos += 1
        return fields

    return message(None)


def test_the_reader_reads_nested_messages_and_lists() -> None:
    got = parse_pbtxt('# c\nname: "m"\ninput [ { name: "A" dims: [ -1, 3 ] }, { name: "B" } ]\nd { x: 5 }\n')
    assert got == {"name": ["m"], "input": [{"name": ["A"], "dims": [-1, 3]}, {"name": ["B"]}], "d": [{"x": [5]}]}


# --- the committed repository ----------------------------------------------------------------------


def test_committed_repository_is_a_fresh_export_of_the_bundled_model(tmp_path: Path) -> None:
    repo = export_triton_repository(tmp_path, weights="reference")
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(COMMITTED) for p in COMMITTED.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts)  # fmt: skip
    assert written == committed, "regenerate: ldm-serve export-triton --out model_repository --weights reference"
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (COMMITTED / rel).read_bytes(), rel
    assert (repo.model_dir / "1" / "model.py").read_bytes() == MODEL_TEMPLATE.read_bytes()


@pytest.mark.parametrize(("path", "kind"), [("config.pbtxt", "KIND_GPU"), ("configs/cpu.pbtxt", "KIND_CPU")])
def test_committed_config_has_what_triton_and_model_py_need(path: str, kind: str) -> None:
    (model_dir,) = [p for p in COMMITTED.iterdir() if p.is_dir()]
    cfg = parse_pbtxt((model_dir / path).read_text())
    assert cfg["name"] == [model_dir.name] and cfg["backend"] == ["python"]
    assert cfg["max_batch_size"][0] >= 1
    assert cfg["dynamic_batching"][0]["max_queue_delay_microseconds"][0] > 0
    assert [g["kind"] for g in cfg["instance_group"]] == [[kind]]
    inputs = {i["name"][0]: i for i in cfg["input"]}
    assert set(inputs) <= set(INPUT_NAMES)
    required = {n for n, i in inputs.items() if i.get("optional") != ["true"]}
    assert required == {"PROMPT", "SEED"}  # the bundled model is not an inpainting one
    assert inputs["PROMPT"]["data_type"] == ["TYPE_STRING"] and inputs["SEED"]["data_type"] == ["TYPE_INT64"]
    assert all(i["dims"] == [1] for i in inputs.values())
    (output,) = cfg["output"]
    assert output == {"name": ["IMAGE"], "data_type": ["TYPE_UINT8"], "dims": [-1, -1, 3]}
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    assert set(params) == set(PARAMETERS)
    assert params["LDM_MODEL"] == "bundled" and params["LDM_BACKEND"] == "eager"


def test_inpainting_config_requires_image_and_mask() -> None:
    cfg = parse_pbtxt(config_pbtxt("m", kind="KIND_CPU", parameters={"LDM_MODEL": "x"}, inpainting=True))
    inputs = {i["name"][0]: i for i in cfg["input"]}
    assert inputs["IMAGE"]["dims"] == [-1, -1, 3] and "optional" not in inputs["IMAGE"]
    assert inputs["MASK"]["dims"] == [-1, -1] and "optional" not in inputs["MASK"]
    with pytest.raises(ValueError, match="KIND_GPU or KIND_CPU"):
        config_pbtxt("m", kind="GPU", parameters={})


# --- settings from config.pbtxt ---------------------------------------------------------------------


def _config(**params: str) -> dict:
    return {"parameters": {k: {"string_value": v} for k, v in params.items()}}


def test_settings_resolve_paths_and_the_instance_device(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "m.safetensors").write_bytes(b"")
    s = settings_from_config(
        _config(LDM_MODEL="weights/m.safetensors", LDM_BACKEND="torchscript", LDM_COMPILE_CACHE="compiled",
                LDM_CORE_WORKERS="2"),
        tmp_path, instance_kind="GPU", device_id=1,
    )  # fmt: skip
    assert s.model == tmp_path / "weights" / "m.safetensors" and s.compile_cache == tmp_path / "compiled"
    assert (s.device, s.backend, s.dtype, s.core_workers) == ("cuda:1", "torchscript", "float32", 2)
    bundled = settings_from_config(_config(LDM_MODEL="bundled"), tmp_path, instance_kind="KIND_CPU")
    assert bundled.device == "cpu" and bundled.model.is_file() and bundled.core_workers is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"LDM_MODEL": ""}, "LDM_MODEL is empty"),
        ({"LDM_MODEL": "nope.ckpt"}, "does not exist"),
        ({"LDM_MODEL": "bundled", "LDM_DTYPE": "int8"}, "LDM_DTYPE must be one of"),
        ({"LDM_MODEL": "bundled", "LDM_CORE_WORKERS": "0"}, "LDM_CORE_WORKERS must be an integer >= 1"),
    ],
)
def test_bad_parameters_are_config_errors_naming_them(tmp_path: Path, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_config(_config(**params), tmp_path)


# --- execute: batching, validation, reproducibility ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TritonLDM:
    from ldm.random_model import write_random_model

    path = write_random_model(tmp_path_factory.mktemp("tiny"))
    return TritonLDM(load_pipeline(path, core_workers=1))


def _request(prompts: list[str], seeds: list[int], **cols: list) -> dict[str, np.ndarray]:
    req = {"PROMPT": np.array([[p.encode()] for p in prompts], dtype=object),
           "SEED": np.array([[s] for s in seeds], dtype=np.int64)}  # fmt: skip
    dtypes = {"STEPS": np.int32, "GUIDANCE_SCALE": np.float32, "WIDTH": np.int32, "HEIGHT": np.int32,
              "NEGATIVE_PROMPT": object}  # fmt: skip
    for name, values in cols.items():
        req[name] = np.array([[v] for v in values], dtype=dtypes[name])
    return req


def test_rows_of_all_requests_run_batched_and_equal_their_solo_images(tiny: TritonLDM) -> None:
    calls: list[tuple[int, int, int]] = []
    generate = tiny.pipeline.generate

    def counting(rows, width, height, **kw):  # the real generate, counted
        calls.append((len(rows), width, height))
        return generate(rows, width, height, **kw)

    tiny.pipeline.generate = counting
    try:
        results = tiny.execute([
            _request(["a red circle", "a blue square"], [1, 2], STEPS=[4, 5], GUIDANCE_SCALE=[2.0, 4.0]),
            _request(["a cat"], [3], STEPS=[4], NEGATIVE_PROMPT=[b"dog"]),
            _request(["a cat"], [4], STEPS=[2], WIDTH=[32], HEIGHT=[32]),
        ])
    finally:
        tiny.pipeline.generate = generate
    size = tiny.pipeline.default_size
    assert calls == [(3, size, size), (1, 32, 32)]  # one batched run per image size
    assert [r.shape for r in results] == [(2, size, size, 3), (1, size, size, 3), (1, 32, 32, 3)]
    assert all(r.dtype == np.uint8 for r in results)
    solo = GenerationRow("a cat", 3, negative_prompt="dog", steps=4, guidance_scale=7.5)
    (image,) = tiny.pipeline.generate([solo], size, size)
    assert np.array_equal(results[1][0], np.asarray(image))
    solo = GenerationRow("a blue square", 2, steps=5, guidance_scale=4.0)
    (image,) = tiny.pipeline.generate([solo], size, size)
    assert np.array_equal(results[0][1], np.asarray(image))


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        (_request(["x"], [1], STEPS=[0]), "STEPS", "must be an integer in [1, 1000]"),
        (_request(["x"], [1], WIDTH=[33]), "WIDTH", "multiple of"),
        (_request(["x"], [1], GUIDANCE_SCALE=[99.0]), "GUIDANCE_SCALE", "must be in [0, 50]"),
        (_request(["x"], [-1]), "SEED", "must be an integer in [0, 4294967295]"),
        (_request(["x", "y"], [1, 2], WIDTH=[32, 64], HEIGHT=[32, 64]), "WIDTH", "same size"),
        ({"PROMPT": np.array([[b"x"]], dtype=object)}, "SEED", "is required"),
        ({"SEED": np.array([[1]])}, "PROMPT", "is required"),
        ({"PROMPT": np.array([[b"\xff"]], dtype=object), "SEED": np.array([[1]])}, "PROMPT", "UTF-8"),
        ({"PROMPT": np.array([[b"x"]], dtype=object), "SEED": np.array([[1], [2]])}, "SEED", "shape [1, 1]"),
        (_request(["x"], [1], STEPS=[1]) | {"IMAGE": np.zeros((1, 64, 64, 3), np.uint8),
                                             "MASK": np.zeros((1, 64, 64), np.uint16)}, "MASK", "UINT8"),
    ],
)
def test_a_bad_request_fails_alone_naming_the_input(tiny: TritonLDM, request_: dict, field: str, message: str) -> None:
    good = _request(["fine"], [5], STEPS=[1])
    bad, ok = tiny.execute([request_, good])
    assert isinstance(bad, InvalidInput) and bad.field == field and message in str(bad), bad
    assert isinstance(ok, np.ndarray) and ok.shape[0] == 1


def test_export_with_torchscript_writes_artifacts_the_server_loads_from_cache(tmp_path: Path) -> None:
    from ldm.random_model import write_random_model

    ckpt = write_random_model(tmp_path / "src")
    repo = export_triton_repository(tmp_path / "repo", checkpoint=ckpt, name="tiny", backend="torchscript")
    version = repo.model_dir / "1"
    assert (version / "weights" / ckpt.name).is_file() and (version / "weights" / "tokenizer").is_dir()
    assert sorted(p.name.split("-")[0] for p in (version / "compiled" / "torchscript").glob("*.pt")) == [
        "decoder", "unet"]  # fmt: skip
    cfg = parse_pbtxt((repo.model_dir / "configs" / "cpu.pbtxt").read_text())
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    settings = settings_from_config(config, version, instance_kind="CPU")
    pipeline, summary = load_triton_pipeline(settings)
    assert settings.model == version / "weights" / ckpt.name
    assert "unet" in summary and summary.count("(cache)") == 2, summary
