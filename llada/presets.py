"""The configurations of llada_finetune.py: the paper's presets per task (App. D.2), the authors' released
configs, the small Sudoku LLaDA's sizes (--preset tiny, and --preset elicit for its mixed-quality base), d1's released GRPO settings (--method grpo) and
what a flag takes when nothing sets it. `llada_finetune.parse` fills each unset flag from them.

    python llada_finetune.py --help      # prints every table (the epilog)
"""
# App. D.2 of the paper and the authors' released configs (their public repository). The paper's per-task
# learning rates and eta were lost from its text: lr/min_lr are the released ones where there are some
# (Countdown, Sudoku), eta is the released h; the GSM8K and MATH values are our choice (override them).
PRESETS = dict(
    sudoku=dict(steps_per_phase=256, batch=64, clip=2.0, buffer_prompts=80, completions=1,
                refresh_prompts=20, refresh_every=32, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.0,
                z="buffer"),                   # 1 greedy completion per prompt: Z over the buffer
    countdown=dict(steps_per_phase=800, batch=96, clip=2.0, buffer_prompts=80, completions=6,
                   refresh_prompts=20, refresh_every=25, lr=4e-6, min_lr=2e-6, eta=6.0, temperature=0.9,
                   z="prompt"),
    gsm8k=dict(steps_per_phase=800, batch=96, clip=2.0, buffer_prompts=80, completions=6,
               refresh_prompts=20, refresh_every=50, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.9,
               z="prompt"),
    math=dict(steps_per_phase=400, batch=72, clip=1.0, buffer_prompts=60, completions=8,
              refresh_prompts=15, refresh_every=50, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.9,
              z="prompt"),
)
# The authors' released configs (--preset released): per-GPU batch = micro-batch x grad-accum, their
# weighting (no Z, r clipped at 0, 1/n over the active block's masks), and the projections their
# target_modules actually match in LLaDA (o_proj, gate_proj, down_proj do not exist there).
RELEASED = dict(
    countdown=dict(steps_per_phase=1200, batch=96, micro_batch=12, clip=2.0, buffer_prompts=40, completions=6,
                   refresh_prompts=10, refresh_every=25, lr=4e-6, min_lr=2e-6, eta=6.0, temperature=1.0,
                   ema=0.95),
    sudoku=dict(steps_per_phase=256, batch=64, micro_batch=16, clip=1.0, buffer_prompts=80, completions=1,
                refresh_prompts=20, refresh_every=32, lr=3e-6, min_lr=1e-6, eta=5.0, temperature=0.0, ema=0.0),
)
# Their weighting and LoRA targets, and their draws: the counted block's size on {1..b}, the lr schedule's
# steps floored, distinct rows in a step, prompts in order through a shuffled training set, refreshed slots in
# turn (llada/README.md, "The released configs").
for cfg in RELEASED.values():
    cfg.update(weighting="released", lora_targets=["q_proj", "k_proj", "v_proj", "up_proj"],
               block_count="1..b", lr_rounding="floor", minibatch="without", prompt_order="shuffled",
               refresh_order="cycle")
# --preset tiny: the same loop sized for 2 CPU cores and a small LLaDA made by `python -m llada.sft`
# (lab/FINDINGS_llada.md, "A small LLaDA on 4x4 Sudoku"): short answers, 3 blocks of 8, a low-rank adapter.
# The paper's reading of the Sudoku tilt (greedy, one completion per prompt, Z over the buffer): of the
# two, the one that kept the base's accuracy and beat its control (3 seeds); neither raised it.
TINY = dict(
    sudoku=dict(steps_per_phase=50, batch=32, clip=1.0, buffer_prompts=256, completions=1, refresh_prompts=64,
                refresh_every=25, lr=1e-3, min_lr=1e-4, eta=10.0, a_max=40.0, temperature=0.0, z="buffer",
                held_out_prompts=128, gen_length=24, block_length=8, tokens_per_step=2, lora_r=16, lora_alpha=16,
                rollout_batch=128, protocol="short", eval_lengths=[24], eval_batch=64, phase_eval=256),
)
# --preset elicit: the small LLaDA made from SFT data of mixed quality (python -m llada.sft --mix 0.5), whose
# right solver is a minority of its samples (lab/FINDINGS_llada.md, "DTM at its best on the small LLaDA"). Fresh
# phases: 16 prompts x 8 temperature-1 rollouts of a new teacher every 12 steps (d1's 128 rollouts and 12
# updates per iteration), never refreshed (refresh_every = the phase's steps), 16 phases to 2,048 rollouts; Z
# per prompt; eta 50 at rewards in [0, 2] (each phase close to distilling each prompt's best rollout, as a round
# of lab/rft.py is; eta 5 ends 0.02 lower at 2,048 rollouts); lr 3e-4 (the best of 1e-4, 3e-4, 1e-3 over 3
# seeds); rows drawn from the tilted buffer (--minibatch tilted). Adam kept, a longer warm-up, r shifted per
# prompt, no empty SAR rows, temperature 0.9, batch 128, 24 steps: none helped over 3 seeds (the findings). No
# health check: a phase's change is resolved only by ~64 held-out prompts (512 rollouts, 4x its training's).
ELICIT = dict(
    sudoku=dict(TINY["sudoku"], temperature=1.0, completions=8, z="prompt", buffer_prompts=16, refresh_prompts=4,
                refresh_every=12, steps_per_phase=12, batch=64, eta=50.0, a_max=800.0, lr=3e-4, held_out_prompts=0,
                minibatch="tilted", eval_every=4),
)
# What a flag takes when neither it nor the preset sets it (the 8B's sizes).
FALLBACK = dict(micro_batch=0, weighting="paper", minibatch="uniform", ema=0.0, z="prompt", a_max=100.0,
                shift="buffer", block_count="0..b", reset_optimizer="phase", warmup_steps=0, held_out_maskings=4,
                lr_rounding="round", prompt_order="random", refresh_order="random",
                eval_every=1,
                gen_length=256, block_length=32, tokens_per_step=2, lora_r=128, lora_alpha=64.0,
                rollout_batch=16, protocol="ours", eval_lengths=[256, 512], eval_batch=8, phase_eval=0,
                held_out_prompts=16)

# d1's released settings (its train.yaml and run.sh: 6 completions, 2 prompts per step, mu 12, the reference
# re-synced every 64 steps) for the 8B (iterations: ours), and the same loop sized for the small Sudoku LLaDA
# (10 iterations: DTM's 1,280 rollouts; lr 3e-4: the best of three trials, lab/FINDINGS_llada.md). --method grpo
# takes these where no flag sets them, before the preset's values.
D1 = dict(paper=dict(completions=6, temperature=0.9, lr=3e-6, clip=0.2, beta=0.04, mu=12, eps=0.5, grpo_prompts=2,
                     iterations=1000, ref_sync=64 // 12),
          tiny=dict(completions=8, temperature=0.9, lr=3e-4, clip=0.2, beta=0.04, mu=12, eps=0.5, grpo_prompts=16,
                    iterations=10, ref_sync=0, eval_every=2))
D1["released"] = D1["paper"]
D1["elicit"] = dict(D1["tiny"], iterations=16, eval_every=4)          # DTM's 2,048 rollouts, evaluated as DTM
