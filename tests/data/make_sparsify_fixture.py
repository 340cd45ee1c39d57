"""Fixture made by the real sparsify (EleutherAI, PyPI eai-sparsify==1.3.3): a TopK SparseCoder written with
SparseCoder.save_to_disk (cfg.json + sae.safetensors), and sparsify's own encode/decode outputs.

How it was run (from the repository root; our .venv supplies torch, safetensors, numpy, datasets, huggingface_hub, ...;
the rest goes to a throwaway folder, one package at a time, --no-deps):
    .venv/bin/pip install --no-deps --target /tmp/pkgs/sparsify eai-sparsify==1.3.3 einops==0.8.2 \
        transformers==5.25.0 tokenizers==0.23.3 simple-parsing==0.1.9 docstring-parser==0.18.0 natsort==8.4.0 \
        accelerate==1.16.0 schedulefree==1.4.1
    SPARSIFY_DISABLE_TRITON=1 PYTHONPATH=/tmp/pkgs/sparsify .venv/bin/python tests/data/make_sparsify_fixture.py
(SPARSIFY_DISABLE_TRITON=1 is sparsify's own switch to its eager CPU decoder; its Triton kernel needs a GPU.)
Writes tests/data/sparsify-1.3.3/topk/cfg.json, sae.safetensors and expected.safetensors
(x; top_acts, top_indices and pre_acts from SparseCoder.encode; x_hat from SparseCoder.decode).
"""

import importlib.metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

VERSION = importlib.metadata.version("eai-sparsify")
OUT = Path(__file__).resolve().parent / f"sparsify-{VERSION}"
D, S, K = 16, 64, 8
assert VERSION == "1.3.3", VERSION

torch.manual_seed(30)
offset = torch.randn(D) * 2  # activations with a non-zero mean, so b_dec matters
x = torch.randn(32, D) * 1.5 + offset
sae = SparseCoder(D, SparseCoderConfig(num_latents=S, k=K))
with torch.no_grad():  # sparsify initialises both biases to zero; a trained SAE has neither
    sae.b_dec.copy_(offset + torch.randn(D) * 0.3)
    sae.encoder.bias.copy_(torch.randn(S) * 0.5)
    enc = sae.encode(x)
    x_hat = sae.decode(enc.top_acts, enc.top_indices)
dpath = OUT / "topk"
sae.save_to_disk(dpath)
save_file({"x": x.contiguous(), "top_acts": enc.top_acts.contiguous(), "top_indices": enc.top_indices.contiguous(),
           "pre_acts": enc.pre_acts.contiguous(), "x_hat": x_hat.contiguous()},
          str(dpath / "expected.safetensors"), metadata={"package": "eai-sparsify", "version": VERSION})
with torch.no_grad():
    again = SparseCoder.load_from_disk(dpath).encode(x)
torch.testing.assert_close(again.top_acts, enc.top_acts)
print(f"topk: smallest selected activation {float(enc.top_acts.min()):.3f}")
