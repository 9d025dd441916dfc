"""A frozen backbone as an ONNX graph: export with dynamic axes (torch.export -> ONNX) and run it in
ONNX Runtime (``backend: onnxruntime`` on any frozen encoder with graph hooks).

An encoder that supports graphs implements ``graph_inputs(batch)`` (its collated batch -> a tuple
of tensors), ``graph_forward(*inputs)`` (-> the raw EncoderOutput, no data-dependent control
flow), ``graph_input_names`` and ``graph_axes`` (per input, {axis: "batch" | "tokens" |
"half_width"}; half_width axes have even length 2k). The exported towers of ``edge-glass export``
(export/onnx.py) use the same hooks with the trained head on top.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write_json
from .base import EncoderOutput

OUTPUT_NAMES = ["tokens", "mask", "pooled"]


def dynamic_shapes(axes: list[dict[int, str]]) -> tuple[Any, ...]:
    """{axis: name} per input -> torch.export dynamic shapes (one Dim per name, shared across inputs)."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=65536), "tokens": torch.export.Dim("tokens", min=1, max=4096)}
    half = torch.export.Dim("half_width", min=2, max=4096)
    spec = [{axis: (2 * half if name == "half_width" else dims[name]) for axis, name in a.items()} for a in axes]
    return (tuple(spec),)  # one entry: the modules' forward takes *inputs


def export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                output_names: list[str], axes: list[dict[int, str]]) -> None:
    """Write ``module(*inputs)`` as an ONNX graph at ``path`` (atomically: a partial file never
    sits at ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), inputs, dynamo=True, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes(axes), verbose=False, optimize=True)
            program.save(tmp)
        os.replace(tmp, path)
    finally:
        quiet.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)


class BackboneGraph(nn.Module):
    """encoder.graph_forward as a module returning (tokens, mask, pooled): what the backend exports."""

    def __init__(self, encoder: Any):
        super().__init__()
        self.encoder = encoder

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.encoder.graph_forward(*inputs)
        return out.tokens, out.mask, out.pooled


class OnnxBackbone:
    """An encoder's backbone exported once into ``path`` (from the first batch it sees) and run in
    ONNX Runtime with ``threads`` intra-op threads (torch's count: ``train.threads`` applies).

    The network is loaded only to export: later opens read the graph and ``path.json`` (the
    encoder's ``graph_record``, written before the graph so that a graph never lacks it), and the
    encoder gets ready for ``graph_inputs`` from that record (a text encoder loads its tokenizer
    and nothing else)."""

    def __init__(self, encoder: Any, path: Path):
        self.encoder, self.path = encoder, path
        self.record_path = path.with_suffix(".json")
        self.session = None

    def _open(self) -> None:
        import onnxruntime as ort

        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            record = {}  # a graph from before records existed (or a damaged record): graph_ready's safe default
        self.encoder.graph_ready(record)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _export(self, inputs: tuple[torch.Tensor, ...]) -> None:
        atomic_write_json(self.record_path, self.encoder.graph_record())
        export_onnx(BackboneGraph(self.encoder), inputs, self.path, self.encoder.graph_input_names, OUTPUT_NAMES,
                    self.encoder.graph_axes)

    def __call__(self, batch: Any) -> EncoderOutput:
        if self.session is None:
            if self.path.is_file():
                self._open()
            else:
                self.encoder.ensure_loaded()  # first use on this machine: export from the network
        inputs = tuple(x.cpu() for x in self.encoder.graph_inputs(batch))
        if self.session is None:
            self._export(inputs)
            self._open()
        feed = {name: np.ascontiguousarray(x.numpy()) for name, x in zip(self.encoder.graph_input_names, inputs)}
        tokens, mask, pooled = (torch.from_numpy(a) for a in self.session.run(OUTPUT_NAMES, feed))
        return EncoderOutput(tokens, mask.bool(), pooled)
