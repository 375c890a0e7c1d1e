"""`selfie export`: a run's network as safetensors (selfie's or timm's key names) or ONNX.

What is exported:
- a pretraining run: the backbone P alone, `ResNetV2(config.model, num_stages=3)`: the stem,
  stages 1-3 and P's final BN (A, u0 and the positions are pretraining machinery);
- a finetuning run: the whole classifier (for head "resnet50", `ResNetV2(..., num_stages=4,
  num_classes=K)`: backbone and linear head; for head "attention", P's trunk, A, the
  positions and the head).

Layout "selfie": the module's own state_dict keys (`stem.0.weight`, `stages.{i}.{j}.bn1.*`,
`.conv1.weight`, `.bn2.*`, `.conv2.weight`, [`.bn3.*`, `.conv3.weight` in bottleneck units],
`.shortcut.weight` where a unit projects, `norm.*`, `head.weight`, `head.bias`), so
`model.load_state_dict(load_file(path))` loads it with strict key checks. Layout "timm"
(bottleneck ResNets only): the key names and shapes of timm's `resnetv2_50`
(`TIMM_KEYS_FILE`): `stem.conv.weight`, `stages.{i}.blocks.{j}.norm1/2/3.*`,
`.conv1/2/3.weight`, `.downsample.conv.weight`, `norm.*`, `head.fc.weight` (K, 2048, 1, 1),
`head.fc.bias`. A pretraining run's timm export holds the stem and stages 0-2 only: P's final
norm has stage 3's place in timm but P's width, so it is left out.

ONNX: input `images`, float32 (B, 3, S, S), normalised with the run's mean and std (stored
in the file's metadata, with the class names); output `features` (B, D) for a pretraining
run, `logits` (B, K) for a finetuning run; the batch dimension is dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from selfie.checkpoint import atomic_write, describe_write_error
from selfie.errors import UserError
from selfie.models.resnet_v2 import ResNetV2
from selfie.use.run import TrainedRun, open_trained

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx")
LAYOUTS = ("selfie", "timm")
TIMM_KEYS_FILE = Path(__file__).with_name("timm_resnetv2_50.txt")
ONNX_OPSET = 18

# selfie's names inside a unit -> timm's (PreActBottleneck); "bn1" is the pre-activation.
_UNIT = {"bn1": "norm1", "bn2": "norm2", "bn3": "norm3", "conv1": "conv1", "conv2": "conv2"}
_UNIT |= {"conv3": "conv3", "shortcut": "downsample.conv"}
_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.(\w+)\.(.+)$")


@dataclass
class Exported:
    out: Path
    format: str
    layout: str
    what: str  # "backbone P" or "classifier (resnet50)"
    tensors: int
    parameters: int


def timm_keys() -> dict[str, tuple[int, ...]]:
    """timm's resnetv2_50 state-dict keys and shapes, from TIMM_KEYS_FILE, in its order."""
    keys: dict[str, tuple[int, ...]] = {}
    for line in TIMM_KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split()
            keys[name] = () if shape == "-" else tuple(int(s) for s in shape.split(","))
    return keys


def to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bottleneck `ResNetV2` state dict under timm's resnetv2_50 key names (module
    docstring); the linear head becomes timm's 1x1 conv fc."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "stem.0.weight":
            out["stem.conv.weight"] = value
        elif key.startswith("norm."):
            out[key] = value
        elif key == "head.weight":
            out["head.fc.weight"] = value[:, :, None, None]
        elif key == "head.bias":
            out["head.fc.bias"] = value
        elif match := _STAGE_KEY.match(key):
            stage, unit, part, rest = match.groups()
            if part not in _UNIT:
                raise ValueError(f"no timm name for {key}")
            out[f"stages.{stage}.blocks.{unit}.{_UNIT[part]}.{rest}"] = value
        else:
            raise ValueError(f"no timm name for {key}")
    return out


def _network(run: TrainedRun) -> tuple[nn.Module, str]:
    if run.kind == "pretrain":
        return run.backbone(), "backbone P (stem, stages 1-3, final BN)"
    return run.model, f"classifier (head {run.head})"


