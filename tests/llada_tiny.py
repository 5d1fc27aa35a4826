"""A tiny random LLaDA written to disk in the real HF layout (2 shards + index, config.json,
tokenizer.json), for the tests of llada/ and llada_finetune.py. Nothing is downloaded.

    write_tiny_llada(path)     ->  the tensors it wrote, by their HF key
    randomise_adapters(model)  ->  non-zero LoRA B matrices, so that an adapter changes the output
"""
import json
import os

import torch

from llada.lora import lora_layers
from llada.model import save_safetensors

SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|mdm_mask|>"]                     # ids 0..5 in the tiny tokenizer
CONFIG = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, embedding_size=320,
              vocab_size=320, rms_norm_eps=1e-5, rope_theta=10000.0, mask_token_id=5, eos_token_id=1,
              include_bias=False, weight_tying=False, layer_norm_type="rms", activation_type="silu",
              block_type="llama", model_type="llada")
CORPUS = ["<reasoning>\nthink\n</reasoning>\n<answer>\n\\boxed{12}\n</answer>",
          "Using only the numbers [1, 2, 3], create an arithmetic expression 1+2*3 = 7",
          "Solve the following Sudoku puzzle: 1234000000000000 Question: Answer:"] * 20


def write_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=CONFIG["embedding_size"], special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.get_vocab_size() <= CONFIG["embedding_size"]
    tok.save(os.path.join(path, "tokenizer.json"))


def tiny_state(config=CONFIG, seed=0, std=0.3):
    """Random weights under LLaDA's key names; std large enough that logits are far from ties."""
    c, g = config, torch.Generator().manual_seed(seed)
    D, F, V, hd = c["d_model"], c["mlp_hidden_size"], c["embedding_size"], c["d_model"] // c["n_heads"]
    r = lambda *s: torch.randn(*s, generator=g) * std                                       # noqa: E731
    state = {"model.transformer.wte.weight": r(V, D), "model.transformer.ln_f.weight": 1 + r(D),
             "model.transformer.ff_out.weight": r(V, D)}
    for n in range(c["n_layers"]):
        p = f"model.transformer.blocks.{n}."
        state.update({p + "attn_norm.weight": 1 + r(D), p + "ff_norm.weight": 1 + r(D),
                      p + "q_proj.weight": r(D, D), p + "k_proj.weight": r(c["n_kv_heads"] * hd, D),
                      p + "v_proj.weight": r(c["n_kv_heads"] * hd, D), p + "attn_out.weight": r(D, D),
                      p + "ff_proj.weight": r(F, D), p + "up_proj.weight": r(F, D), p + "ff_out.weight": r(D, F)})
    return state


def write_tiny_llada(path, seed=0):
    os.makedirs(path, exist_ok=True)
    state = tiny_state(seed=seed)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_safetensors({k: state[k] for k in ks}, os.path.join(path, name), {"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())},
             "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    write_tokenizer(path)
    return state


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
