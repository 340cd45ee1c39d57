"""Fixtures made by the real SAELens (PyPI sae-lens==6.54.12): StandardSAE and TopKSAE folders written with
SAE.save_model (cfg.json + sae_weights.safetensors), and SAELens's own encode/decode outputs.

How it was run (from the repository root; our .venv supplies torch, safetensors, numpy, pandas, datasets, jaxtyping,
beartype, typeguard, huggingface_hub, rich, ...; the rest goes to a throwaway folder, one package at a time, --no-deps):
    .venv/bin/pip install --no-deps --target /tmp/pkgs/saelens sae-lens==6.54.12 transformer-lens==3.9.0 \
        einops==0.8.2 better-abc==0.0.3 transformers==5.25.0 tokenizers==0.23.3 requests==2.34.2 urllib3==2.8.0 \
        certifi==2026.10.19.post1 simple-parsing==0.1.9 docstring-parser==0.18.0 wandb==0.31.0 \
        platformdirs==4.14.9 opentelemetry-api==1.45.3
    PYTHONPATH=/tmp/pkgs/saelens .venv/bin/python tests/data/make_saelens_fixture.py
Writes tests/data/saelens-6.54.12/<name>/cfg.json, sae_weights.safetensors and expected.safetensors (x, codes, x_hat).
"""

from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / f"saelens-{sae_lens.__version__}"
D, S, K = 16, 64, 8
assert sae_lens.__version__ == "6.54.12", sae_lens.__version__

VARIANTS = {
    "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=S)),
    "standard-no-bdec-in": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=S, apply_b_dec_to_input=False)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=K)),
    "topk-rescaled": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=K, rescale_acts_by_decoder_norm=True)),
}


def make(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    offset = torch.randn(D) * 2  # activations with a non-zero mean, so b_dec matters
    x = torch.randn(32, D) * 1.5 + offset
    sae = VARIANTS[name]()
    with torch.no_grad():  # SAELens initialises both biases to zero; a trained SAE has neither
        sae.b_dec.copy_(offset + torch.randn(D) * 0.3)
        sae.b_enc.copy_(torch.randn(S) * 0.5)
        sae.W_dec.mul_(torch.rand(S, 1) + 0.5)  # decoder rows of uneven norm, so the rescaling matters
        sae.eval()
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    dpath = OUT / name
    sae.save_model(dpath)
    save_file({"x": x.contiguous(), "codes": codes.contiguous(), "x_hat": x_hat.contiguous()},
              str(dpath / "expected.safetensors"), metadata={"package": "sae-lens", "version": sae_lens.__version__})
    with torch.no_grad():
        torch.testing.assert_close(SAE.load_from_disk(dpath).encode(x), codes)
    print(f"{name}: {int((codes != 0).sum())} of {codes.numel()} codes non-zero")


for i, variant in enumerate(VARIANTS):
    make(variant, 20 + i)