def _timm_state(run: TrainedRun, net: nn.Module) -> dict[str, torch.Tensor]:
    m = run.config.model
    if m.block != "bottleneck" or not isinstance(net, ResNetV2):
        raise UserError(
            f"--layout timm needs a bottleneck ResNet v2 (the paper presets); {run.path} has "
            f"{m.block} units{'' if isinstance(net, ResNetV2) else ' and an attention head'}; "
            "use --layout selfie"
        )
    state = dict(net.state_dict())
    if run.kind == "pretrain":  # P's final norm has no place in timm's resnetv2_50
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    mapped = to_timm(state)
    expected = timm_keys()
    unknown = sorted(set(mapped) - set(expected))
    if unknown:
        raise UserError(f"the network has keys timm's resnetv2_50 lacks: {', '.join(unknown[:5])}")
    if m.layers != (3, 4, 6, 3) or m.widths != (256, 512, 1024, 2048) or m.stem_width != 64:
        log.warning(
            "this network is not ResNet-50's size (layers %s, widths %s): timm's names apply, "
            "but load it into timm's ResNetV2 built with the same layers and channels",
            m.layers,
            m.widths,
        )
    if m.stem != "imagenet":
        log.warning(
            "the CIFAR stem (one 3x3 conv, no max-pool) differs from timm's 7x7 stride-2 stem: "
            "before load_state_dict set model.stem.conv = nn.Conv2d(3, 64, 3, padding=1, "
            "bias=False) and model.stem.pool = nn.Identity()"
        )
    return mapped


def _metadata(run: TrainedRun, layout: str, what: str) -> dict[str, str]:
    return {
        "format": "selfie-export-v1",
        "layout": layout,
        "kind": run.kind,
        "contents": what,
        "preset": run.config.name,
        "config": json.dumps(run.config.to_dict()),
        "classes": json.dumps(list(run.classes)),
        "mean": json.dumps(run.mean.tolist()),
        "std": json.dumps(run.std.tolist()),
        "image_size": str(run.config.data.image_size),
    }


def _write(out: Path, data: bytes) -> None:
    try:
        atomic_write(out, lambda f: f.write(data))
    except OSError as e:
        what, fix = describe_write_error(e)
        raise UserError(f"{what} while writing {out}; {fix} and run again") from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx and onnxscript log every optimisation pass, and warn that torchvision's
    operators are not registered (we use none): keep their errors only."""
    names = ("torch.onnx", "onnxscript", "onnx_ir")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_onnx_bytes(run: TrainedRun, net: nn.Module, metadata: dict[str, str]) -> bytes:
    """The network in eval mode as ONNX (torch.onnx.export, the torch.export-based exporter)
    with a dynamic batch dimension and `metadata` as the model's metadata_props."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'selfie[export]'"
        ) from None
    net = net.float().cpu().eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    s = run.config.data.image_size
    example = torch.zeros(2, 3, s, s)
    output = "features" if run.kind == "pretrain" else "logits"
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            net,
            (example,),
            input_names=["images"],
            output_names=[output],
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()


def export(
    run_path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    layout: str = "selfie",
    device: str = "cpu",
) -> Exported:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: choose one of {', '.join(LAYOUTS)}")
    if fmt == "onnx" and layout != "selfie":
        raise UserError("--layout applies to safetensors; ONNX files have no key names to choose")
    run = open_trained(run_path, device)
    net, what = _network(run)
    stem = "backbone" if run.kind == "pretrain" else "classifier"
    suffix = "-timm" if layout == "timm" else ""
    out = Path(out) if out is not None else run.path / f"{stem}{suffix}.{fmt}"
    metadata = _metadata(run, layout, what)
    if fmt == "safetensors":
        state = _timm_state(run, net) if layout == "timm" else dict(net.state_dict())
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        _write(out, safetensors_bytes(tensors, metadata=metadata))
    else:
        tensors = dict(net.state_dict())
        _write(out, export_onnx_bytes(run, net, metadata))
    params = sum(p.numel() for p in net.parameters())
    return Exported(out, fmt, layout, what, len(tensors), params)
