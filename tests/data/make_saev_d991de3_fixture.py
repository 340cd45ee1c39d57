"""Fixtures made by the real saev at git commit d991de3d2a1c54b66f6da37b6c1d3bbba74e1502 (2025-07-22, header schema 1,
format "1A": the config class name in "cls"): ReLU and TopK SAEs saved with saev.nn.dump, and saev's own forward
outputs.
This saev still encodes (x - b_dec); schema-1 files are the last ones that do (see docs/train.md, Importing SAEs).

How it was run (from the repository root; our .venv supplies torch, safetensors, beartype and jaxtyping):
    git archive d991de3d2a1c54b66f6da37b6c1d3bbba74e1502 pyproject.toml README.md LICENSE src \
        | tar -x -C /tmp/src/saev-d991de3        # from a clone of github.com/OSU-NLP-Group/saev
    .venv/bin/pip install --no-deps --target /tmp/pkgs/saev-d991de3 /tmp/src/saev-d991de3
    .venv/bin/pip install --no-deps --target /tmp/pkgs/saev-d991de3 einops==0.8.2
    PYTHONPATH=/tmp/pkgs/saev-d991de3 .venv/bin/python tests/data/make_saev_d991de3_fixture.py
Writes tests/data/saev-d991de3/<relu|topk>/sae.pt and expected.safetensors (x, codes f_x, x_hat).
"""

from pathlib import Path

import saev.config as config
import saev.nn.modeling as modeling
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "saev-d991de3"
D, EXP, K, N_SAMPLE = 16, 4, 8, 256


def make(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    offset = torch.randn(D) * 2  # activations with a non-zero mean, so b_dec matters
    sample = torch.randn(N_SAMPLE, D) * 1.5 + offset
    x = torch.randn(32, D) * 1.5 + offset
    kw = {"d_vit": D, "exp_factor": EXP, "n_reinit_samples": N_SAMPLE, "seed": seed}
    cfg = config.TopK(top_k=K, **kw) if name == "topk" else config.Relu(**kw)
    sae = modeling.SparseAutoencoder(cfg)
    sae.init_b_dec(sample)  # saev's own b_dec init: the sample mean
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D * EXP) * 0.5)
    sae.normalize_w_dec()
    sae.eval()
    with torch.no_grad():
        x_hat, f_x = sae(x)
    dpath = OUT / name
    modeling.dump(str(dpath / "sae.pt"), sae)
    save_file({"x": x.contiguous(), "codes": f_x.contiguous(), "x_hat": x_hat.contiguous()},
              str(dpath / "expected.safetensors"), metadata={"package": "saev", "commit": "d991de3", "schema": "1"})
    torch.testing.assert_close(modeling.load(str(dpath / "sae.pt"))(x)[1], f_x)
    picked = f_x[f_x != 0]
    print(f"{name}: {picked.numel()} of {f_x.numel()} codes non-zero, smallest non-zero {float(picked.min()):.3f}")


for i, act in enumerate(("relu", "topk")):
    make(act, 10 + i)
