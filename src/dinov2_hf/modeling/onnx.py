"""ONNX export of the DINOv2 backbone with dynamic batch size, height and width.

The graph takes ``pixel_values`` ``(batch, channels, height, width)``, every dimension but the
channels dynamic (height and width multiples of the patch size), and returns ``last_hidden_state``
and ``pooler_output`` as transformers' models do. The position embeddings are resized inside the
graph, so one file serves every resolution, with each ``pos_embed_interpolation`` mode:

- ``"transformers"``: ONNX ``Resize`` (cubic, a=-0.75, half_pixel), PyTorch's bicubic kernel.
- ``"antialias"``: ONNX ``Resize`` with ``antialias=1`` (opset 18), a=-0.5 and ``exclude_outside=1``,
  PyTorch's antialiased bicubic kernel (onnxscript >= 0.7.1 emits it so).
- ``"meta"``: Meta's ``scale_factor=(grid + offset) / native`` resize samples at coordinates set by
  that scale, which ONNX ``Resize`` only does for a constant scale; here the bicubic weights are
  computed in the graph from the grid size and applied as two small matrix products (exact to
  float rounding, the native-grid shortcut of Meta's code included).

The ``onnx``, ``onnxscript`` and ``onnxruntime`` packages are optional: ``pip install "dinov2-hf[onnx]"``.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .modeling_dinov2_hf import Dinov2HFEmbeddings, Dinov2HFModel

ONNX_FILE = "model.onnx"
INPUT_NAMES = ["pixel_values"]
OUTPUT_NAMES = ["last_hidden_state", "pooler_output"]
# Resize's ``antialias`` attribute (needed by the "antialias" mode) and torchlib's own opset.
MIN_OPSET = 18
MAX_OPSET = 23
DEFAULT_OPSET = 18
# Sizes that ``check_onnx`` compares by default: the usual square crop and a non-square one.
DEFAULT_CHECK_SIZES = ((224, 224), (154, 322))
INSTALL_HINT = 'pip install "dinov2-hf[onnx]" (onnx, onnxscript>=0.7.1, onnxruntime)'


def require_onnx_packages() -> None:
    """Import the optional ONNX packages, or fail with the install command."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript
    except ImportError as error:
        raise ImportError(f"ONNX export needs the {error.name!r} package: {INSTALL_HINT}.") from error
    from packaging.version import Version

    # Older onnxscript exports antialiased bicubic without exclude_outside, wrong at the borders.
    if Version(onnxscript.__version__) < Version("0.7.1"):
        raise ImportError(f"ONNX export needs onnxscript>=0.7.1, found {onnxscript.__version__}: {INSTALL_HINT}.")


def parse_size(text: str) -> tuple[int, int]:
    """``"154x322"`` (height x width) or ``"224"`` (square) -> ``(height, width)``."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"Image size {text!r} is not HEIGHTxWIDTH (e.g. 154x322) or a single number (e.g. 224).")
    height, width = (int(parts[0]), int(parts[-1]))
    return height, width


def validate_sizes(sizes: Sequence[tuple[int, int]], patch_size: int) -> None:
    """Fail, naming the size and the fix, unless every size is a positive multiple of ``patch_size``."""
    for height, width in sizes:
        if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
            fix_h, fix_w = (max(1, round(side / patch_size)) * patch_size for side in (height, width))
            raise ValueError(
                f"Check size {height}x{width} is not a multiple of the patch size {patch_size}; "
                f"use e.g. {fix_h}x{fix_w}."
            )


def validate_opset(opset: int) -> None:
    """Opsets this exporter supports: ``MIN_OPSET`` (Resize with antialias) to ``MAX_OPSET``."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET} (Resize's antialias attribute, used by "
            f"pos_embed_interpolation='antialias', and the exporter's operator library need opset >= {MIN_OPSET})."
        )


# -- the position-embedding resize, traceable with dynamic grid sizes -----------------------------


