"""Multi-turn and tool-use RL on the tiny CPU model (issue #21), 3 seeds per arm.

    rlhf-jax sweep experiments/multiturn/sweep.py --sweep_dir=runs/multiturn

Two arms, each from its own short SFT policy (the start, the reference, and the step-0
row of every eval), presets of configs/multiturn.py:

  guess  GRPO with env `guess_number` (a secret in 1-8, 4 guesses, "higher" / "lower" as
         user turns, reward 1 - 0.1 per extra guess), 60 steps. SFT start: games of two
         players, half by one that repeats its first guess whatever the env says (solves
         1/8), half by one that guesses in the range still possible (83%); binary search
         solves all. What GRPO can learn: to follow the feedback.
  calc   GRPO with env `calculator` on "calc: 4+7*1" (two operations, 1-digit operands),
         40 steps.
         SFT start: 40% calculator transcripts (<tool>calculator: 4+7*1</tool>, the result,
         the answer), 60% direct answers it cannot compute: it calls the tool on part of
         the prompts.

Every eval (every 20 steps) plays whole episodes, greedy (eval_env/*: guess: the 8
secrets once each; calc: 64 held-out prompts) and sampled at T = 1 (eval_sampled_env/*:
16 resp. 2 episodes per prompt): success, turns, tool-call rate, ...
(rlhf_jax/rollout_multiturn.py). The report gives each arm's final values with bootstrap
and Student-t CIs and the change from step 0 (the SFT start, the same for every seed).
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = "configs/multiturn.py"


def get_sweep(preset="tiny"):
  if preset != "tiny":
    raise ValueError(f"unknown preset {preset!r}; expected 'tiny'")
  data = "{cell:data}"
  return dict(
      name="multiturn",
      seeds=[0, 1, 2],
      cells=[
          dict(name="data", seeds=[0], command=[
              "{python}", f"{HERE}/prepare.py", "--out={workdir}", "--digits=1",
              "--tool_frac=0.4"]),
          dict(name="guess_sft", seeds=[0], config=f"{CFG}:guess_sft",
               overrides={"data.train_path": f"{data}/guess_sft.jsonl"}),
          dict(name="calc_sft", seeds=[0], config=f"{CFG}:calc_sft",
               overrides={"data.train_path": f"{data}/calc_sft.jsonl"}),
          dict(name="guess", config=f"{CFG}:guess", overrides={
              "init_from": "{cell:guess_sft}",
              "data.train_path": f"{data}/guess_prompts_train.jsonl",
              "data.eval_path": f"{data}/guess_prompts_eval.jsonl"}),
          dict(name="calc", config=f"{CFG}:calc", overrides={
              "init_from": "{cell:calc_sft}",
              "data.train_path": f"{data}/calc_prompts_train.jsonl",
              "data.eval_path": f"{data}/calc_prompts_eval.jsonl"}),
      ],
      report=dict(title="Multi-turn and tool-use GRPO on the tiny model (3 seeds per arm)",
                  exclude=["data", "guess_sft", "calc_sft"],
                  metrics=["eval_env/success", "eval_env/turns", "eval_env/tool_call_rate",
                           "eval_sampled_env/success", "eval_sampled_env/turns",
                           "eval_sampled_env/tool_call_rate", "eval_sampled_env/tool_errors",
                           "eval_sampled_env/malformed_tool_calls",
                           "eval_sampled_env/model_tokens", "eval_kl"]),
  )
