"""llada/bench.py: the benchmark table on the tiny LLaDA (tests/llada_tiny.py), and its FLOP counts by hand.
Speed targets are checked by running the benchmark, not by timed tests.
"""
import os

import pytest
import torch

import llada.bench as bench
import llada_finetune as lf
from test_llada_finetune import train_args
from llada.model import LLaDAConfig


@pytest.mark.slow
def test_bench_prints_a_warm_timing_table_per_batch_size_in_seconds(tiny, capsys):
    args = lf.parse(["--model_dir", tiny[0], "--task", "countdown", "--bench", "--bench_batches", "1", "3",
                     "--gen_length", "8", "--block_length", "4", "--lora_r", "4", "--device", "cpu"])
    rows = bench.bench(args, lf.make_trainer(args))
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


def test_rollout_batch_auto_picks_where_sequences_per_second_stop_rising_and_stays_in_memory():
    seconds = lambda B: 0.1 * max(1, B / 8)                      # rows/s rise up to batch 8, then flat
    peak = lambda B: 10 + 5 * B                                   # bytes: weights 10, 5 per row
    B, table = bench.pick_rollout_batch(lambda B: (seconds(B), peak(B)), cap=64)
    assert B == 8 and [b for b, _, _ in table] == [1, 2, 4, 8, 16, 32, 64]
    B, table = bench.pick_rollout_batch(lambda B: (seconds(B), peak(B)), cap=64, budget=45)
    assert B == 4 and [b for b, _, _ in table] == [1, 2, 4]      # batch 8 would need 50

    def out_of_memory_at_4(B):
        if B >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return seconds(B), None
    assert bench.pick_rollout_batch(out_of_memory_at_4, cap=64)[0] == 2


@pytest.mark.slow
def test_rollout_batch_auto_measures_the_tiny_model_and_trains(tiny, tmp_path, capsys):
    out = str(tmp_path / "auto")
    lf.main(train_args(tiny[0], out, "--a_max", "0.5", "--rollout_batch", "auto"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("rollout batch auto:"))
    assert "1: " in line and "128: " in line                      # no memory limit on the CPU: up to the cap
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
