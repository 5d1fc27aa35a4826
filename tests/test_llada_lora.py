"""llada/lora.py on the tiny random LLaDA (tests/llada_tiny.py): the adapter at init is the base, merge
and unmerge are exact, the PEFT layout round-trips, and teacher_mode runs the phase's snapshot.
"""
import json

import torch

import llada.lora as lora
import llada.model as lm
from llada_tiny import CONFIG, randomise_adapters


# ----------------------------------------------------------------------------- LoRA
def test_lora_at_init_equals_the_base_and_only_adapters_train(tiny):
    base = lm.load_model(tiny[0])
    wrapped = lora.add_lora(lm.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(wrapped(ids), base(ids), rtol=0, atol=0)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(lora.LORA_TARGETS) * CONFIG["n_layers"]



def test_lora_keeps_the_bias_of_a_layer_that_has_one_merged_or_not():
    """LLaDA's projections have no bias, but a copied lora_linear may meet one: it must not drop it."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(6, 5).double(), r=2, alpha=4, dropout=0.0).double()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = layer.base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_the_base(tiny):
    # float64, so that the only difference left is the order of the sums (W + BA)x vs Wx + B(Ax)
    model = lora.add_lora(lm.load_model(tiny[0]), r=4, alpha=8, dropout=0.0).double()
    randomise_adapters(model)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    w0 = model.blocks[0].q_proj.base.weight.clone()
    before = model(ids)
    for m in lora.lora_layers(model).values():
        m.merge()
    assert not torch.equal(model.blocks[0].q_proj.base.weight, w0)
    torch.testing.assert_close(model(ids), before, rtol=1e-10, atol=1e-10)
    for m in lora.lora_layers(model).values():
        m.unmerge()
    torch.testing.assert_close(model.blocks[0].q_proj.base.weight, w0, rtol=0, atol=1e-12)


def test_adapter_saves_in_peft_layout_and_loads_back(tiny, tmp_path):
    a = lora.add_lora(lm.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    randomise_adapters(a, seed=1)
    lora.save_adapter(a, str(tmp_path), r=4, alpha=8, dropout=0.0)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    keys = lm.load_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert "base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.transformer.blocks.1.ff_out.lora_B.weight"].shape == (32, 4)
    import re
    assert re.fullmatch(cfg["target_modules"], "model.transformer.blocks.3.ff_out")
    assert not re.fullmatch(cfg["target_modules"], "model.transformer.ff_out")      # not the LM head
    b = lora.add_lora(lm.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    lora.load_adapter(b, str(tmp_path))
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)


def test_teacher_mode_runs_the_adapter_snapshot_not_the_student(tiny):
    model = lora.add_lora(lm.load_model(tiny[0]), r=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    base = model(ids)
    randomise_adapters(model)                          # the student moves; the teacher is still the base
    with lora.teacher_mode(model):
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    lora.snapshot_teacher(model)                         # a new phase: the teacher becomes the student
    student = model(ids)
    assert not torch.allclose(student, base)
    with lora.teacher_mode(model):
        torch.testing.assert_close(model(ids), student, rtol=0, atol=0)



def test_lora_at_the_presets_scale_r128_alpha64_is_w_plus_half_b_a_merged_or_not():
    """The presets' LoRA (r 128, alpha 64, the paper's App. D.2): scale alpha / r = 0.5, against an explicit
    W + 0.5 B A, unmerged, merged and unmerged again; and the adapter saved at that scale loads back to the
    same outputs. (r 128 exceeds the layer's 48 inputs here: the algebra does not care.)"""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=False).double()
    layer = lora.LoRALinear(base, r=128, alpha=64, dropout=0.0).double()
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(128, 48, generator=g, dtype=torch.float64) * 0.1)
        layer.lora_B.copy_(torch.randn(40, 128, generator=g, dtype=torch.float64) * 0.1)
    W = base.weight.detach().clone()
    explicit = W + 0.5 * layer.lora_B.detach() @ layer.lora_A.detach()
    x = torch.randn(5, 48, generator=g, dtype=torch.float64)
    assert layer.scale == 0.5
    torch.testing.assert_close(layer(x), x @ explicit.T, rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(base.weight, explicit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), x @ explicit.T, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(base.weight, W, rtol=0, atol=1e-12)
    assert (explicit - (W + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach())).abs().max() > 0.1   # scale 2 differs


def test_an_adapter_at_the_presets_scale_round_trips_through_the_peft_layout(tiny, tmp_path):
    a = lora.add_lora(lm.load_model(tiny[0]), r=128, alpha=64, dropout=0.0)
    randomise_adapters(a, seed=2)
    lora.save_adapter(a, str(tmp_path), r=128, alpha=64, dropout=0.05)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"]) == (128, 64)
    b = lora.add_lora(lm.load_model(tiny[0]), r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0)
    lora.load_adapter(b, str(tmp_path))
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    q = b.blocks[0].q_proj
    assert q.scale == 0.5
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)
    h = torch.randn(3, CONFIG["d_model"], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(q(h), h @ (q.base.weight + 0.5 * q.lora_B @ q.lora_A).T, rtol=1e-5, atol=1e-5)
