"""Hypothesis strategies for the requests of Embed, Segment, SegmentEverything, CreateJob and UploadDataset.

Each draws a mix of valid and invalid values per field (valid small PNGs of odd shapes and modes, garbage and
truncated images, lying headers, NaN / infinite / out-of-range coordinates, unknown enums, bad names and
references, hostile archives). :data:`TARGETS` maps each RPC name to its strategy and the service it calls;
``tests/reliability/test_fuzz.py`` (bounded, for CI) and ``bench/fuzz.py`` (thousands of requests) both use it.
Requests are sent with tenant acme's token, so the tenant field also covers PERMISSION_DENIED. CreateJob data
sets are never trainable (the ``empty`` folder or paths that do not resolve): a created job fails at once.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from typing import Any

import numpy as np
from hypothesis import strategies as st

from services._generated.sam.v1 import common_pb2, decoder_pb2, encoder_pb2, trainer_pb2
from tests.conftest import png_bytes, png_header_only, tar_bytes
from tests.reliability.harness import EMPTY_DATASET

INT32 = st.integers(-(2**31), 2**31 - 1)
TENANTS = st.sampled_from(["", "", "", "acme", "bravo", "../acme", "ACME", "index.json", "a" * 80])
ADAPTERS = st.sampled_from(["", "", "ships", "ships:1", "ships:2", "ships@prod", "ships@nope", "ships:0",
                            "ships:1@prod", "nope", "broken", "../../etc/passwd", "ships:99999999999", "s" * 200,
                            "ships:-1"])
NAMES = st.one_of(st.sampled_from(["fuzzed", "a", "ships", "../x", "", "UPPER", "a" * 64, "x/y", ".hidden"]),
                  st.text(max_size=12))
KEYS = st.one_of(st.sampled_from(["", "0" * 64, "f" * 64, "A" * 64, "zz"]), st.text(max_size=70))


def _small_sizes() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, 48), st.sampled_from([1, 2, 3, 257, 700]))


@st.composite
def valid_png(draw: st.DrawFn) -> bytes:
    """A decodable PNG: odd sizes (down to 1 px, thin strips), gray / RGB / RGBA, random or flat pixels."""
    height, width = draw(_small_sizes()), draw(_small_sizes())
    if height * width > 48 * 700:
        height = min(height, 3)
    channels = draw(st.sampled_from([None, 3, 4]))
    shape = (height, width) if channels is None else (height, width, channels)
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    if draw(st.booleans()):
        pixels[:] = draw(st.integers(0, 255))
    return png_bytes(pixels)


@st.composite
def mangled_png(draw: st.DrawFn) -> bytes:
    """A valid PNG cut short, with flipped bytes, or a header declaring other dimensions."""
    data = draw(valid_png())
    how = draw(st.sampled_from(["truncate", "flip", "header"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        position = draw(st.integers(0, len(data) - 1))
        return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    return png_header_only(draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)))


IMAGES = st.one_of(valid_png(), valid_png(), mangled_png(), st.binary(max_size=300),
                   st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff\xe0"]))
COORDS = st.one_of(st.floats(0, 48, width=32), st.floats(width=32), st.sampled_from([float("nan"), float("inf"),
                                                                                     -1.0, 1e30]))


def tilings() -> st.SearchStrategy[common_pb2.TilingOptions | None]:
    sizes = st.one_of(st.integers(-5, 300), INT32)
    return st.one_of(st.none(), st.builds(common_pb2.TilingOptions, enabled=st.booleans(), tile_size=sizes,
                                          overlap=sizes))


@st.composite
def prompts(draw: st.DrawFn) -> decoder_pb2.Prompt:
    prompt = decoder_pb2.Prompt()
    if draw(st.booleans()):
        prompt.box.CopyFrom(decoder_pb2.Box(x0=draw(COORDS), y0=draw(COORDS), x1=draw(COORDS), y1=draw(COORDS)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3, 65]))):
        prompt.points.append(decoder_pb2.Point(x=draw(COORDS), y=draw(COORDS),
                                               label=draw(st.sampled_from([0, 1, 1, -1, 2]))))
    if draw(st.integers(0, 5)) == 0:
        shape = draw(st.lists(st.integers(-2, 300), max_size=4))
        prompt.mask_input.CopyFrom(common_pb2.Tensor(dtype=draw(st.sampled_from(["float32", "float16", ""])),
                                                     shape=shape, data=draw(st.binary(max_size=64))))
    return prompt


@st.composite
def _fields(draw: st.DrawFn, spec: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]) -> dict[str, Any]:
    """Field values from ``spec`` ({field: (valid, wild)}): all valid, one field wild, or any number wild (a third
    each), so both the success paths and every single-field refusal are reached."""
    mode = draw(st.sampled_from(["valid", "one", "wild"]))
    wild_one = draw(st.sampled_from(sorted(spec))) if mode == "one" else None
    out = {}
    for name, (valid, wild) in spec.items():
        use_wild = name == wild_one or (mode == "wild" and draw(st.booleans()))
        out[name] = draw(wild if use_wild else valid)
    return {name: value for name, value in out.items() if value is not None}


def _ref(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[common_pb2.AdapterRef]:
    return strategy.map(lambda ref: common_pb2.AdapterRef(ref=ref))


UNIT = st.floats(0, 1, width=32)
VALID_TENANTS = st.sampled_from(["", "acme"])
VALID_ADAPTERS = st.sampled_from(["", "ships", "ships:1", "ships@prod"])


@st.composite
def valid_prompts(draw: st.DrawFn) -> decoder_pb2.Prompt:
    """A prompt inside any image (coordinates in [0, 1] pixels): a box, points, or both."""
    prompt = decoder_pb2.Prompt()
    kind = draw(st.sampled_from(["box", "points", "both"]))
    if kind != "points":
        x0, x1 = sorted((draw(UNIT), draw(UNIT)))
        y0, y1 = sorted((draw(UNIT), draw(UNIT)))
        prompt.box.CopyFrom(decoder_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    if kind != "box":
        for _ in range(draw(st.integers(1, 3))):
            prompt.points.append(decoder_pb2.Point(x=draw(UNIT), y=draw(UNIT), label=draw(st.integers(0, 1))))
    return prompt


def embed_requests() -> st.SearchStrategy[encoder_pb2.EmbedRequest]:
    return _fields({
        "image": (valid_png(), IMAGES), "tenant": (VALID_TENANTS, TENANTS),
        "adapter": (_ref(VALID_ADAPTERS), _ref(ADAPTERS)), "tiling": (st.none(), tilings()),
    }).map(lambda fields: encoder_pb2.EmbedRequest(**fields))


def segment_requests() -> st.SearchStrategy[decoder_pb2.SegmentRequest]:
    return _fields({
        "image": (valid_png(), IMAGES), "embedding_key": (st.just(""), KEYS), "tenant": (VALID_TENANTS, TENANTS),
        "prompts": (st.lists(valid_prompts(), min_size=1, max_size=4), st.lists(prompts(), max_size=4)),
        "multimask": (st.booleans(), st.booleans()), "adapter": (_ref(VALID_ADAPTERS), _ref(ADAPTERS)),
        "encoding": (st.integers(0, 4), st.integers(-1, 6)), "threshold": (st.floats(-5, 5), st.floats(width=32)),
        "return_low_res_logits": (st.booleans(), st.booleans()), "tiling": (st.none(), tilings()),
    }).map(lambda fields: decoder_pb2.SegmentRequest(**fields))


def everything_requests() -> st.SearchStrategy[decoder_pb2.SegmentEverythingRequest]:
    wild_unit = st.one_of(st.just(0.0), UNIT, st.floats(width=32))
    return _fields({
        "image": (valid_png(), IMAGES), "embedding_key": (st.just(""), KEYS), "tenant": (VALID_TENANTS, TENANTS),
        "adapter": (_ref(VALID_ADAPTERS), _ref(ADAPTERS)),
        "points_per_side": (st.integers(1, 4), st.one_of(st.integers(-2, 6), st.sampled_from([10_000, -(2**31)]))),
        "pred_iou_thresh": (UNIT, wild_unit), "stability_score_thresh": (UNIT, wild_unit),
        "box_nms_thresh": (UNIT, wild_unit),
        "min_mask_area": (st.integers(0, 100), st.one_of(st.integers(-2, 100), st.integers(-(2**63), 2**63 - 1))),
        "encoding": (st.integers(0, 4), st.integers(-1, 6)),
        "max_masks": (st.integers(0, 20), st.one_of(st.integers(-2, 20), INT32)),
    }).map(lambda fields: decoder_pb2.SegmentEverythingRequest(**fields))


@st.composite
def hyperparameters(draw: st.DrawFn, wild: bool) -> trainer_pb2.Hyperparameters:
    counts = st.one_of(st.just(0), st.integers(-3, 64), INT32) if wild else st.integers(0, 4)
    rates = st.one_of(st.just(0.0), UNIT, st.floats(width=32)) if wild else st.floats(0, 0.5)
    kinds = ["", "box", "point", "box+point"] + (["circle", "BOX"] if wild else [])
    fields = {name: draw(counts) for name in ("epochs", "max_steps", "batch_size", "rank", "seed", "patience",
                                              "warmup_steps", "checkpoint_every")}
    fields["crop"] = draw(st.one_of(counts, st.integers(32, 8192)) if wild else st.sampled_from([0, 32, 64]))
    return trainer_pb2.Hyperparameters(lr=draw(rates), val_fraction=draw(rates), bf16=draw(st.booleans()),
                                       prompt=draw(st.sampled_from(kinds)), **fields)


DATASETS = st.sampled_from([EMPTY_DATASET, f"./{EMPTY_DATASET}", f"{EMPTY_DATASET}/", "", "nope", "../bravo", "/etc",
                            "uploads/" + "f" * 32, "a\x00b", "x" * 2000, "\\\\server\\share"])
METHODS = st.sampled_from(["decoder", "lora", "adapter", "full", "persam"])


def create_job_requests() -> st.SearchStrategy[trainer_pb2.CreateJobRequest]:
    return _fields({
        "tenant": (VALID_TENANTS, TENANTS), "dataset": (st.just(EMPTY_DATASET), DATASETS),
        "method": (METHODS, st.one_of(METHODS, st.sampled_from(["", "magic", "LORA"]))),
        "adapter_name": (st.sampled_from(["fuzzed", "f-2"]), NAMES), "promote_to": (st.sampled_from(["", "staging"]),
                                                                                  NAMES),
        "hyperparameters": (hyperparameters(False), hyperparameters(True)),
    }).map(lambda fields: trainer_pb2.CreateJobRequest(**fields))


def _archive(kind: str, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
            warnings.simplefilter("ignore")  # duplicate names are one of the things drawn
            for name, data in members:
                archive.writestr(name or "x", data)
        return buffer.getvalue()
    return tar_bytes(members)


MEMBER_NAMES = st.one_of(st.sampled_from(["images/a.png", "masks/a.png", "d/images/b.png", "../x", "/etc/x",
                                          "a/../../x", "images/", "C:\\x", "__MACOSX/x", "./images/a.png"]),
                         st.text(min_size=1, max_size=20))


@st.composite
def _payloads(draw: st.DrawFn, wild: bool) -> bytes:
    """An archive (tar.gz / zip of drawn members), cut short or garbage when ``wild``."""
    kind = draw(st.sampled_from(["tar", "zip", "garbage"] if wild else ["tar", "zip"]))
    if kind == "garbage":
        return draw(st.binary(max_size=2000))
    names = MEMBER_NAMES if wild else st.sampled_from(["images/a.png", "masks/a.png", "d/images/b.png"])
    members = draw(st.lists(st.tuples(names, st.one_of(valid_png(), st.binary(max_size=64))), min_size=0 if wild else 1,
                            max_size=4, unique_by=None if wild else (lambda member: member[0])))
    payload = _archive(kind, members)
    if wild and draw(st.integers(0, 4)) == 0:
        payload = payload[:draw(st.integers(0, len(payload)))]
    return payload


def _chunked(fields: dict[str, Any]) -> list[trainer_pb2.DatasetChunk]:
    payload, step = fields["payload"], fields["step"]
    chunks = [trainer_pb2.DatasetChunk(tenant=fields.get("tenant", ""), filename=fields.get("filename", ""),
                                       data=payload[:step])]
    return chunks + [trainer_pb2.DatasetChunk(data=payload[i:i + step]) for i in range(step, len(payload), step)]


def upload_streams() -> st.SearchStrategy[list[trainer_pb2.DatasetChunk]]:
    """The chunks of one upload: the archive, its file name and tenant in the first chunk."""
    suffixes = st.sampled_from(["data.tar.gz", "data.tgz", "data.zip", "d.ZIP"])
    return _fields({
        "payload": (_payloads(False), _payloads(True)), "tenant": (VALID_TENANTS, TENANTS),
        "filename": (suffixes, st.one_of(suffixes, st.sampled_from(["data.tar", "data.rar", "", "zip"]))),
        "step": (st.sampled_from([4096, 1 << 20]), st.sampled_from([7, 4096, 1 << 20])),
    }).map(_chunked)


TARGETS: dict[str, tuple[st.SearchStrategy[Any], str]] = {
    "Embed": (embed_requests(), "encoder"),
    "Segment": (segment_requests(), "decoder"),
    "SegmentEverything": (everything_requests(), "decoder"),
    "CreateJob": (create_job_requests(), "trainer"),
    "UploadDataset": (upload_streams(), "trainer"),
}
