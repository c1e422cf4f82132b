"""`safevlm plan`: llava-1.5-7b numbers against a hand count, the activation model against the tensors PyTorch
really keeps for the backward pass, and the command line."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from safevlm_hf.cli import main as cli_main
from safevlm_hf.training.plan import GIB, DecoderShape, decoder_layer_activation_bytes, plan_training


pytestmark = pytest.mark.usefixtures("single_thread")

# ---- llava-1.5-7b by hand (config: Vicuna-7B 32 x 4096, MLP 11008, vocab 32064; CLIP ViT-L/14 at 336 px, 24 layers)
H, I, V, L = 4096, 11008, 32064, 32
LLM_LAYER = 4 * H * H + 3 * H * I + 2 * H  # q, k, v, o (no bias) + gate, up, down + 2 RMSNorms
LLM = V * H + L * LLM_LAYER + H + V * H  # embeddings, layers, final norm, untied lm_head
CLIP_LAYER = 4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024) + 2 * 2 * 1024
VISION = 3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 2 * 1024 + 24 * CLIP_LAYER + 2 * 1024  # patch, cls, pos, norms
PROJECTOR = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
# Safety modules (a new conversion: 64 tokens per set, head width 1024, 2 head layers, 7 types, 4 levels, and the
# "Illegal Risk/Sexual content" sub-category: a 2-way classifier, none + the sub-category).
D = 1024
HEAD_LAYER = 3 * 2 * D + 2 * 4 * (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)  # norms, self/cross attn, MLP
SAFETY = PROJECTOR + 2 * 64 * H + (D + 2 * (H * D + D) + 2 * 2 * D + 2 * HEAD_LAYER + 2 * D + 7 * D + 7 + 4 * D + 4)
SAFETY += 2 * D + 2  # sub-category classifier
TOTAL = LLM + VISION + PROJECTOR + SAFETY
LORA_256 = L * 256 * (4 * (H + H) + 2 * (H + I) + (I + H))  # r x (in + out) for q, k, v, o, gate, up, down


def test_llava_15_7b_plan_matches_a_hand_count():
    assert (LLM + VISION + PROJECTOR, SAFETY) == (7_063_427_072, 63_508_493)
    stage1 = plan_training("llava-1.5-7b", 1, gpus=8, micro_batch=2)  # seq 576 image + 64 safety + 512 text
    assert stage1.seq_len == 1152
    assert stage1.total_parameters == {"stage1": TOTAL} and stage1.trainable_parameters == {"stage1": SAFETY}
    stage2 = plan_training("llava-1.5-7b", 2, gpus=8, micro_batch=2, lora_r=256, lora_alpha=16)
    assert stage2.trainable_parameters == {"lora": LORA_256, "full": LLM - V * H}  # full: input embeddings frozen
    assert stage2.total_parameters == {"lora": TOTAL + LORA_256, "full": TOTAL}

    # bf16 (ZeRO paper): 2-byte weights and gradients, 12 bytes of Adam state (fp32 master, m, v) per trainable weight
    zero2 = stage1.find(precision="bf16", gradient_checkpointing=False, sharding="zero2")
    assert (zero2.parameters, zero2.gradients, zero2.optimizer) == (2 * TOTAL, 2 * SAFETY // 8, 12 * SAFETY // 8)
    zero3 = stage2.find(mode="full", precision="fp32", gradient_checkpointing=True, sharding="zero3/fsdp")
    full = LLM - V * H
    assert (zero3.parameters, zero3.gradients, zero3.optimizer) == (4 * TOTAL // 8, 4 * full // 8, 8 * full // 8)

    # Activations per token of one frozen decoder layer in bf16: two RMSNorms keep their fp32 input and inverse RMS,
    # attention keeps q, k, v, its output (bf16) and a fp32 log-sum-exp per head, SwiGLU keeps gate, SiLU(gate), up.
    frozen_layer = 2 * (4 * H + 4) + 2 * 4 * H + 4 * 32 + 2 * 3 * I
    head = (4 * H + 4) + 4 * V + 8  # final norm, fp32 log-softmax over the vocabulary, int64 targets
    tokens = 2 * 1152
    assert zero2.activations == tokens * (L * frozen_layer + head)
    assert round(zero2.activations / GIB, 2) == 9.35
    checkpointed = stage1.find(precision="bf16", gradient_checkpointing=True, sharding="zero2")
    assert checkpointed.activations == tokens * (L * 2 * H + frozen_layer + head)  # layer inputs + one rebuilt layer
    assert round(zero2.total / GIB, 2) == 22.73

    # LoRA (dropout 0.05, CUDA's fused dropout): each of the 7 adapters keeps its dropped input and a 1-byte mask,
    # and its r-wide A output.
    lora_layer = frozen_layer + (2 + 1) * (6 * H + I) + 2 * 256 * 7
    lora = stage2.find(mode="lora", precision="bf16", gradient_checkpointing=False, sharding="none")
    assert lora.activations == tokens * (L * lora_layer + head)


def _saved_bytes(layer: nn.Module, hidden: torch.Tensor, config: LlamaConfig) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (weights and the rotary tables, which every layer
    shares, left out)."""
    batch, length, _ = hidden.shape
    positions = torch.arange(length)[None].expand(batch, length)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, positions)
    skip = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), cos, sin)}
    kept: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in skip:
            kept[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["frozen", "full", "lora"])
def test_layer_activation_model_matches_what_pytorch_keeps(mode, dtype):
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).to(dtype).train()
    layer.requires_grad_(mode == "full")
    if mode == "lora":  # on a wrapper, as PEFT adapts a model, with dropout 0 (CPU dropout keeps a float mask)
        wrapper = nn.Module()
        wrapper.layer = layer
        get_peft_model(wrapper, LoraConfig(r=8, target_modules=r".*_proj", lora_dropout=0.0))
    sizes = []
    for length in (16, 24):  # per token: the difference cancels what does not grow with the batch (weight casts)
        hidden = torch.randn(2, length, 64, dtype=dtype, requires_grad=True)  # the gradient flows to the input
        # bf16 as the Trainer runs it, under autocast (PEFT keeps the adapters in fp32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            sizes.append(_saved_bytes(layer, hidden, config))
    measured = (sizes[1] - sizes[0]) / (2 * 8)
    shape = DecoderShape(64, 176, 4, 4, 1, 100)
    expected = decoder_layer_activation_bytes(shape, dtype.itemsize, mode, lora_r=8 if mode == "lora" else 0)
    assert measured == expected


def test_plan_cli_marks_the_recipe_row_and_reads_a_model_folder(saved_safevlm, capsys):
    assert cli_main(["plan", "--model", "llava-1.5-7b", "--stage", "1", "--recipe", "psa-vlm", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 2 x 1152 tokens" in out and "7.127 B parameters, 0.064 B trainable" in out
    chosen = [line for line in out.splitlines() if line.endswith("<- chosen")]
    assert len(chosen) == 1 and chosen[0].split()[:4] == ["stage1", "bf16", "off", "zero2"]
    assert chosen[0].split()[-3] == "22.73"  # the hand-counted total above

    assert cli_main(["plan", "--model", str(saved_safevlm), "--stage", "2", "--seq-len", "64", "--lora-r", "4"]) == 0
    out = capsys.readouterr().out
    assert "Stage II LoRA" in out and "Stage II full LLM" in out and "micro-batch 8 x 64 tokens" in out

    assert cli_main(["plan", "--model", "llava-7b", "--stage", "1"]) == 2
    assert "neither a model folder nor a built-in shape (llava-1.5-7b" in capsys.readouterr().err
