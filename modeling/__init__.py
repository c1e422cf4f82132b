"""Files that travel inside every SafeVLM checkpoint (installed as `safevlm_hf.modeling`).

Each module imports only torch/transformers and its siblings (relative imports), so `save_pretrained` can copy them
next to the weights and `trust_remote_code=True` loads them without this package installed.
"""
