"""llada/bench.py: the benchmark table on the tiny LLaDA (tests/llada_tiny.py), and its FLOP counts by hand.
Speed targets are checked by running the benchmark, not by timed tests.
"""
import pytest

import llada.bench as bench
import llada_finetune as lf
from llada.model import LLaDAConfig


def test_bench_prints_a_warm_timing_table_per_batch_size_in_seconds(tiny, capsys):
    args = lf.parse(["--model_dir", tiny[0], "--task", "countdown", "--bench", "--bench_batches", "1", "3",
                     "--gen_length", "8", "--block_length", "4", "--lora_r", "4", "--device", "cpu"])
    rows = bench.bench(args, lf.Trainer(args))
    out = capsys.readouterr().out
    assert "| batch | sampling step s | tokens/s at 2/step | TFLOP/s |" in out
    assert [r[0] for r in rows] == [1, 3] and all(r[1] > 0 and r[5] > 0 for r in rows)
    assert rows[1][2] == pytest.approx(3 * 2 / rows[1][1])                       # tokens/s = B x 2 / step


def test_flop_count_of_a_forward_matches_a_hand_count():
    c = LLaDAConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=16, embedding_size=100)
    per_layer = 8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16                             # q, o; k, v (GQA: 4); 3 MLP
    assert bench.forward_flops(c, tokens=10, seq_len=5, logit_rows=3) == \
        10 * (2 * 2 * per_layer + 4 * 2 * 5 * 8) + 3 * 2 * 8 * 100


def test_cached_sampler_flops_count_one_full_call_per_block_and_spans_between():
    c = LLaDAConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=16, embedding_size=100)
    full = bench.forward_flops(c, 2 * 12, 12, 2 * 4)                          # B 2, P 4, G 8, block 4
    assert bench.sampler_flops(c, 2, 4, 8, 4, 4, None) == 4 * full
    dual = bench.forward_flops(c, 2 * 4, 12, 2 * 4)                           # the block only, all 12 keys
    assert bench.sampler_flops(c, 2, 4, 8, 4, 4, "dual") == 2 * (full + dual)
    prefix = [bench.forward_flops(c, 2 * (12 - lo), 12, 2 * 4) for lo in (4, 8)]
    assert bench.sampler_flops(c, 2, 4, 8, 4, 4, "prefix") == 2 * full + sum(prefix)
