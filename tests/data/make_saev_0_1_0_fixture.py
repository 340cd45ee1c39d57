"""Fixture made by the real saev 0.1.0 (PyPI wheel): a ReLU SAE saved with saev.nn.dump, and saev's own forward outputs.

How it was run (from the repository root; our .venv supplies torch, safetensors, beartype and jaxtyping):
    .venv/bin/pip download saev==0.1.0 --no-deps -d /tmp/wheels
    .venv/bin/pip install --no-deps --target /tmp/pkgs/saev saev==0.1.0 einops==0.8.2
    PYTHONPATH=/tmp/pkgs/saev .venv/bin/python tests/data/make_saev_0_1_0_fixture.py
Writes tests/data/saev-0.1.0/sae.pt (saev's pre-schema format: a JSON line of its config, then torch.save of the
state dict) and tests/data/saev-0.1.0/expected.safetensors (x, codes f_x and x_hat from SparseAutoencoder.forward).
"""

import importlib.metadata
from pathlib import Path

import saev.config
import saev.nn
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "saev-0.1.0"
D, EXP, N_SAMPLE = 16, 4, 256

assert importlib.metadata.version("saev") == "0.1.0", importlib.metadata.version("saev")
torch.manual_seed(0)
offset = torch.randn(D) * 2  # activations with a non-zero mean, so b_dec matters
sample = torch.randn(N_SAMPLE, D) * 1.5 + offset
x = torch.randn(32, D) * 1.5 + offset

cfg = saev.config.SparseAutoencoder(d_vit=D, exp_factor=EXP, n_reinit_samples=N_SAMPLE, seed=0)
sae = saev.nn.SparseAutoencoder(cfg)
sae.init_b_dec(sample)  # saev's own b_dec init: the sample mean
with torch.no_grad():
    sae.b_enc.copy_(torch.randn(D * EXP) * 0.5)
sae.normalize_w_dec()
sae.eval()

with torch.no_grad():
    x_hat, f_x, _ = sae(x)
saev.nn.dump(str(OUT / "sae.pt"), sae)
save_file({"x": x.contiguous(), "codes": f_x.contiguous(), "x_hat": x_hat.contiguous()},
          str(OUT / "expected.safetensors"), metadata={"package": "saev", "version": "0.1.0"})
# the file must read back with saev's own loader and give the same codes
again = saev.nn.load(str(OUT / "sae.pt"))
torch.testing.assert_close(again(x)[1], f_x)
print(
    f"wrote {OUT}: {int((f_x > 0).sum())} of {f_x.numel()} codes active, "
    f"|b_dec| = {float(sae.b_dec.detach().norm()):.3f}"
)
