"""Fixtures made by the real saev at git commit 3d73f1f7122738563404e4c50a98d897aa18a7d0 (2026-03-11, header schema 5;
PyPI has only saev 0.1.0, so newer saev exists only as source): ReLU, TopK and BatchTopK SAEs saved with saev.nn.dump,
and saev's own encode/decode outputs.

How it was run (from the repository root; our .venv supplies torch, safetensors, numpy, scipy, beartype, jaxtyping):
    git archive 3d73f1f7122738563404e4c50a98d897aa18a7d0 pyproject.toml README.md LICENSE src \
        | tar -x -C /tmp/src/saev-3d73f1f        # from a clone of github.com/OSU-NLP-Group/saev
    .venv/bin/pip install --no-deps --ignore-requires-python --target /tmp/pkgs/saev-3d73f1f /tmp/src/saev-3d73f1f
    .venv/bin/pip install --no-deps --target /tmp/pkgs/saev-3d73f1f einops==0.8.2 orjson==3.13.0 tyro==1.0.17 \
        docstring-parser==0.18.0 shtab==1.13.0 typeguard==4.6.1
    PYTHONPATH=/tmp/pkgs/saev-3d73f1f .venv/bin/python tests/data/make_saev_3d73f1f_fixture.py
(--ignore-requires-python: that commit declares Python >= 3.12; its SAE code runs unchanged on our 3.11.)
Writes tests/data/saev-3d73f1f/<relu|topk|batchtopk>/sae.pt and expected.safetensors (x, codes f_x, x_hat).
"""

from pathlib import Path

import saev.nn.modeling as modeling
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "saev-3d73f1f"
D, S, K = 16, 64, 8

assert modeling.SCHEMA_VERSION == 5, modeling.SCHEMA_VERSION
ACTIVATIONS = {"relu": modeling.Relu(), "topk": modeling.TopK(top_k=K), "batchtopk": modeling.BatchTopK(top_k=K)}


def make(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    offset = torch.randn(D) * 2  # activations with a non-zero mean, so b_dec matters
    sample = torch.randn(256, D) * 1.5 + offset
    x = torch.randn(32, D) * 1.5 + offset
    sae = modeling.SparseAutoencoder(modeling.SparseAutoencoderConfig(d_model=D, d_sae=S, activation=ACTIVATIONS[name]))
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0) + torch.randn(D) * 0.3)
        sae.b_enc.copy_(torch.randn(S) * 0.5)
        if name == "batchtopk":  # saev's own training-mode pass sets the inference threshold (an EMA)
            sae.train()
            for chunk in sample.split(64):
                sae(chunk)
        sae.eval()
        enc = sae.encode(x)
        x_hat = sae.decode(enc.f_x)[:, -1, :]  # saev decodes to (batch, n_prefixes, d); one prefix here
    dpath = OUT / name
    modeling.dump(dpath / "sae.pt", sae)
    save_file({"x": x.contiguous(), "codes": enc.f_x.contiguous(), "x_hat": x_hat.contiguous()},
              str(dpath / "expected.safetensors"), metadata={"package": "saev", "commit": "3d73f1f", "schema": "5"})
    again = modeling.load(dpath / "sae.pt").eval()
    torch.testing.assert_close(again.encode(x).f_x, enc.f_x)
    picked = enc.f_x[enc.f_x != 0]
    print(f"{name}: {picked.numel()} of {enc.f_x.numel()} codes non-zero, smallest non-zero {float(picked.min()):.3f}"
          + (f", threshold {float(sae.activation.threshold):.3f}" if name == "batchtopk" else ""))


for i, act in enumerate(ACTIVATIONS):
    make(act, i)
