"""The shape-letter glossary used in tensor names across saevctl (`acts_bpd`, `codes_bs`).

Names end in one letter per dimension, so `x_bpd` is (batch, tokens, width); jaxtyping annotations use the same
letters (`Float[Tensor, "b d"]`), and tests/test_shapes.py holds every annotation in the code to this glossary.
"""

GLOSSARY: dict[str, str] = {
    "b": "batch (images or activation rows)",
    "n": "images in a store",
    "p": "tokens of one image (patches, or all tokens where said)",
    "t": "all tokens of one image: CLS, registers, patches",
    "d": "ViT residual-stream width",
    "s": "SAE latents (dictionary size)",
    "k": "top-k entries",
    "l": "layers",
    "m": "models in a sweep",
    "c": "classes of a task head",
    "h": "image or patch-grid height",
    "w": "image or patch-grid width",
    "f": "features under study (a chosen subset of the SAE latents)",
    "z": "non-zero entries of a sparse tensor",
}