def bicubic_matrix(out_size, in_size: int, source_step: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """``(out_size, in_size)`` weights of PyTorch's 1-D bicubic resampling (``align_corners=False``).

    Output ``i`` samples the input at ``(i + 0.5) * source_step - 0.5`` with Keys' cubic (``a``) over
    four taps; taps outside the input use the border value, as PyTorch's kernel does. ``out_size``
    may be symbolic and ``source_step`` a 0-d tensor, so the weights are part of the exported graph.
    """
    source = (torch.arange(out_size, dtype=torch.float32) + 0.5) * source_step - 0.5
    base = torch.floor(source)
    taps = torch.arange(-1, 3, dtype=torch.float32)
    distance = (source - base).unsqueeze(1) - taps  # (out, 4): t + 1, t, t - 1, t - 2
    x = distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    weights = torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    index = (base.unsqueeze(1) + taps).clamp(0, in_size - 1)  # border taps repeat the edge
    one_hot = (index.unsqueeze(2) == torch.arange(in_size, dtype=torch.float32)).to(weights.dtype)
    return (one_hot * weights.unsqueeze(2)).sum(1)


def _meta_resize(patch_pos_embed: torch.Tensor, grid_height, grid_width, offset: float) -> torch.Tensor:
    """Meta's ``F.interpolate(scale_factor=(grid + offset) / native, mode="bicubic")`` as matrix products.

    ``patch_pos_embed`` is ``(1, hidden, native, native)``. At the native square grid Meta's code
    (and ours) skips the resize; a zero offset there makes the same weights the identity, so the
    graph needs no branch.
    """
    native = patch_pos_embed.shape[-1]
    # The step between source samples in float64 rounded once to float32, as PyTorch's
    # ``float(1.0 / scale)``: a float32 step drifts by up to 3e-5 over a 37-wide grid.
    height = torch.ones((), dtype=torch.float64) * grid_height
    width = torch.ones((), dtype=torch.float64) * grid_width
    at_native = ((height == native) & (width == native)).to(torch.float64)
    offset = offset * (1 - at_native)
    rows = bicubic_matrix(grid_height, native, (native / (height + offset)).float())
    cols = bicubic_matrix(grid_width, native, (native / (width + offset)).float())
    return torch.einsum("hn,bcnm,wm->bchw", rows, patch_pos_embed, cols)


def export_pos_encoding(self: Dinov2HFEmbeddings, grid_height, grid_width, dtype: torch.dtype) -> torch.Tensor:
    """``Dinov2HFEmbeddings.interpolate_pos_encoding`` without Python branches on the grid size.

    Bound to the embeddings during export only: the eager method's native-size shortcut would be
    frozen into the graph by whichever size was traced (at the native grid every resize below is the
    identity, equal to the shortcut), and so would Meta's scale factor, hence ``_meta_resize``.
    """
    return self.resize_pos_encoding(grid_height, grid_width, dtype, meta_resize=_meta_resize)


class OnnxBackbone(nn.Module):
    """The exported computation: pixel_values -> (last_hidden_state, pooler_output)."""

    def __init__(self, model: Dinov2HFModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values, return_dict=True)
        return output.last_hidden_state, output.pooler_output


@contextlib.contextmanager
def _exportable(model: Dinov2HFModel) -> Iterator[None]:
    """Traceable position embeddings and SDPA attention for the duration of the export."""
    embeddings = model.embeddings
    previous_attention = model.config._attn_implementation
    embeddings.interpolate_pos_encoding = types.MethodType(export_pos_encoding, embeddings)
    # flash / flex attention have no CPU ONNX lowering; SDPA exports as plain MatMul/Softmax.
    model.config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding
        model.config._attn_implementation = previous_attention


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger_ = logging.getLogger(name)
    previous = logger_.level
    logger_.setLevel(level)
    try:
        yield
    finally:
        logger_.setLevel(previous)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notices that concern neither this model nor the user (absent torchvision
    operators, pytree deprecations inside torch)."""
    with _logger_level("torch.onnx._internal.exporter._registration", logging.ERROR), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _name_sequence_axis(program) -> None:
    """Name the token axis of ``last_hidden_state`` (the exporter writes a formula of anonymous symbols)."""
    import onnx_ir as ir

    output = program.model.graph.outputs[0]
    batch, _, hidden = output.shape
    output.shape = ir.Shape([batch, ir.SymbolicDim("sequence_length"), hidden])


def _example_input(config) -> torch.Tensor:
    """A traced input off the native grid (its shortcut) and off sizes 0/1 (which export specialises)."""
    native = config.image_size // config.patch_size
    grid = (2, 3) if native not in (2, 3) else (native + 1, native + 2)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, config.num_channels, grid[0] * config.patch_size, grid[1] * config.patch_size, generator=generator)


def _save_config(model: Dinov2HFModel, output_dir: Path) -> None:
    """A stock transformers config where one exists (what optimum / onnxruntime tooling reads), else ours."""
    from .convert_transformers import config_to_transformers

    try:
        # The graph carries its own resize: the warning that stock models resize "meta" models differently is moot.
        with _logger_level("dinov2_hf.modeling.convert_transformers", logging.ERROR):
            config = config_to_transformers(model.config)
    except ValueError:  # an architecture stock transformers cannot express
        config = model.config
    config.save_pretrained(output_dir)


def export_onnx(
    model: Dinov2HFModel,
    output_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    image_processor=None,
    external_data: bool | None = None,
) -> Path:
    """Export ``model`` to ``output_dir/model.onnx`` with dynamic batch, height and width.

    Args:
        model: the backbone; exported in float32 on CPU (a copy is not made: it is moved there).
        output_dir: folder for ``model.onnx`` (plus ``model.onnx.data`` when the weights are stored
            outside it), ``config.json`` and ``preprocessor_config.json``.
        opset: ONNX opset, 18 to 23.
        image_processor: saved beside the model; default: the DINOv2 processor (256 -> 224 crop).
        external_data: store weights in ``model.onnx.data``; ``None`` does so only past protobuf's 2 GB
            limit (e.g. ViT-g).

    Returns:
        The path of ``model.onnx``.
    """
    require_onnx_packages()
    validate_opset(opset)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    wrapper = OnnxBackbone(model).eval()
    # The dynamo exporter (torch.export + onnxscript) keeps height and width symbolic through the
    # patch grid, the position-embedding resize and the token reshapes, and lowers the antialiased
    # bicubic resize; the TorchScript exporter (dynamo=False) has no antialiased-bicubic symbolic.
    Dim = torch.export.Dim
    dynamic_shapes = {"pixel_values": {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}}
    with _exportable(model), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (_example_input(model.config),),
            dynamo=True,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
        )
    _name_sequence_axis(program)
    path = output_dir / ONNX_FILE
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = size_bytes >= 2**31 - 2**26  # protobuf's 2 GB cap, with room for the graph
    program.save(str(path), external_data=external_data)
    _save_config(model, output_dir)
    if image_processor is None:
        from .processor import dinov2_image_processor

        image_processor = dinov2_image_processor()
    image_processor.save_pretrained(output_dir)
    return path


def check_onnx(
    onnx_path: str | Path,
    model: Dinov2HFModel,
    sizes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SIZES,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> dict[str, float]:
    """Max absolute difference between onnxruntime and PyTorch on random inputs, per output and size.

    Sizes are cycled with ``batch_sizes`` (batch sizes other than the traced one, 2). Keys look like
    ``"last_hidden_state@154x322"``.
    """
    require_onnx_packages()
    import onnxruntime

    validate_sizes(sizes, model.config.patch_size)
    model = model.float().cpu().eval()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for index, (height, width) in enumerate(sizes):
        batch = batch_sizes[index % len(batch_sizes)]
        pixel_values = torch.randn(batch, model.config.num_channels, height, width, generator=generator)
        with torch.no_grad():
            output = model(pixel_values, return_dict=True)
        expected = {"last_hidden_state": output.last_hidden_state, "pooler_output": output.pooler_output}
        got = session.run(OUTPUT_NAMES, {"pixel_values": pixel_values.numpy()})
        for name, value in zip(OUTPUT_NAMES, got):
            reference = expected[name].numpy()
            if value.shape != reference.shape:
                raise RuntimeError(f"ONNX {name} has shape {value.shape} at {height}x{width}, PyTorch {reference.shape}.")
            differences[f"{name}@{height}x{width}"] = float(abs(value - reference).max())
    return differences


__all__ = [
    "DEFAULT_CHECK_SIZES",
    "DEFAULT_OPSET",
    "OnnxBackbone",
    "bicubic_matrix",
    "check_onnx",
    "export_onnx",
    "parse_size",
    "require_onnx_packages",
    "validate_opset",
    "validate_sizes",
]
